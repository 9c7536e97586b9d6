"""Figures of the counterfactual validation (interference.validation), from its saved tables.

- ``validation_scatter``: per step rule (rows), the map's scores and the baselines
  (columns) against the measured ΔL_A per cell, coloured by block; the title holds
  Spearman's rho with its bootstrap interval over cells.
- ``validation_precision``: precision@k curves per candidate and step rule, with the
  random expectation k / n.
- ``validation_intervention``: left, forgetting (increase of A's loss) vs learning
  (decrease of B's loss) per arm and k, mean over seeds with the range over seeds and
  draws; right, the test: top-k and bottom-k minus the matched random draws per k, with
  the bootstrap interval and the permutation p (``compare_arms``).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import style

SCATTER_CANDIDATES = ("mean_M[qkov]", "mean_M[signed]", "effect_size", "grad_share", "first_order")
ARM_MARKERS = {"none": "o", "top": "v", "bottom": "^", "random": "."}


def _label(name: str) -> str:
    return {"mean_M[qkov]": "map mean M (qkov)", "mean_M[signed]": "map mean M (signed, negated)",
            "effect_size": "map effect size d",
            "grad_share": "baseline: B's gradient share", "first_order": "baseline: first order",
            "overlap": "baseline: |g_A||g_B| overlap", "random": "random"}.get(name, name)


def scatter(cells: pd.DataFrame, validity: pd.DataFrame, stem: str | Path, title: str,
            candidates=SCATTER_CANDIDATES) -> list[Path]:
    """Score vs ΔL_A per cell for each (step rule, candidate)."""
    rules = list(dict.fromkeys(cells["step_rule"]))
    cands = [c for c in candidates if c in cells.columns]
    with style.context():
        fig, axes = style.new_figure(2.2 * len(cands), 2.0 * len(rules) + 0.3,
                                     nrows=len(rules), ncols=len(cands), squeeze=False)
        for r, rule in enumerate(rules):
            sub = cells[cells["step_rule"] == rule]
            val = validity[validity["step_rule"] == rule].set_index("candidate")
            for c, cand in enumerate(cands):
                ax = axes[r][c]
                for block in style.BLOCKS:
                    b = sub[sub["block"] == block]
                    ax.scatter(b[cand], b["delta_loss_a"], s=6, alpha=0.7, lw=0,
                               color=style.BLOCK_COLOURS[block], label=block)
                ax.axhline(0, color="0.6", lw=0.5)
                v = val.loc[cand]
                ax.set_title(f"{_label(cand)}\nρ = {v['rho']:.2f} "
                             f"[{v['rho_cells_low']:.2f}, {v['rho_cells_high']:.2f}]")
                ax.set_xlabel("score (larger = more harm predicted)")
                if c == 0:
                    ax.set_ylabel(f"ΔL_A (nats), step rule {rule}")
        axes[0][0].legend(title="block", markerscale=2, frameon=False)
        fig.suptitle(title)
        return style.save_figure(fig, stem)


def precision(curves: pd.DataFrame, stem: str | Path, title: str) -> list[Path]:
    """precision@k per candidate (lines) and step rule (panels)."""
    rules = list(dict.fromkeys(curves["step_rule"]))
    with style.context():
        fig, axes = style.new_figure(3.2 * len(rules), 2.6, ncols=len(rules), squeeze=False)
        for r, rule in enumerate(rules):
            ax = axes[0][r]
            sub = curves[curves["step_rule"] == rule]
            n = int(sub["k"].max())
            for k, (cand, g) in enumerate(sub.groupby("candidate", sort=False)):
                base = cand.startswith(("grad_share", "overlap", "first_order", "random"))
                ax.plot(g["k"], g["precision"], lw=1.0, ls="--" if base else "-",
                        color=style.OKABE_ITO[k % len(style.OKABE_ITO)], label=_label(cand))
            ax.plot([1, n], [1 / n, 1], color="0.5", lw=0.8, ls=":", label="random (k / n)")
            ax.set_xscale("log")
            ax.set_xlabel("k (top cells)")
            ax.set_ylabel("precision@k")
            ax.set_title(f"step rule {rule}")
        axes[0][-1].legend(fontsize=5, frameon=False, loc="lower right")
        fig.suptitle(title)
        return style.save_figure(fig, stem)


def intervention(arms: pd.DataFrame, stem: str | Path, title: str,
                 comparison: pd.DataFrame | None = None) -> list[Path]:
    """Forgetting vs learning per arm and k (mean over seeds; bars: range); beside it, with
    ``comparison`` (compare_arms' rows), each arm minus random per k (bars: interval)."""
    with style.context():
        both = comparison is not None and not comparison.empty and not arms.empty
        fig, axes = style.new_figure(8.0 if both else 4.2, 3.0, ncols=2 if both else 1,
                                     squeeze=False)
        ax = axes[0, 0]
        if both:
            _differences(axes[0, 1], comparison)
        if arms.empty:
            ax.text(0.5, 0.5, "intervention not run (validation.intervention: false)",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            return style.save_figure(fig, stem)
        fractions = sorted(f for f in arms["fraction"].unique() if f > 0)
        colours = dict(zip(fractions, style.OKABE_ITO[1:]))
        for (arm, f), g in arms.groupby(["arm", "fraction"]):
            x, y = g["learning"].to_numpy(), g["forgetting"].to_numpy()
            colour = "0.2" if arm == "none" else colours[f]
            label = "nothing frozen" if arm == "none" else f"{arm} {f:g}"
            ax.errorbar(x.mean(), y.mean(), xerr=[[x.mean() - x.min()], [x.max() - x.mean()]],
                        yerr=[[y.mean() - y.min()], [y.max() - y.mean()]], lw=0.7,
                        marker=ARM_MARKERS[arm], ms=6 if arm != "random" else 9,
                        color=colour, label=label)
        ax.set_xlabel("learning: decrease of B's held-out loss (nats)")
        ax.set_ylabel("forgetting: increase of A's held-out loss (nats)")
        ax.legend(fontsize=5, frameon=False, ncol=2)
        ax.set_title(title)
        return style.save_figure(fig, stem)


def _differences(ax, comparison: pd.DataFrame) -> None:
    """Per k: forgetting of the top (bottom) arm minus the random draws' mean, with the
    bootstrap interval; p = the one-sided permutation p that the arm forgets less."""
    fractions = sorted(comparison["fraction"].unique())
    shift = {"top": -0.12, "bottom": 0.12}
    for arm, g in comparison.groupby("arm", sort=False):
        g = g.set_index("fraction").loc[[f for f in fractions if f in set(g["fraction"])]]
        x = [fractions.index(f) + shift.get(arm, 0.0) for f in g.index]
        y = g["diff"].to_numpy()
        ax.errorbar(x, y, yerr=[y - g["diff_low"].to_numpy(), g["diff_high"].to_numpy() - y],
                    ls="none", lw=0.9, capsize=2, marker=ARM_MARKERS.get(arm, "o"), ms=6,
                    color=style.OKABE_ITO[1 if arm == "top" else 2], label=f"{arm} - random")
        for xi, (_, r) in zip(x, g.iterrows()):
            ax.annotate(f"p {r['p_value']:.2g}", (xi, r["diff_high"]), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=5)
    ax.axhline(0.0, color="0.5", lw=0.6)
    ax.set_xticks(range(len(fractions)))
    k = comparison.groupby("fraction")["k"].first()
    ax.set_xticklabels([f"{f:g} (k={int(k[f])})" for f in fractions])
    ax.set_xlabel("share of cells frozen")
    ax.set_ylabel("forgetting minus random's (nats)\n< 0: protects A better than random")
    n = comparison[["n_random", "n_seeds"]].iloc[0]
    ax.set_title(f"versus {int(n['n_random'])} random draws x {int(n['n_seeds'])} seeds "
                 "(bars: bootstrap intervals)")
    ax.legend(fontsize=5, frameon=False)


def make_validation_figures(out_dir: str | Path, tables: dict[str, pd.DataFrame], doc: dict
                            ) -> dict[str, list[Path]]:
    """All three figures into ``out_dir``; returns name -> paths."""
    out_dir = Path(out_dir)
    what = f"task A {doc.get('task_a')} × task B {doc.get('task_b')}"
    n = f"{doc.get('n_cells')} of {doc.get('n_cells_total')} cells"
    return {
        "scatter": scatter(tables["cells"], tables["validity"], out_dir / "validation_scatter",
                           f"Does the map predict real interference? {what}, {n}"),
        "precision": precision(tables["precision"], out_dir / "validation_precision",
                               f"precision@k: {what}"),
        "intervention": intervention(tables["arms"], out_dir / "validation_intervention",
                                     f"Fine-tuning on {doc.get('task_b')}, cells frozen",
                                     tables.get("comparison")),
    }


__all__ = ["make_validation_figures", "scatter", "precision", "intervention"]
