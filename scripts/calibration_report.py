"""Tables and figure of the calibration harness (``scripts/calibrate_stats.py report``):
benchmarks/calibration/results.json -> markdown (printed; with --update-docs written between
the "calibrate_stats" markers of docs/statistics.md) and docs/figures/stats_calibration_grid.png.
"""
from __future__ import annotations

import math

ALPHA = 0.05
START, END = "<!-- calibrate_stats:begin -->", "<!-- calibrate_stats:end -->"


def _bound(runs: int) -> float:
    return ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / runs)


def test_label(r: dict) -> str:
    """The test of a row; the rank tests say which p-values went into BH."""
    if r["test"] == "welch" or r["test"] == "mean_diff":
        return r["test"]
    return f"{r['test']}, {'two' if r.get('sides', 1) == 2 else 'one'}-sided"


def grid_table(rows: list[dict]) -> list[str]:
    lines = ["| design (B/R sizes, sd ratio B/R, shape) | test | method, seed | null at unplanted "
             "cells | runs | any q <= 0.05 (bound) | P(p <= alpha/m) / (alpha/m) | either "
             "direction | P(p <= 0.01) | mean FDP +- s.e. (planted) | power d=0.6 | "
             "power d=1 | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["test"], -r.get("sides", 1), r["method"], r["n_r"],
                                         r["ratio"], r["shape"], r["runs"])):
        b = _bound(r["runs"])
        ok = "ok" if r["any_discovery"] <= b else "**over**"
        fdp_ok = "" if r["fdp"] <= ALPHA + 2 * r["fdp_se"] else " **over**"
        both = f"{r['tail_bh_both']:.2f}" if r.get("sides", 1) == 2 and "tail_bh_both" in r \
            else ""
        lines.append(
            f"| {r['design']} | {test_label(r)} | {r['method']}, {r.get('seed', 17)} | "
            f"{r['null']} | {r['runs']} | "
            f"{r['any_discovery']:.3f} ({b:.3f}, {ok}) | {r['tail_bh_ratio']:.2f} | "
            f"{both} | "
            f"{r['tail_01']:.4f} | {r['fdp']:.3f} +- {r['fdp_se']:.3f}{fdp_ok} | "
            f"{r['power_06']:.2f} | {r['power_10']:.2f} | {r['seconds']:.0f} |")
    return lines


