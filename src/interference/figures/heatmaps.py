"""Figure 1: per block, the layer x head map of the mean score M (``layer_head_avg``) beside
the map of the effect size d that the test decides on; significant cells boxed on both.

Rows are the real layer ids (bottom = first), columns the real query-head ids. A cell is
boxed when the statistics call it a significant conflict (``significant``: q <= alpha and
d >= min_effect_size): the boxes belong to the effect-size map (d of the disruption share,
task B against A's held-out reference samples), which is drawn beside M so a reader sees
the quantity that made a cell significant. A K/V cell is shared by the query heads of its
GQA group, so every query-head column of the group is boxed, and the groups are separated by
vertical lines (kv head ids on the top axis). Signed quantities (the signed variant's M,
every d) are drawn with a diverging map centred on 0; the others with viridis.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib.patheffects as pe
import numpy as np
import pandas as pd
from matplotlib.colors import CenteredNorm
from matplotlib.patches import Rectangle

from . import style
from .inputs import grid_positions, load_cells

MARK_GID = "significant"  # gid of the boxes drawn on significant cells
_HALO = [pe.withStroke(linewidth=2.6, foreground="white")]


def significant_squares(cells: pd.DataFrame, block: str, layers, heads) -> list[tuple[int, int]]:
    """(layer position, head position) of every grid square covered by a significant cell
    of ``block`` (K/V cells expanded to their group's query heads)."""
    cells = load_cells(cells)
    sub = cells[(cells["block"] == block) & cells["significant"]]
    return sorted({sq for squares in grid_positions(sub, layers, heads) for sq in squares})


def kv_boundaries(kv_head_of) -> list[int]:
    """Head positions k where the kv group changes (a line is drawn at k - 0.5)."""
    return [k for k in range(1, len(kv_head_of)) if kv_head_of[k] != kv_head_of[k - 1]]


def cell_grid(cells: pd.DataFrame, block: str, column: str, layers, heads) -> np.ndarray:
    """``cells[column]`` of ``block`` on the [n_layers, n_heads] grid (a K/V cell's value
    on every query head of its group; NaN where no cell)."""
    cells = load_cells(cells)
    sub = cells[cells["block"] == block]
    grid = np.full((len(layers), len(heads)), np.nan)
    for value, squares in zip(sub[column].astype(float), grid_positions(sub, layers, heads)):
        for lp, hp in squares:
            grid[lp, hp] = value
    return grid


QUANTITIES = {"mean": "mean score M (layer_head_avg)",
              "effect": "effect size d (tested; boxes)"}


def _values(heatmap: Mapping, cells: pd.DataFrame, block: str, quantity: str):
    """(values [n_layers, n_heads], diverging?) of the quantity drawn."""
    meta = heatmap["meta"]
    layers, heads = meta["layers"], meta["heads"]
    if quantity == "effect":
        return cell_grid(cells, block, "effect_size", layers, heads), True
    if quantity != "mean":
        raise ValueError(f"quantity must be one of {list(QUANTITIES)}, got {quantity!r}")
    avg = np.asarray(heatmap[block]["layer_head_avg"], dtype=float)
    if avg.shape != (len(layers), len(heads)):
        raise ValueError(f"{block}: layer_head_avg has shape {avg.shape}, expected "
                         f"({len(layers)}, {len(heads)})")
    return avg, meta.get("variant") == "signed" or np.nanmin(avg) < 0


def _draw_groups(ax, block: str, kv_of, n_heads: int) -> None:
    """GQA group lines (solid for K/V, dotted for Q/O) and kv ids on top of K/V maps."""
    gqa = len(set(kv_of)) < n_heads
    shared = block in style.SHARED_BLOCKS and gqa
    for k in kv_boundaries(kv_of) if gqa else []:
        ax.axvline(k - 0.5, color="black", lw=1.2 if shared else 0.5,
                   ls="-" if shared else ":", path_effects=_HALO if shared else None)
    if shared:
        starts = [0] + kv_boundaries(kv_of)
        ends = starts[1:] + [n_heads]
        top = ax.secondary_xaxis("top")
        top.set_xticks([(s + e - 1) / 2 for s, e in zip(starts, ends)],
                       [f"kv{kv_of[s]}" for s in starts])
        top.tick_params(length=0)


def draw_block_heatmap(ax, heatmap: Mapping, cells: pd.DataFrame, block: str,
                       title: str | None = None, quantity: str = "mean"):
    """Draw one block's map on ``ax``; returns the image. quantity 'mean':
    ``heatmap[block]['layer_head_avg']`` [n_layers, n_heads]; 'effect': the cells' effect
    size d. Boxes (gid 'significant') mark the squares of :func:`significant_squares`."""
    meta = heatmap["meta"]
    layers, heads = meta["layers"], meta["heads"]
    values, diverging = _values(heatmap, cells, block, quantity)
    im = ax.imshow(values, origin="lower", aspect="auto", interpolation="nearest",
                   cmap=style.DIVERGING if diverging else style.SEQUENTIAL,
                   norm=CenteredNorm() if diverging else None)
    ax.set_xticks(range(len(heads)), [str(h) for h in heads])
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.spines[:].set_visible(False)
    _draw_groups(ax, block, meta.get("kv_head_of") or list(heads), len(heads))
    for lp, hp in significant_squares(cells, block, layers, heads):
        ax.add_patch(Rectangle((hp - 0.5, lp - 0.5), 1, 1, fill=False, edgecolor="black",
                               lw=1.4, gid=MARK_GID, path_effects=_HALO))
    ax.figure.colorbar(im, ax=ax, shrink=0.8, label="M" if quantity == "mean" else "d")
    ax.set_title(title or block)
    return im


def caption(meta: Mapping, block: str | None = None, summary: Mapping | None = None) -> str:
    """Caption of the maps of one block (or of the panel of all four)."""
    what = f"Block {block}" if block else "Blocks Q, K, V, O"
    left, right = ("Left", "Right") if block else ("Top row", "Bottom row")
    text = (f"{what}, {style.describe(meta)}; real layer and query-head ids. {left}: "
            "the mean QK-OV score M (layer_head_avg) over all sample pairs. "
            f"{right}: the effect size d of each cell (Cohen's d of task B's "
            "share of disruption against A's held-out reference samples), the quantity the "
            "permutation test decides on. Boxed on both: significant conflicts "
            f"({style.significance_rule(summary)}); they belong to the effect-size map, so a "
            "boxed cell can be dark on the M map.")
    if block is None or block in style.SHARED_BLOCKS:
        text += (" K/V parameters are shared by the query heads of a GQA group: the whole "
                 "group is boxed, groups are separated by vertical lines (kv ids on top).")
    return text


def _size(n_layers: int, n_heads: int) -> tuple[float, float]:
    return min(1.8 + 0.38 * n_heads, 9.0), min(1.3 + 0.2 * n_layers, 9.0)


def write_block_heatmaps(heatmap: Mapping, cells, out_dir: str | Path,
                         summary: Mapping | None = None) -> list[dict]:
    """Write ``heatmap_<B>.{pdf,png}`` per block (M beside d) and ``heatmap_panel.{pdf,png}``
    (M maps on the top row, d maps below). Returns manifest entries [{'path', 'caption'}]."""
    cells = load_cells(cells)
    meta, out_dir = heatmap["meta"], Path(out_dir)
    w, h = _size(len(meta["layers"]), len(meta["heads"]))
    entries = []
    with style.context():
        for b in style.BLOCKS:
            fig, axes = style.new_figure(2 * w, h, ncols=2)
            for ax, q in zip(axes, QUANTITIES):
                draw_block_heatmap(ax, heatmap, cells, b, title=f"{b}: {QUANTITIES[q]}",
                                   quantity=q)
            fig.suptitle(style.describe(meta))
            paths = style.save_figure(fig, out_dir / f"heatmap_{b}")
            entries += style.entries(paths, caption(meta, b, summary))
        fig, axes = style.new_figure(4 * w, 2 * h, nrows=2, ncols=4)
        for row, q in zip(axes, QUANTITIES):
            for ax, b in zip(row, style.BLOCKS):
                draw_block_heatmap(ax, heatmap, cells, b, title=f"{b}: {QUANTITIES[q]}",
                                   quantity=q)
        fig.suptitle(style.describe(meta))
        paths = style.save_figure(fig, out_dir / "heatmap_panel")
        entries += style.entries(paths, caption(meta, summary=summary))
    return entries
