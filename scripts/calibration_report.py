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


def grid_table(rows: list[dict]) -> list[str]:
    lines = ["| design (B/R sizes, sd ratio B/R, shape) | test | method, seed | null at unplanted "
             "cells | runs | any q <= 0.05 (bound) | P(p <= alpha/m) / (alpha/m) | "
             "P(p <= 0.01) | mean FDP +- s.e. (planted) | power d=0.6 | power d=1 | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["test"], r["method"], r["n_r"], r["ratio"],
                                         r["shape"], r["runs"])):
        b = _bound(r["runs"])
        ok = "ok" if r["any_discovery"] <= b else "**over**"
        fdp_ok = "" if r["fdp"] <= ALPHA + 2 * r["fdp_se"] else " **over**"
        lines.append(
            f"| {r['design']} | {r['test']} | {r['method']}, {r.get('seed', 17)} | "
            f"{r['null']} | {r['runs']} | "
            f"{r['any_discovery']:.3f} ({b:.3f}, {ok}) | {r['tail_bh_ratio']:.2f} | "
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
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(14, 7.5), sharex=True)
    styles = {("brunner_munzel", "reference"): ("C0", "o", "rank test (reference null)"),
              ("brunner_munzel", "production"): ("C2", "D", "rank test (production path)"),
              ("bm_edgeworth", "reference"): ("C1", "^", "rank test + Hall correction "
                                                          "(candidate, rejected)"),
              ("welch", "production"): ("C3", "s", "Welch t, former default (production)")}
    for (test, method), (colour, marker, name) in styles.items():
        sub = {r["design"]: r for r in grid if r["test"] == test and r["method"] == method
               and r.get("seed", 17) == 17}
        if not sub:
            continue
        idx = [k for k, d in enumerate(labels) if d in sub]
        rs = [sub[labels[k]] for k in idx]
        ax1.errorbar(idx, [r["any_discovery"] for r in rs],
                     yerr=[2 * r["any_se"] for r in rs], fmt=marker, color=colour, ms=4,
                     capsize=2, label=name)
        ax2.plot(idx, [r["power_06"] for r in rs], marker, color=colour, ms=4,
                 label=f"{name}: d = 0.6")
        ax2.plot(idx, [r["power_10"] for r in rs], marker, color=colour, ms=4, mfc="none",
                 label=f"{name}: d = 1")
    for runs, ls in zip(sorted({r["runs"] for r in grid if r.get("seed", 17) == 17}),
                        ("--", ":", "-.")):
        ax1.axhline(_bound(runs), color="k", ls=ls, lw=0.8,
                    label=f"alpha + 2 MC s.e. ({runs} runs)")
    ax1.axhline(ALPHA, color="0.6", lw=0.8)
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
    text = "\n".join(
        [f"Measured by the commands below (tables: `scripts/calibrate_stats.py report "
         f"--update-docs`; rows in `{results_path.relative_to(doc_path.parents[1])}`).", ""]
        + commands(rows) + ["", "(Runs made side by side wrote to separate files through the "
                            "CALIBRATION_RESULTS variable and were merged into one.)", "",
                            "**Cell tests** (bound on any discovery: 0.05 + 2 MC s.e.; "
                            "FDP marked when over 0.05 + 2 s.e.):", ""]
        + grid_table(grid) + ["", "**Bootstrap intervals** of a cell's mean share difference "
                              "(48 + 48 disruptors, 1000 stratified draws):", ""]
        + coverage_table(cov))
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
