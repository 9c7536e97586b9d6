"""Calibration harness of the cell test at Benjamini-Hochberg tails (issue 17).

    PYTHONPATH=src .venv/bin/python scripts/calibrate_stats.py grid        # rank test, 24 designs
    PYTHONPATH=src .venv/bin/python scripts/calibrate_stats.py grid --test bm_edgeworth
    PYTHONPATH=src .venv/bin/python scripts/calibrate_stats.py moments     # Edgeworth terms
    PYTHONPATH=src .venv/bin/python scripts/calibrate_stats.py production --test welch \\
        --designs "48/144, sd ratio 2, heavy"                              # exact production path
    PYTHONPATH=src .venv/bin/python scripts/calibrate_stats.py coverage    # bootstrap intervals
    PYTHONPATH=src .venv/bin/python scripts/calibrate_stats.py small       # groups of 8-16
    PYTHONPATH=src .venv/bin/python scripts/calibrate_stats.py report --update-docs

Each measurement appends its rows (with the command and its runtime) to
benchmarks/calibration/results.json; ``report`` draws docs/figures/stats_calibration_grid.png
and writes the tables between the "calibrate_stats" markers of docs/statistics.md.

Designs (interference.stats.simulate): 720 cells in 30 layers of 24, latent correlation 0.3
within a layer, group sizes 48/48 and 48/144, sd ratio B/R 1/2, 1, 2, shapes normal, heavy
(Tukey h), right- and left-skewed (log-normal); each test is run on the designs where ITS
null holds at the unplanted cells (equal means for welch, AUC 1/2 for brunner_munzel; the
same designs for symmetric shapes and ratio 1). Null runs: no planted cell; planted runs: 5
cells at Cohen's d 0.6 and 5 at d 1.0 (in different layers).

Methods:
- ``production``: p-values from permutation_test_matrix with the default N = 28,800 (what
  QKOVStatistics.test_disruption calls), q from bh_qvalues.
- ``reference`` (rank tests only: the default, and bm_edgeworth, the rejected Hall-corrected
  candidate of interference.stats.edgeworth): a rank test's permutation null does not
  depend on the data when a cell has no ties (interference.stats.rank), so one reference
  sample of 10^6 relabellings per pair of group sizes, drawn by the production mask code,
  serves every run: p = (1 + #{T* >= T}) / (1 + 10^6), T by the same statistic code. It
  is the production p-value with less Monte Carlo noise (the designs are continuous: no
  ties).
"""
from __future__ import annotations

import argparse
import json
import os
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from interference.stats import bh_qvalues, permutation_test_matrix  # noqa: E402
from interference.stats.permutation import _random_masks, extremeness  # noqa: E402
from interference.stats.edgeworth import (edgeworth_z, hall_z, skewness_terms,  # noqa: E402
                                          sorted_labels)
from interference.stats.rank import brunner_munzel_z, null_statistics  # noqa: E402
from interference.stats.simulate import SHAPES, Design, b_location, draw  # noqa: E402

RESULTS = Path(os.environ.get("CALIBRATION_RESULTS",
                              ROOT / "benchmarks" / "calibration" / "results.json"))
FIG = ROOT / "docs" / "figures" / "stats_calibration_grid.png"
DOC = ROOT / "docs" / "statistics.md"
ALPHA, M, N_PERM = 0.05, 720, 28_800
ALTERNATIVE = {1: "greater", 2: "two-sided"}    # --sides -> permutation_test_matrix's
PLANTED = {24 * 3 * k + 5: (0.6 if k < 5 else 1.0) for k in range(10)}
NULL_OF = {"brunner_munzel": "auc", "bm_edgeworth": "auc", "welch": "mean",
           "mean_diff": "mean"}
# rank-only statistics: (null of tie-free relabellings, observed statistic) for ``reference``
RANK_TESTS = {
    "brunner_munzel": (lambda masks, n_b: null_statistics(masks, (1,) * masks.shape[1], n_b),
                       brunner_munzel_z),
    "bm_edgeworth": (hall_z, edgeworth_z)}


