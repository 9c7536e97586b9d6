"""Full simulations of the QK-OV statistics (SPEC section 6): calibration, power, speed.

    PYTHONPATH=src .venv/bin/python scripts/simulate_stats.py            # everything
    PYTHONPATH=src .venv/bin/python scripts/simulate_stats.py --quick    # fewer runs

Writes docs/figures/stats_calibration_qq.png and docs/figures/stats_power_curve.png, prints
the measured numbers as markdown and (with --update-docs) replaces the block between the
"simulate_stats" markers in docs/statistics.md.

Synthetic gradients (end-to-end through QKOVStatistics.test_scores): a GQA model of
L layers, H query heads and H_kv kv heads with P parameters per head slice. Each parameter
k has an importance for task A and for task B; a sample's gradient is
g_k = scale_sample * sqrt(importance_k) * N(0, 1); C_i = g_i^2; the pooled Fisher is the
mean of the two importances; M^B_ij,c = sum_{k in c} C_ik / D_k |g_jk| exactly as SPEC 5.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import stats as sps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from interference.stats import (PermutationResolutionWarning, QKOVStatistics,  # noqa: E402
                                bh_qvalues, permutation_test_matrix)

FIG_DIR = ROOT / "docs" / "figures"
DOC = ROOT / "docs" / "statistics.md"
ALPHA = 0.05
THRESHOLDS = (0.01, 0.05, 0.1)


# ------------------------------------------------------------ synthetic gradients
class SyntheticModel:
    """Per-parameter importances of tasks A and B on a small GQA attention stack."""

    def __init__(self, rng, n_layers=4, n_heads=6, n_kv=2, p=16):
        self.n_layers, self.n_heads, self.n_kv, self.p = n_layers, n_heads, n_kv, p
        self.kv_head_of = [h // (n_heads // n_kv) for h in range(n_heads)]
        self.slots = {"Q": n_heads, "K": n_kv, "V": n_kv, "O": n_heads}
        self.imp_a = {b: rng.lognormal(0.0, 1.0, (n_layers, s, p)) for b, s in self.slots.items()}
        self.imp_b = {b: rng.lognormal(0.0, 1.0, (n_layers, s, p)) for b, s in self.slots.items()}
        self.fisher = {b: (self.imp_a[b] + self.imp_b[b]) / 2 for b in self.slots}

    def grads(self, rng, n, imp, scale=1.0, load=None):
        """n gradients {block: [n, L, slots, P]}; load = [(block, layer, slot, factor)]."""
        s = scale * rng.lognormal(0.0, 0.3, n)[:, None, None, None]  # per-sample size
        out = {b: s * np.sqrt(imp[b])[None] * rng.normal(size=(n,) + imp[b].shape)
               for b in self.slots}
        for (b, layer, slot, factor) in (load or []):
            out[b][:, layer, slot] *= factor
        return out

    def scores(self, g_a, g_j):
        """M[B]: [n_a, n_j, L, H] (K/V broadcast over the query heads of a group)."""
        out = {}
        for b in self.slots:
            ci = g_a[b] ** 2 / self.fisher[b][None]
            m = np.einsum("alsp,blsp->abls", ci, np.abs(g_j[b]))
            out[b] = m[..., self.kv_head_of] if b in "KV" else m
        return out

    @property
    def n_cells(self):
        return self.n_layers * (2 * self.n_heads + 2 * self.n_kv)


def synthetic_run(model, rng, *, n_a, n_b, n_r, b_scale=1.0, load=None, exchangeable=False):
    g_a = model.grads(rng, n_a, model.imp_a)
    imp_j = model.imp_a if exchangeable else model.imp_b
    g_b = model.grads(rng, n_b, imp_j, scale=b_scale, load=load)
    g_r = model.grads(rng, n_r, model.imp_a)
    return model.scores(g_a, g_b), model.scores(g_a, g_r)


# ------------------------------------------------------------------ calibration
def calibration_synthetic(runs, seed):
    """B exchangeable with R (both held-out task-A gradients), end to end."""
    ss = np.random.SeedSequence([seed, 1])
    model = SyntheticModel(np.random.default_rng(ss.spawn(1)[0]))
    layers, heads = list(range(model.n_layers)), list(range(model.n_heads))
    ps = np.empty((runs, model.n_cells))
    anyq = np.zeros(runs, dtype=bool)
    for r, child in enumerate(ss.spawn(runs + 1)[1:]):
        rng = np.random.default_rng(child)
        sb, sr = synthetic_run(model, rng, n_a=32, n_b=32, n_r=48, exchangeable=True)
        out = QKOVStatistics(n_bootstrap=0, seed=child).test_scores(
            sb, sr, layers, heads, model.kv_head_of)
        ps[r] = out["cells"]["p_value"].to_numpy()
        anyq[r] = out["summary"]["n_q_significant"] > 0
    return ps, anyq


def calibration_matrix(runs, seed, n_b, n_r, sd_b, statistic, m=4, n_perm=999):
    """Equal means, unequal variances (and sizes), on disruption matrices."""
    ps = np.empty((runs, m))
    anyq = np.zeros(runs, dtype=bool)
    for r, child in enumerate(np.random.SeedSequence([seed, 2, n_b, n_r]).spawn(runs)):
        rng = np.random.default_rng(child)
        xb = rng.normal(0.0, sd_b, (n_b, m))
        xr = rng.normal(0.0, 1.0, (n_r, m))
        res = permutation_test_matrix(xb, xr, statistic=statistic, n_permutations=n_perm,
                                      seed=rng)
        ps[r] = res.pvalue
        anyq[r] = np.any(bh_qvalues(res.pvalue) <= ALPHA)
    return ps, anyq


def summarise_calibration(ps, anyq):
    runs, m = ps.shape
    rows = {}
    exceed = 0
    for t in THRESHOLDS:
        rate = (ps <= t).mean(axis=0)
        bound = t + 2 * math.sqrt(t * (1 - t) / runs)
        exceed += int((rate > bound).sum())
        rows[t] = dict(mean=float(rate.mean()), max=float(rate.max()), bound=bound)
    ks = np.array([sps.kstest(ps[:, c], "uniform").pvalue for c in range(m)])
    fw_bound = ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / runs)
    return dict(runs=runs, cells=m, rates=rows, exceed=exceed, checks=m * len(THRESHOLDS),
                ks_min=float(ks.min()), ks_share_below_05=float((ks < 0.05).mean()),
                familywise=float(anyq.mean()), familywise_bound=fw_bound)


# ------------------------------------------------------------------------ power
def power_sweep(runs, seed, deltas, norms=("share", "none"), none_deltas=(0.0, 0.2, 0.4)):
    ss = np.random.SeedSequence([seed, 3])
    model = SyntheticModel(np.random.default_rng(ss.spawn(1)[0]))
    layers, heads = list(range(model.n_layers)), list(range(model.n_heads))
    planted_spec = [("Q", 1, 2), ("K", 2, 1), ("O", 3, 4)]  # (block, layer, slot)
    out = {}
    for norm in norms:
        out[norm] = []
        for delta in (deltas if norm != "none" else [d for d in deltas if d in none_deltas]):
            found = np.zeros(len(planted_spec))
            fdp = np.empty(runs)
            any_false = np.zeros(runs, dtype=bool)
            n_sig = np.empty(runs)
            d_planted = np.zeros(len(planted_spec))
            for r, child in enumerate(np.random.SeedSequence([seed, 3, int(delta * 1000)])
                                      .spawn(runs)):
                rng = np.random.default_rng(child)
                load = [(b, l, s, 1.0 + delta) for (b, l, s) in planted_spec] if delta else None
                # B's gradients: distributed as task A's held-out ones but 1.5x larger
                # everywhere, plus the extra load on the planted cells (the only true
                # task-specific conflicts)
                sb, sr = synthetic_run(model, rng, n_a=32, n_b=32, n_r=32, b_scale=1.5,
                                       load=load, exchangeable=True)
                res = QKOVStatistics(n_bootstrap=0, seed=child, disruption_norm=norm) \
                    .test_scores(sb, sr, layers, heads, model.kv_head_of)
                t = res["cells"]
                sig = t["significant"].to_numpy()
                is_planted = np.zeros(len(t), dtype=bool)
                for k, (b, l, s) in enumerate(planted_spec):
                    col = "kv_head" if b in "KV" else "head"
                    idx = np.flatnonzero((t["block"] == b) & (t["layer"] == l) & (t[col] == s))
                    assert idx.size == 1
                    is_planted[idx] = True
                    found[k] += sig[idx[0]]
                    d_planted[k] += t["effect_size"].iat[idx[0]]
                false = int((sig & ~is_planted).sum())
                n_sig[r] = sig.sum()
                fdp[r] = false / max(int(sig.sum()), 1)
                any_false[r] = false > 0
            out[norm].append(dict(delta=delta, power=(found / runs).tolist(),
                                  mean_d=(d_planted / runs).tolist(),
                                  fdp=float(fdp.mean()),
                                  fdp_se=float(fdp.std(ddof=1) / math.sqrt(runs)),
                                  any_false=float(any_false.mean()),
                                  mean_significant=float(n_sig.mean())))
            print(f"  power {norm:5s} delta={delta:.2f}: power={np.round(found / runs, 3)} "
                  f"FDP={fdp.mean():.3f} any false={any_false.mean():.3f} "
                  f"#sig={n_sig.mean():.1f}", flush=True)
    return dict(n_cells=model.n_cells, planted=[f"{b}/L{l}/{'KV' if b in 'KV' else 'H'}{s}"
                                                for b, l, s in planted_spec],
                runs=runs, sweep=out)


# ------------------------------------------------------------------------ speed
def cpu_model():
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", text).group(1).strip()
        cores = re.search(r"^CPU\(s\):\s*(\d+)", text, re.M).group(1)
        return f"{name}, {cores} CPU(s)"
    except Exception:  # pragma: no cover
        return platform.processor() or "unknown"


def benchmark(threads=2, repeats=5):
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    n_layers, n_heads, n_kv = 30, 9, 3
    m = n_layers * (2 * n_heads + 2 * n_kv)
    xb, xr = rng.gamma(2.0, 1.0, (64, m)), rng.gamma(2.0, 1.0, (64, m))
    kv = [h // 3 for h in range(n_heads)]
    sb = {b: rng.gamma(2.0, 1.0, (64, 64, n_layers, n_heads)) for b in "QKVO"}
    sr = {b: rng.gamma(2.0, 1.0, (64, 64, n_layers, n_heads)) for b in "QKVO"}
    for b in "KV":
        sb[b] = np.repeat(sb[b][..., ::3], 3, axis=-1)
        sr[b] = np.repeat(sr[b][..., ::3], 3, axis=-1)
    xr96 = rng.gamma(2.0, 1.0, (96, m))
    times = {"permutations": [], "permutations_unbalanced": [], "test_scores": []}
    with threadpool_limits(limits=threads):
        for _ in range(repeats):
            t0 = time.perf_counter()
            permutation_test_matrix(xb, xr, n_permutations=100_000, seed=1)
            times["permutations"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            permutation_test_matrix(xb, xr96, n_permutations=100_000, seed=1)
            times["permutations_unbalanced"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            QKOVStatistics(n_permutations=100_000, n_bootstrap=1000).test_scores(
                sb, sr, list(range(n_layers)), list(range(n_heads)), kv)
            times["test_scores"].append(time.perf_counter() - t0)
    return dict(cells=m, n_b=64, n_r=64, n_a=64, n_permutations=100_000, n_bootstrap=1000,
                threads=threads, cpu=cpu_model(),
                # the minimum of the repeats: the least disturbed by other processes
                permutations_s=float(np.min(times["permutations"])),
                permutations_unbalanced_s=float(np.min(times["permutations_unbalanced"])),
                test_scores_s=float(np.min(times["test_scores"])))


# ---------------------------------------------------------------------- figures
def qq_figure(panels, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.6))
    for ax, (title, curves) in zip(np.atleast_1d(axes), panels):
        runs = None
        for label, ps, color in curves:
            runs = ps.shape[0]
            expected = (np.arange(1, runs + 1) - 0.5) / runs
            for c in range(ps.shape[1]):
                ax.plot(expected, np.sort(ps[:, c]), color=color, alpha=0.35, lw=0.8,
                        label=label if c == 0 else None)
        lo = 1.0 / runs
        ax.plot([lo, 1], [lo, 1], "k--", lw=1, label="uniform")
        # pointwise 95% band of the k-th order statistic of uniform p-values
        k = np.arange(1, runs + 1)
        ax.fill_between((k - 0.5) / runs, sps.beta.ppf(0.025, k, runs - k + 1),
                        sps.beta.ppf(0.975, k, runs - k + 1), color="0.8", alpha=0.6,
                        label="95% band")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, 1)
        ax.set_ylim(lo / 2, 1)
        ax.set_xlabel("expected p (uniform quantile)")
        ax.set_ylabel("observed p, one curve per cell")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def power_figure(power, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    styles = {"share": "-", "none": ":"}
    colors = ["C0", "C1", "C2"]
    for norm, sweep in power["sweep"].items():
        deltas = [s["delta"] for s in sweep]
        pw = np.array([s["power"] for s in sweep])
        for k, name in enumerate(power["planted"]):
            ax1.plot(deltas, pw[:, k], styles[norm], color=colors[k], marker="o", ms=3,
                     label=f"{name} ({norm})")
        fdp = np.array([s["fdp"] for s in sweep])
        se = np.array([s["fdp_se"] for s in sweep])
        anyf = np.array([s["any_false"] for s in sweep])
        if norm == "share":
            ax2.errorbar(deltas, fdp, yerr=2 * se, fmt="-", marker="o", ms=3, color="k",
                         capsize=2, label="mean FDP (share), +- 2 s.e.")
            ax2.plot(deltas, anyf, "--", marker="s", ms=3, color="0.5",
                     label="share of runs with any false cell (share)")
        else:
            ax2.text(0.03, 0.97, f"disruption_norm='none' (off scale): mean FDP "
                     f"{fdp.mean():.2f},\nabout "
                     f"{np.mean([s['mean_significant'] for s in sweep]):.0f} of "
                     f"{power['n_cells']} cells flagged at every delta",
                     transform=ax2.transAxes, va="top", fontsize=8)
    ax1.axhline(0.9, color="0.6", lw=0.8, ls="--")
    ax1.set_xlabel("extra load on the planted cells of B's gradients (factor 1 + delta)")
    ax1.set_ylabel("power (q <= 0.05 and d >= 0.2)")
    ax1.set_title(f"{power['n_cells']} distinct cells, B 1.5x larger everywhere, "
                  f"{power['runs']} runs/point", fontsize=9)
    ax1.legend(fontsize=7)
    ax2.axhline(ALPHA, color="r", lw=0.8, ls="--", label="fdr_alpha")
    ax2.set_ylim(0, 0.2)
    ax2.set_xlabel("delta")
    ax2.set_ylabel("false discoveries")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------- report
def markdown(cal, power, bench, args):
    lines = [f"Measured by `PYTHONPATH=src .venv/bin/python scripts/simulate_stats.py"
             f"{' --quick' if args.quick else ''} --update-docs` (seed {args.seed}).", ""]
    lines += ["**Calibration** (per cell across independent runs; bound = t + 2 MC s.e.):", "",
              "| design | runs x cells | P(p<=0.01) mean / max | P(p<=0.05) mean / max | "
              "P(p<=0.1) mean / max | checks over bound | any q<=0.05 (bound) | KS: share of "
              "cells with p<0.05 |",
              "|---|---|---|---|---|---|---|---|"]
    for name, s in cal.items():
        r = s["rates"]
        cellsets = " | ".join(f"{r[t]['mean']:.4f} / {r[t]['max']:.4f} (<= {r[t]['bound']:.4f})"
                              for t in THRESHOLDS)
        lines.append(f"| {name} | {s['runs']} x {s['cells']} | {cellsets} | {s['exceed']} of "
                     f"{s['checks']} | {s['familywise']:.3f} ({s['familywise_bound']:.3f}) | "
                     f"{s['ks_share_below_05']:.2f} |")
    lines += ["", f"**Power** ({power['n_cells']} distinct cells, 32 B vs 32 R disruptors, 32 "
              f"task-A samples, B's gradients 1.5x larger everywhere, planted cells "
              f"{', '.join(power['planted'])}, {power['runs']} runs per point; significant = "
              "q <= 0.05 and d >= 0.2):", "",
              "| norm | delta | power per planted cell | mean d of planted | mean FDP (+-s.e.) | "
              "runs with any false cell | mean #significant |", "|---|---|---|---|---|---|---|"]
    for norm, sweep in power["sweep"].items():
        for s in sweep:
            lines.append(f"| {norm} | {s['delta']:.2f} | "
                         f"{', '.join(f'{p:.3f}' for p in s['power'])} | "
                         f"{', '.join(f'{d:.2f}' for d in s['mean_d'])} | {s['fdp']:.3f} "
                         f"(+-{s['fdp_se']:.3f}) | {s['any_false']:.3f} | "
                         f"{s['mean_significant']:.1f} |")
    if bench:
        lines += ["", f"**Speed** on {bench['cpu']}, {bench['threads']} BLAS threads: "
                  f"{bench['n_permutations']:,} permutations x {bench['cells']} cells x "
                  f"({bench['n_b']} + {bench['n_r']}) disruptors: "
                  f"**{bench['permutations_s']:.2f} s** (`permutation_test_matrix`; with 64 + "
                  f"96 disruptors, where the sums of squares need their own GEMM: "
                  f"{bench['permutations_unbalanced_s']:.2f} s); the whole "
                  f"`test_scores` (also {bench['n_a']} task-A samples, {bench['n_bootstrap']} "
                  f"bootstrap draws, effect sizes, BH): **{bench['test_scores_s']:.2f} s** "
                  "(best of 5)."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--update-docs", action="store_true",
                    help="write the numbers into docs/statistics.md")
    args = ap.parse_args()
    warnings.simplefilter("ignore", PermutationResolutionWarning)
    runs_cal = 200 if args.quick else 1000
    runs_mat = 500 if args.quick else 4000
    runs_pow = 50 if args.quick else 200
    FIG_DIR.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    bench = None
    if not args.no_bench:
        print("benchmark ...", flush=True)
        bench = benchmark()
        print(f"  {bench}", flush=True)
    print("calibration: synthetic gradients, B exchangeable with R ...", flush=True)
    ps_syn, aq_syn = calibration_synthetic(runs_cal, args.seed)
    cal = {"exchangeable, synthetic gradients, share (32 B vs 48 R)":
           summarise_calibration(ps_syn, aq_syn)}
    mats = {}
    for (n_b, n_r) in ((48, 144), (100, 300)):
        for stat in ("welch", "mean_diff"):
            print(f"calibration: unequal variances n_B={n_b} n_R={n_r} {stat} ...", flush=True)
            ps, aq = calibration_matrix(runs_mat, args.seed, n_b, n_r, 2.0, stat)
            mats[(n_b, n_r, stat)] = ps
            cal[f"equal means, sd_B = 2 sd_R, n_B={n_b}, n_R={n_r}, {stat}"] = \
                summarise_calibration(ps, aq)
    qq_figure([
        ("B exchangeable with R: synthetic gradients,\n"
         f"{ps_syn.shape[1]} cells, share, Welch ({runs_cal} runs)",
         [("cells (Welch, share)", ps_syn, "C0")]),
        (f"equal means, sd_B = 2 sd_R, n_B=48, n_R=144\n({runs_mat} runs, 4 cells each)",
         [("Welch t", mats[(48, 144, "welch")], "C0"),
          ("mean difference", mats[(48, 144, "mean_diff")], "C3")]),
        (f"equal means, sd_B = 2 sd_R, n_B=100, n_R=300\n({runs_mat} runs, 4 cells each)",
         [("Welch t", mats[(100, 300, "welch")], "C0"),
          ("mean difference", mats[(100, 300, "mean_diff")], "C3")]),
    ], FIG_DIR / "stats_calibration_qq.png")

    print("power sweep ...", flush=True)
    deltas = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6] if not args.quick else [0.0, 0.2, 0.4]
    power = power_sweep(runs_pow, args.seed, deltas)
    power_figure(power, FIG_DIR / "stats_power_curve.png")

    text = markdown(cal, power, bench, args)
    print()
    print(text)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.update_docs:
        doc = DOC.read_text()
        start, end = "<!-- simulate_stats:begin -->", "<!-- simulate_stats:end -->"
        if start not in doc or end not in doc:
            raise SystemExit(f"{DOC} lacks the {start} / {end} markers")
        head, rest = doc.split(start, 1)
        _, tail = rest.split(end, 1)
        DOC.write_text(f"{head}{start}\n{text}\n{end}{tail}")
        print(f"updated {DOC}")
    print(json.dumps({"figures": [str(FIG_DIR / "stats_calibration_qq.png"),
                                  str(FIG_DIR / "stats_power_curve.png")]}))


if __name__ == "__main__":
    main()