def coverage_table(rows: list[dict]) -> list[str]:
    lines = ["| interval | task-A samples n_a | runs x cells | level | coverage | per cell "
             "min - max | misses with the interval above the truth |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["n_a"])):
        miss = r.get("misses_above_truth")
        lines.append(f"| {r['method']} | {r['n_a']} | {r['runs']} x {r['cells']} | "
                     f"{r['level']:.5g} | {r['coverage']:.4f} | {r['min_cell']:.3f} - "
                     f"{r['max_cell']:.3f} | {'' if miss is None else f'{miss:.2f}'} |")
    return lines


def small_table(rows: list[dict]) -> list[str]:
    """Rate of claimed cells / t for one- and two-sided p-values, per design and seed."""
    lines = ["| design (B/R sizes, sd ratio B/R, shape) | seed | cells | one-sided, t = 0.01 | "
             "t = 0.005 | two-sided, t = 0.01 | t = 0.005 | bound at 0.01 / 0.005 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["n_b"], r["seed"])):
        b = [1 + 3 * math.sqrt((1 - t) / (t * r["cells"])) for t in (0.01, 0.005)]
        cell = [f"{r[k]:.2f}" + (" **over**" if r[k] > b[i % 2] else "") for i, k in
                enumerate(("sides1_0.01", "sides1_0.005", "sides2_0.01", "sides2_0.005"))]
        lines.append(f"| {r['design']} | {r['seed']} | {r['cells']} | {' | '.join(cell)} | "
                     f"{b[0]:.2f} / {b[1]:.2f} |")
    return lines


def commands(rows: list[dict]) -> list[str]:
    seen = {}
    for r in rows:
        seen.setdefault(r["command"], r["command_seconds"])
    return [f"- `{c}` ({s:.0f} s wall on the shared 2-core machine)" for c, s in seen.items()]


def figure(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = [r for r in rows if r["kind"] == "grid"]
    labels = sorted({r["design"] for r in grid},
                    key=lambda d: next((r["n_r"], r["ratio"], r["shape"]) for r in grid
                                       if r["design"] == d))
    x = np.arange(len(labels))
    fig, (ax1, ax3, ax2) = plt.subplots(3, 1, figsize=(14, 10), sharex=True)
    top = 0.16                          # y limit of the error panels; higher values marked
    styles = {("brunner_munzel", "reference", 2): ("C0", "o", "rank test, two-sided p "
                                                             "(default; reference null)"),
              ("brunner_munzel", "reference", 1): ("C4", "v", "rank test, one-sided p "
                                                             "(reference null)"),
              ("brunner_munzel", "production", 2): ("C2", "D", "rank test, two-sided p "
                                                              "(production path)"),
              ("bm_edgeworth", "reference", 1): ("C1", "^", "rank test + Hall correction "
                                                             "(candidate, rejected)"),
              ("welch", "production", 1): ("C3", "s", "Welch t, former default (production)")}
    for (test, method, sides), (colour, marker, name) in styles.items():
        sub = {r["design"]: r for r in grid if r["test"] == test and r["method"] == method
               and r.get("sides", 1) == sides and r.get("seed", 17) == 17}
        if not sub:
            continue
        idx = [k for k, d in enumerate(labels) if d in sub]
        rs = [sub[labels[k]] for k in idx]
        for ax, key, se in ((ax1, "any_discovery", "any_se"), (ax3, "fdp", "fdp_se")):
            val = np.array([r[key] for r in rs])
            low = val <= top
            ax.errorbar(np.array(idx)[low], val[low], yerr=2 * np.array([r[se] for r in rs])[low],
                        fmt=marker, color=colour, ms=4, capsize=2, label=name)
            for k in np.flatnonzero(~low):
                ax.annotate(f"{val[k]:.2f}", (idx[k], top), xytext=(idx[k], top * 0.86),
                            color=colour, ha="center", fontsize=7,
                            arrowprops=dict(arrowstyle="->", color=colour))
        ax2.plot(idx, [r["power_06"] for r in rs], marker, color=colour, ms=4,
                 label=f"{name}: d = 0.6")
        ax2.plot(idx, [r["power_10"] for r in rs], marker, color=colour, ms=4, mfc="none",
                 label=f"{name}: d = 1")
    for runs, ls in zip(sorted({r["runs"] for r in grid if r.get("seed", 17) == 17}),
                        ("--", ":", "-.")):
        ax1.axhline(_bound(runs), color="k", ls=ls, lw=0.8,
                    label=f"alpha + 2 MC s.e. ({runs} runs)")
    ax1.axhline(ALPHA, color="0.6", lw=0.8)
    ax3.axhline(ALPHA, color="k", ls="--", lw=0.8, label="alpha (bar: mean FDP <= alpha + 2 s.e.)")
    for ax in (ax1, ax3):
        ax.set_ylim(0, top)
    ax3.set_ylabel("mean FDP, 10 planted cells\n(error bars: 2 s.e.)")
    ax3.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax1.set_ylabel("P(any q <= 0.05), null runs\n(error bars: 2 MC s.e.)")
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax1.set_title("720 cells, latent correlation 0.3 within layers of 24; each test on the "
                  "designs where its null holds (seed 17 rows)", fontsize=9)
    ax2.set_ylabel("power per planted cell\n(BH at 0.05, 10 planted)")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax2.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def cmd_report(args, results_path, fig_path, doc_path) -> str:
    import json

    rows = json.loads(results_path.read_text())
    grid = [r for r in rows if r["kind"] == "grid"]
    cov = [r for r in rows if r["kind"] == "coverage"]
    small = [r for r in rows if r["kind"] == "small"]
    text = "\n".join(
        [f"Measured by the commands below (tables: `scripts/calibrate_stats.py report "
         f"--update-docs`; rows in `{results_path.relative_to(doc_path.parents[1])}`).", ""]
        + commands(rows) + ["", "(Runs made side by side wrote to separate files through the "
                            "CALIBRATION_RESULTS variable and were merged into one.)", "",
                            "**Cell tests** (bound on any discovery: 0.05 + 2 MC s.e.; "
                            "FDP marked when over 0.05 + 2 s.e.; a cell counts when it is "
                            "claimed: q <= 0.05, or p under the rate's threshold, with B "
                            "higher):", ""]
        + grid_table(grid) + ["", "**Bootstrap intervals** of a cell's mean share difference "
                              "(48 + 48 disruptors, 1000 stratified draws):", ""]
        + coverage_table(cov)
        + (["", "**Small groups** (outside the grid; rank test, production path, "
            "independent cells; the rate of cells claimed, p <= t with B higher, divided by t; "
            "bound: 1 + 3 MC s.e.):", ""] + small_table(small) if small else []))
    figure(rows, fig_path)
    print(text)
    if args.update_docs:
        doc = doc_path.read_text()
        if START not in doc or END not in doc:
            raise SystemExit(f"{doc_path} lacks the {START} / {END} markers")
        head, rest = doc.split(START, 1)
        _, tail = rest.split(END, 1)
        doc_path.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    return text