def grid(test: str) -> list[Design]:
    return [Design(nb, nr, ratio, shape, rho=0.3, null=NULL_OF[test])
            for nb, nr in ((48, 48), (48, 144)) for ratio in (0.5, 1.0, 2.0)
            for shape in SHAPES]


def reference_null(test: str, n_b: int, n_r: int, n_draws: int, seed: int) -> np.ndarray:
    """Sorted statistics of n_draws random relabellings of tie-free ranks (production
    mask code; the test's own null code)."""
    rng = np.random.default_rng([seed, n_b, n_r])
    out = []
    while n_draws > 0:
        b = min(n_draws, 20_000)
        n_draws -= b
        out.append(RANK_TESTS[test][0](_random_masks(rng, b, n_b + n_r, n_b), n_b))
    return np.sort(np.concatenate(out))


def pvalues(test: str, method: str, x_b, x_r, ref, seed, sides: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(p [m], T [m]): one-sided (upper tail) or two-sided (|T*| >= |T|) p-values; ``ref``
    holds the reference null's sorted extremeness under that alternative."""
    if method == "reference":
        t = RANK_TESTS[test][1](x_b, x_r)
        u = extremeness(t, ALTERNATIVE[sides])
        return (1.0 + ref.size - np.searchsorted(ref, u - 100 * np.finfo(float).eps * abs(u),
                                                 "left")) / (1.0 + ref.size), t
    res = permutation_test_matrix(x_b, x_r, statistic=test, n_permutations=N_PERM, seed=seed,
                                  alternative=ALTERNATIVE[sides])
    return res.pvalue, res.statistic


def run_design(test: str, method: str, design: Design, runs: int, seed: int, ref,
               sides: int = 1) -> dict:
    """Null and planted runs of one design -> the row of the table. A cell is claimed when
    q <= alpha and T > 0 (B higher: a conflict); with ``sides=2`` the p-values are
    two-sided, so BH runs on them and only the claims in B's direction count."""
    loc = b_location(design.shape, design.ratio, design.null)
    planted = np.zeros(M, dtype=bool)
    planted[list(PLANTED)] = True
    d_of = np.array([PLANTED[c] for c in sorted(PLANTED)])
    anyq, tail_bh, tail_01 = np.zeros(runs, bool), np.zeros(runs), np.zeros(runs)
    tail_bh_both = np.zeros(runs)
    fdp, found = np.zeros(runs), np.zeros((runs, len(PLANTED)))
    t0 = time.perf_counter()
    for r, child in enumerate(np.random.SeedSequence([seed, runs]).spawn(runs)):
        rng = np.random.default_rng(child)
        p, t = pvalues(test, method, *draw(design, rng, M, loc=loc), ref, rng, sides)
        claimed = (bh_qvalues(p) <= ALPHA) & (t > 0)
        anyq[r] = np.any(claimed)
        tail_bh[r] = np.mean((p <= ALPHA / M) & (t > 0))
        tail_bh_both[r] = np.mean(p <= ALPHA / M)
        tail_01[r] = np.mean((p <= 0.01) & (t > 0))
        p, t = pvalues(test, method, *draw(design, rng, M, planted=PLANTED, loc=loc), ref,
                       rng, sides)
        sig = (bh_qvalues(p) <= ALPHA) & (t > 0)
        fdp[r] = (sig & ~planted).sum() / max(int(sig.sum()), 1)
        found[r] = sig[sorted(PLANTED)]
    return dict(test=test, method=method, sides=sides, design=design.label, n_b=design.n_b,
                n_r=design.n_r, ratio=design.ratio, shape=design.shape, null=design.null,
                runs=runs, any_discovery=float(anyq.mean()),
                any_se=float(math.sqrt(max(anyq.mean() * (1 - anyq.mean()), 1e-12) / runs)),
                tail_bh_ratio=float(tail_bh.mean() / (ALPHA / M)),
                tail_bh_both=float(tail_bh_both.mean() / (ALPHA / M)),
                tail_01=float(tail_01.mean()), fdp=float(fdp.mean()),
                fdp_se=float(fdp.std(ddof=1) / math.sqrt(runs)),
                power_06=float(found[:, d_of == 0.6].mean()),
                power_10=float(found[:, d_of == 1.0].mean()),
                seconds=round(time.perf_counter() - t0, 1))


def save(rows: list[dict], command: str, seconds: float) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    def key(r):
        return (r["kind"], r.get("test"), r.get("method"), r.get("sides", 1),
                r.get("design"), r.get("n_a"), r.get("seed", 17), r.get("runs"),
                r.get("cells"))

    keys = {key(r) for r in rows}
    old = [r for r in old if key(r) not in keys]
    for r in rows:
        r["command"], r["command_seconds"] = command, round(seconds, 1)
    RESULTS.write_text(json.dumps(old + rows, indent=1))


def cmd_grid(args, command: str) -> None:
    t0 = time.perf_counter()
    rows = []
    designs = [d for d in grid(args.test) if not args.designs or d.label in args.designs]
    refs = {}
    for d in designs:
        if args.method == "reference" and (d.n_b, d.n_r) not in refs:
            ref = reference_null(args.test, d.n_b, d.n_r, args.reference_draws, args.seed)
            refs[(d.n_b, d.n_r)] = np.sort(extremeness(ref, ALTERNATIVE[args.sides]))
        row = run_design(args.test, args.method, d, args.runs, args.seed,
                         refs.get((d.n_b, d.n_r)), args.sides)
        row["kind"], row["seed"] = "grid", args.seed
        rows.append(row)
        print(json.dumps(row), flush=True)
    save(rows, command, time.perf_counter() - t0)


def cmd_small(args, command: str) -> None:
    """Small groups, outside the grid: B three times as spread as R, right-skewed shares,
    n_R = 4 n_B, independent cells (AUC null at every cell): per seed, the rate of cells
    claimed (p <= t, T > 0) with one- and two-sided p-values, at t = 0.01 and 0.005, from
    permutation_test_matrix with args.perms relabellings (rank test, production path)."""
    t0 = time.perf_counter()
    rows = []
    for n_b in args.n_b:
        design = Design(n_b, 4 * n_b, 3.0, "right", rho=0.0, null="auc")
        loc = b_location("right", 3.0, "auc")
        for seed in range(args.seeds):
            x_b, x_r = draw(design, np.random.default_rng(seed), args.cells, loc=loc)
            row = dict(kind="small", design=design.label, n_b=n_b, n_r=4 * n_b,
                       cells=args.cells, perms=args.perms, seed=seed)
            for sides in (1, 2):
                res = permutation_test_matrix(
                    x_b, x_r, statistic="brunner_munzel", n_permutations=args.perms,
                    seed=seed, alternative=ALTERNATIVE[sides])
                for t in (0.01, 0.005):
                    row[f"sides{sides}_{t}"] = float(
                        np.mean((res.pvalue <= t) & (res.statistic > 0)) / t)
            rows.append(row)
            print(json.dumps(row), flush=True)
    save(rows, command, time.perf_counter() - t0)


def cmd_moments(args) -> None:
    """The Edgeworth terms of W on one design, independent cells (rho = 0): simulated mean
    and third cumulant of W against their n^-1/2 predictions -K_V/2 and K_D - 3 K_V, the
    per-cell spread of the estimates, and the third cumulant of the default's z beside that
    of its permutation null (10^6 tie-free relabellings)."""
    from scipy.stats import kstat

    from interference.stats.rank import z_score

    design = next(d for d in grid("brunner_munzel") if d.label == args.design)
    design = Design(design.n_b, design.n_r, design.ratio, design.shape, 0.0, "auc")
    loc = b_location(design.shape, design.ratio, "auc")
    rng = np.random.default_rng(args.seed)
    w, df, k_d, k_v = np.concatenate([np.stack(skewness_terms(sorted_labels(
        *draw(design, rng, M, loc=loc)), design.n_b)) for _ in range(args.runs)], axis=1)
    null = reference_null("brunner_munzel", design.n_b, design.n_r, 1_000_000, args.seed)
    z = z_score(w, df)
    print(f"{args.design}: {w.size} cells\n  E W {w.mean():.4f} (s.e. "
          f"{w.std() / np.sqrt(w.size):.4f}), predicted -K_V/2 = {-k_v.mean() / 2:.4f}\n"
          f"  kappa3(W) {kstat(w, 3):.4f} (s.e. ~{np.sqrt(6 / w.size):.4f}), predicted "
          f"K_D - 3 K_V = {(k_d - 3 * k_v).mean():.4f}\n  per-cell estimates: K_D "
          f"{k_d.mean():.4f} +- {k_d.std():.4f}, K_V {k_v.mean():.4f} +- {k_v.std():.4f}\n"
          f"  default z: kappa3 {kstat(z, 3):.4f}, quantile 0.999 {np.quantile(z, 0.999):.3f}"
          f"; its permutation null: kappa3 {kstat(null, 3):.4f}, quantile 0.999 "
          f"{np.quantile(null, 0.999):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("grid", "production"):
        p = sub.add_parser(name)
        p.add_argument("--test", default="brunner_munzel", choices=sorted(NULL_OF))
        p.add_argument("--runs", type=int, default=200)
        p.add_argument("--designs", nargs="*", default=None, help="design labels to run")
        p.add_argument("--seed", type=int, default=17)
        p.add_argument("--reference-draws", type=int, default=1_000_000)
        p.add_argument("--sides", type=int, default=1, choices=(1, 2),
                       help="1: upper-tail p-values (the default test); 2: two-sided "
                            "p-values, claims in B's direction only")
    c = sub.add_parser("coverage")
    c.add_argument("--runs", type=int, default=400)
    c.add_argument("--seed", type=int, default=17)
    mo = sub.add_parser("moments")
    mo.add_argument("--design", default="48/144, sd ratio 2, right")
    mo.add_argument("--runs", type=int, default=150)
    mo.add_argument("--seed", type=int, default=9)
    sm = sub.add_parser("small")
    sm.add_argument("--n-b", type=int, nargs="*", default=[8, 10, 12, 16])
    sm.add_argument("--seeds", type=int, default=4)
    sm.add_argument("--cells", type=int, default=40_000)
    sm.add_argument("--perms", type=int, default=40_000)
    r = sub.add_parser("report")
    r.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    command = "PYTHONPATH=src .venv/bin/python scripts/calibrate_stats.py " + " ".join(
        a if " " not in a else repr(a) for a in sys.argv[1:])
    if args.cmd in ("grid", "production"):
        args.method = "reference" if args.cmd == "grid" else "production"
        if ((args.method == "reference" and args.test not in RANK_TESTS)
                or (args.method == "production" and args.test == "bm_edgeworth")):
            raise SystemExit("grid (the reference method) is for the rank tests only, "
                             "production for those QKOVStatistics offers")
        cmd_grid(args, command)
    elif args.cmd == "small":
        cmd_small(args, command)
    elif args.cmd == "moments":
        cmd_moments(args)
    elif args.cmd == "coverage":
        from coverage_stats import cmd_coverage  # noqa: E402  (scripts/ is on sys.path)
        cmd_coverage(args, command, save)
    else:
        from calibration_report import cmd_report  # noqa: E402
        cmd_report(args, RESULTS, FIG, DOC)


if __name__ == "__main__":
    main()
