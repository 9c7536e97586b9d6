"""The run summary of one experiment from its saved results: the markdown report
(summary.md) and the control-beside-pair figure. ``doc`` is summary.json's content
(qkov_pipeline.stages.summary assembles it from the analyses' stats, cells and stores)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .._tables import BLOCKS

UNITS = {
    "n_significant": "distinct cells with q <= alpha and Cohen's d >= min_effect_size",
    "n_q_significant": "distinct cells with q <= alpha in the conflict's direction (what the "
                       "FDR guarantee covers)",
    "n_q_opposite": "distinct cells with q <= alpha the other way (B lower: not conflicts)",
    "block_means": "mean QK-OV score M over sample pairs, layers and heads (unitless)",
    "global.ratio": "mean total disruption of B over that of R (unitless)",
    "tasks.mean_tokens": "tokens per sample (attention mask)",
    "tasks.mean_loss": "mean per-sample loss (cross-entropy, nats per token for "
                       "loss_reduction mean)",
    "tasks.mean_grad_norm": "mean L2 norm of g_i over the attention parameters"}
"""summary.json's units of its numbers."""


def summary_metrics(doc: dict) -> dict[str, float]:
    """The summary's numbers flat, for the MLflow parent run."""
    m: dict[str, float] = {}
    for pair, c in doc["control"].items():
        m[f"{pair}.control_n_significant"] = c["control_n_significant"]
    for pair, a in doc["analyses"].items():
        st = a.get("stability") or {}
        for key in ("mean_spearman", "mean_jaccard_significant"):
            if st.get(key) is not None:
                m[f"{pair}.{key}"] = st[key]
    for pair, a in doc["analyses"].items():
        for seed, r in a["seeds"].items():
            key = f"{pair}.split{seed}"
            m[f"{key}.n_significant"] = r["n_significant"]
            m[f"{key}.n_q_significant"] = r["n_q_significant"]
            m[f"{key}.global_ratio"] = r["global"]["ratio"]
            for blk in BLOCKS:
                m[f"{key}.{blk}.n_significant"] = r["n_significant_by_block"].get(blk, 0)
                m[f"{key}.{blk}.mean_score"] = r["block_means"][blk]
    return m


def control_vs_pair(analyses: dict) -> dict:
    """pair -> its significant counts beside its negative control's, per split seed."""
    out = {}
    for pair, a in analyses.items():
        if a["arm"] != "main" or f"{pair}.control" not in analyses:
            continue
        c = analyses[f"{pair}.control"]
        seeds = sorted(set(a["seeds"]) & set(c["seeds"]))
        out[pair] = {
            "n_cells": a["seeds"][seeds[0]]["n_cells"] if seeds else None,
            "pair_n_significant": sum(a["seeds"][k]["n_significant"] for k in seeds),
            "control_n_significant": sum(c["seeds"][k]["n_significant"] for k in seeds),
            "control_n_q_significant": sum(c["seeds"][k]["n_q_significant"] for k in seeds),
            "by_seed": {k: {"pair": a["seeds"][k]["n_significant"],
                            "control": c["seeds"][k]["n_significant"]} for k in seeds},
            "n_seeds": len(seeds)}
    return out


