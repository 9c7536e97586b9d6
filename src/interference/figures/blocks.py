"""Figure 2: mean interference per block with bootstrap intervals.

The mean of block B is the mean of M^B over task-A samples i, task-B samples j, layers and
DISTINCT heads (K/V: one column per kv group, so a group counts once). Interval: a
two-way percentile bootstrap over samples (cells are fixed, not resampled): each draw
resamples task-A samples i and task-B samples j independently with replacement, the SAME
draw for every block (so blocks are compared on paired draws), and takes

    mean* = sum_ij w_i P_ij w_j,   P_ij = mean over (layer, distinct head) of M^B_ij,

with w the multinomial resampling weights / n. Defaults: 1000 draws, seed 0, 95% level.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from . import style


def distinct_head_positions(block: str, kv_head_of) -> list[int]:
    """Head positions with distinct parameters: all for Q/O, the first of each kv group for K/V."""
    if block not in style.SHARED_BLOCKS:
        return list(range(len(kv_head_of)))
    first = {}
    for k, kv in enumerate(kv_head_of):
        first.setdefault(kv, k)
    return sorted(first.values())


def block_means(heatmap: Mapping, n_bootstrap: int = 1000, seed: int = 0,
                level: float = 0.95) -> pd.DataFrame:
    """One row per block: block, mean, ci_low, ci_high, n_cells, n_a, n_b, n_bootstrap, seed.

    Uses ``heatmap[B]['scores']`` [n_a, n_b, n_layers, n_heads] (see module doc)."""
    meta = heatmap["meta"]
    kv_of = meta.get("kv_head_of") or list(meta["heads"])
    pair_means = {}
    for b in style.BLOCKS:
        s = np.asarray(heatmap[b]["scores"], dtype=float)
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{b}: scores contain NaN or inf (missing data is an error)")
        pair_means[b] = s[..., distinct_head_positions(b, kv_of)].mean(axis=(2, 3))  # [n_a, n_b]
    n_a, n_b = pair_means["Q"].shape
    rng = np.random.default_rng(seed)
    w_a = rng.multinomial(n_a, np.full(n_a, 1 / n_a), size=n_bootstrap) / n_a  # [n_boot, n_a]
    w_b = rng.multinomial(n_b, np.full(n_b, 1 / n_b), size=n_bootstrap) / n_b  # [n_boot, n_b]
    tail = 100 * (1 - level) / 2
    rows = []
    for b, pm in pair_means.items():
        draws = np.einsum("ka,ab,kb->k", w_a, pm, w_b)
        lo, hi = np.percentile(draws, [tail, 100 - tail])
        n_cells = len(meta["layers"]) * len(distinct_head_positions(b, kv_of))
        rows.append(dict(block=b, mean=pm.mean(), ci_low=lo, ci_high=hi, n_cells=n_cells,
                         n_a=n_a, n_b=n_b, n_bootstrap=n_bootstrap, seed=seed, level=level))
    return pd.DataFrame(rows)


def draw_block_means(ax, table: pd.DataFrame) -> None:
    """Points with interval bars, one per block, in the Okabe-Ito block colours."""
    for x, row in enumerate(table.itertuples()):
        ax.errorbar(x, row.mean, yerr=[[row.mean - row.ci_low], [row.ci_high - row.mean]],
                    fmt="o", color=style.BLOCK_COLOURS[row.block], capsize=4, ms=6)
    ax.set_xticks(range(len(table)), table["block"].tolist())
    ax.set_xlim(-0.6, len(table) - 0.4)
    ax.set_xlabel("block")
    ax.set_ylabel("mean score M")


def caption(meta: Mapping, table: pd.DataFrame) -> str:
    row = table.iloc[0]
    agg = meta.get("settings", {}).get("aggregate", "?")
    return (f"Mean QK-OV interference per block ({style.describe(meta)}, aggregate "
            f"{agg}), over all sample pairs, layers and distinct heads (K/V: one per kv "
            f"group). Bars: {row.level:.0%} percentile bootstrap intervals, {row.n_bootstrap} "
            f"draws (seed {row.seed}) resampling the {row.n_a} task-A and {row.n_b} task-B "
            "samples, the same draws for every block.")


def write_block_comparison(heatmap: Mapping, out_dir: str | Path, n_bootstrap: int = 1000,
                           seed: int = 0) -> list[dict]:
    """Write ``block_comparison.{pdf,png,csv}``; returns manifest entries."""
    out_dir = Path(out_dir)
    table = block_means(heatmap, n_bootstrap=n_bootstrap, seed=seed)
    text = caption(heatmap["meta"], table)
    with style.context():
        fig, ax = style.new_figure(3.2, 2.6)
        draw_block_means(ax, table)
        ax.set_title(f"Interference per block\n{style.describe(heatmap['meta'])}")
        paths = style.save_figure(fig, out_dir / "block_comparison")
    paths.append(style.write_csv(out_dir / "block_comparison.csv", table))
    return style.entries(paths, text)