def markdown(doc: dict) -> str:
    lines = [f"# QK-OV interference: experiment `{doc['experiment']}`", "",
             f"Results schema {doc['schema_version']}, config hash `{doc['config_hash']}`.", "",
             "## Significant conflicts", "",
             "A cell is significant when q <= alpha (Benjamini-Hochberg over all distinct cells, "
             "two-sided p-values unless `stats.two_sided` is false), the statistic points the "
             "conflict's way and Cohen's d >= the threshold; \"other way\" counts the cells "
             "with q <= alpha where B puts less there than R (not conflicts). Each pair A vs B "
             "has a negative control A vs A' "
             "(`.control`: B replaced by held-out samples of A, same normaliser) that should "
             "flag about none.", "",
             "| analysis | arm | split seed | cells | q <= alpha | significant | Q | K | V | O "
             "| other way | B/R disruption (p) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for pair, a in doc["analyses"].items():
        for seed, r in sorted(a["seeds"].items()):
            by = r["n_significant_by_block"]
            g = r["global"]
            lines.append(f"| {pair} | {a['arm']} | {seed} | {r['n_cells']} | "
                         f"{r['n_q_significant']} | **{r['n_significant']}** | "
                         + " | ".join(str(by.get(b, 0)) for b in BLOCKS)
                         + f" | {r.get('n_q_opposite', '')} | {g['ratio']:.3g} "
                           f"({g['p_value']:.3g}) |")
    lines += _power_lines(doc)
    lines += _control_section(doc)
    lines += _stability_section(doc)
    lines += _tables_section(doc)
    return "\n".join(lines) + "\n"


UNEVEN_GROUPS = 1.5   # n_R / n_B (or n_B / n_R) from which the summary adds the caution
SMALL_GROUP = 10      # fewer disruptors than this in a group: the small-groups caution


def _power_lines(doc: dict) -> list[str]:
    """One line per analysis and split seed: the Cohen's d this run finds 80% of the time."""
    lines = []
    for pair, a in doc["analyses"].items():
        for seed, r in sorted(a["seeds"].items()):
            pw = r.get("power")
            if pw:
                lines.append(f"- power, {pair} split {seed}: a lone conflicting cell is found "
                             f"with {pw['power']:.0%} probability at Cohen's d >= "
                             f"**{pw['mde_d']:.2f}** ({pw['n_b']} B vs {pw['n_r']} R "
                             f"disruptors, {pw['n_cells']} cells, level {pw['level']:.2g}; "
                             "`scripts/power_plan.py` gives the samples a target d needs)")
    sizes = {(pw["n_b"], pw["n_r"], pw.get("two_sided", False)) for a in doc["analyses"].values()
             for r in a["seeds"].values() if (pw := r.get("power"))}
    uneven = sorted((b, r) for b, r, two in sizes
                    if not two and max(b, r) >= UNEVEN_GROUPS * min(b, r))
    if uneven:
        lines.append(f"- unequal groups with one-sided p-values "
                     f"({', '.join(f'{b} B vs {r} R' for b, r in uneven)}): of the 24 designs on "
                     "which the cell test was calibrated, the one-sided test failed one, by a "
                     "little, with unequal groups (48 B vs 144 R, B twice as spread as R, "
                     "right-skewed: a false cell in 6.5% of runs against a bound of 6.4%); "
                     "the two-sided default held on all 24 (docs/statistics.md)")
    small = sorted((b, r) for b, r, _ in sizes if min(b, r) < SMALL_GROUP)
    if small:
        lines.append(f"- small groups ({', '.join(f'{b} B vs {r} R' for b, r in small)}): "
                     f"below {SMALL_GROUP} disruptors per group the cell test is outside what "
                     "was calibrated; at 8 B vs 32 R with B three times as spread and "
                     "right-skewed shares it claimed cells at 1.4-1.5 times the nominal rate "
                     "at p <= 0.005 even with two-sided p-values (docs/statistics.md)")
    return ["", "Minimal detectable effect (docs/statistics.md, Power):", ""] + lines \
        if lines else []


def _control_section(doc: dict) -> list[str]:
    lines: list[str] = []
    if doc.get("control"):
        lines += ["", "## Negative control", "",
                  "The control A vs A' replaces B by held-out samples of A, with the same "
                  "normaliser and reference; nothing task-specific separates A' from R, so it "
                  "should flag about no cell. If it flags many, something other than task "
                  "content (length, scale, the split) drives the pair's cells too.", "",
                  "| pair | split seeds | pair: significant | control: significant | "
                  "control: q <= alpha | verdict |", "|---|---|---|---|---|---|"]
        for pair, c in doc["control"].items():
            n = c["control_n_significant"]
            verdict = ("ok: the control flags no cell" if n == 0 else
                       f"CHECK: the control flags {n} cell(s) over {c['n_seeds']} seed(s)")
            lines.append(f"| {pair} | {c['n_seeds']} | {c['pair_n_significant']} | {n} | "
                         f"{c['control_n_q_significant']} | {verdict} |")
    return lines


def _stability_section(doc: dict) -> list[str]:
    lines: list[str] = []
    stab = [(pair, a["stability"]) for pair, a in doc["analyses"].items()
            if (a.get("stability") or {}).get("n_seeds", 1) > 1]
    if stab:
        lines += ["", "## Replication across split seeds", "",
                  "Spearman rank correlation of the layer x head maps between split seeds "
                  "(mean over seed pairs), Jaccard overlap of the significant sets, and how many "
                  "cells all seeds flag (`cells.csv`: `n_seeds_significant`; figure: "
                  "`figures/stability.png`).", "",
                  "| analysis | seeds | " + " | ".join(f"rho {b}" for b in BLOCKS)
                  + " | Jaccard | flagged by all seeds | by at least one |",
                  "|---|---|" + "---|" * len(BLOCKS) + "---|---|---|"]
        for pair, st in stab:
            n = st["n_seeds"]
            by = st["n_cells_flagged_by"]
            jac = st.get("mean_jaccard_significant")
            lines.append(f"| {pair} | {n} | "
                         + " | ".join(f"{st.get(f'mean_spearman_{b}', float('nan')):.2f}"
                                      for b in BLOCKS)
                         + f" | {'n/a' if jac is None or jac != jac else f'{jac:.2f}'} | "
                         f"{by.get(str(n), 0)} | {sum(v for k, v in by.items() if k != '0')} |")
    return lines


def _tables_section(doc: dict) -> list[str]:
    lines = ["", "## Mean QK-OV score per block", "",
              "| analysis | split seed | " + " | ".join(BLOCKS) + " |",
              "|---|---|" + "---|" * len(BLOCKS)]
    for pair, a in doc["analyses"].items():
        for seed, r in sorted(a["seeds"].items()):
            lines.append(f"| {pair} | {seed} | "
                         + " | ".join(f"{r['block_means'][b]:.4g}" for b in BLOCKS) + " |")
    lines += ["", "## Tasks: what differs besides content", "",
              "| task | split seed | role | samples | mean tokens | mean loss | mean gradient norm |",
              "|---|---|---|---|---|---|---|"]
    for task, seeds in doc["tasks"].items():
        for seed, roles in sorted(seeds.items()):
            for role, r in roles.items():
                norm = "" if r.get("mean_grad_norm") is None else f"{r['mean_grad_norm']:.4g}"
                lines.append(f"| {task} | {seed} | {role} | {r['n']} | {r['mean_tokens']:.1f} | "
                             f"{r['mean_loss']:.4f} | {norm} |")
    lines += ["", "## Files", ""]
    if doc.get("figures"):
        lines.append("- negative control beside each pair: "
                     + ", ".join(f"`{f}`" for f in doc["figures"]))
    for pair, a in doc["analyses"].items():
        lines.append(f"- `{pair}`: `{a.get('cells_csv')}`; figures: "
                     + ", ".join(f"`{f}`" for f in a.get("figures", []) if f.endswith(".png")))
    validated = [(pair, seed, v) for pair, a in doc["analyses"].items()
                 for seed, v in sorted((a.get("validation") or {}).items())]
    if validated:
        from ..validation.report import verdict_lines

        lines += ["", "## Counterfactual validation: does a flagged cell matter?", "",
                  "Each cell alone was moved along task B's mean gradient and task A's held-out "
                  "loss measured (docs/interpreting.md). Spearman rho of each score with that "
                  "change across cells (interval: bootstrap over cells), against baselines that "
                  "need no map; then fine-tuning on B with the map's top cells frozen against "
                  "matched random cells (`figures/validation_*.png`).", ""]
        for pair, seed, v in validated:
            lines += verdict_lines(pair, seed, v)
    warn = [(pair, w) for pair, a in doc["analyses"].items()
            for r in a["seeds"].values() for w in (r.get("warnings") or [])]
    if warn:
        lines += ["", "## Warnings", ""] + [f"- {pair}: {w}" for pair, w in warn]
    return lines


def control_figure(doc: dict, out_dir: Path) -> list[Path]:
    """``control_vs_pair.{png,csv}``: per pair, significant cells per block (summed over split
    seeds) of the pair and of its negative control, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from . import style

    rows = []
    for pair, c in doc["control"].items():
        for arm, name in (("pair", pair), ("control", f"{pair}.control")):
            seeds = doc["analyses"][name]["seeds"]
            for blk in BLOCKS:
                rows.append({"pair": pair, "arm": arm, "block": blk, "n_seeds": len(seeds),
                             "n_cells": sum((r.get("n_cells_by_block") or {}).get(blk, 0)
                                            for r in seeds.values()),
                             "n_significant": sum(r["n_significant_by_block"].get(blk, 0)
                                                  for r in seeds.values()),
                             "n_q_significant": sum(r["n_q_significant_by_block"].get(blk, 0)
                                                    for r in seeds.values())})
    if not rows:
        return []
    table = pd.DataFrame(rows)
    pairs = list(doc["control"])
    with style.context():
        fig, axes = style.new_figure(3.2 * len(pairs), 2.4, ncols=len(pairs), squeeze=False)
        for ax, pair in zip(axes[0], pairs):
            sub = table[table["pair"] == pair]
            x = np.arange(len(BLOCKS))
            for k, (arm, colour) in enumerate((("pair", style.OKABE_ITO[0]),
                                               ("control", style.OKABE_ITO[1]))):
                vals = sub[sub["arm"] == arm].set_index("block").loc[list(BLOCKS), "n_significant"]
                bars = ax.bar(x + (k - 0.5) * 0.38, vals.to_numpy(), 0.38, color=colour,
                              label="A vs B" if arm == "pair" else "control A vs A'")
                ax.bar_label(bars, fontsize=6)
            n_seeds = int(sub["n_seeds"].iloc[0])
            cells = sub[sub["arm"] == "pair"].set_index("block").loc[list(BLOCKS), "n_cells"]
            ax.set_xticks(x, [f"{b}\n{int(n) // max(n_seeds, 1)} cells" for b, n in
                              zip(BLOCKS, cells)])
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("significant cells" + (f" (sum of {n_seeds} seeds)" if n_seeds > 1 else ""))
            ax.set_title(pair.replace("__", " vs "))
            ax.legend(frameon=False)
        paths = style.save_figure(fig, out_dir / "control_vs_pair", formats=("png",))
    paths.append(style.write_csv(out_dir / "control_vs_pair.csv", table))
    return paths
