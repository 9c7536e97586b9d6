"""Figure 1: the layer x head map of ``layer_head_avg`` per block, significant cells boxed.

Rows are the real layer ids (bottom = first), columns the real query-head ids. A cell is
boxed when the statistics call it a significant conflict (``significant``: q <= alpha and
d >= min_effect_size). A K/V cell is shared by the query heads of its GQA group, so every
query-head column of the group is boxed, and the groups are separated by vertical lines
(kv head ids on the top axis). The signed variant is drawn with a diverging map centred on
0 (conflict is negative there); the others with viridis.
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


def draw_block_heatmap(ax, heatmap: Mapping, cells: pd.DataFrame, block: str,
                       title: str | None = None):
    """Draw ``heatmap[block]['layer_head_avg']`` [n_layers, n_heads] on ``ax``; returns the
    image. Boxes (gid 'significant') mark the squares of :func:`significant_squares`."""
    meta = heatmap["meta"]
    layers, heads = meta["layers"], meta["heads"]
    kv_of = meta.get("kv_head_of") or list(heads)
    avg = np.asarray(heatmap[block]["layer_head_avg"], dtype=float)
    if avg.shape != (len(layers), len(heads)):
        raise ValueError(f"{block}: layer_head_avg has shape {avg.shape}, expected "
                         f"({len(layers)}, {len(heads)})")
    signed = meta.get("variant") == "signed" or np.nanmin(avg) < 0
    im = ax.imshow(avg, origin="lower", aspect="auto", interpolation="nearest",
                   cmap=style.DIVERGING if signed else style.SEQUENTIAL,
                   norm=CenteredNorm() if signed else None)
    ax.set_xticks(range(len(heads)), [str(h) for h in heads])
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.spines[:].set_visible(False)
    gqa = len(set(kv_of)) < len(heads)
    shared = block in style.SHARED_BLOCKS and gqa
    for k in kv_boundaries(kv_of) if gqa else []:
        ax.axvline(k - 0.5, color="black", lw=1.2 if shared else 0.5,
                   ls="-" if shared else ":", path_effects=_HALO if shared else None)
    if shared:
        starts = [0] + kv_boundaries(kv_of)
        ends = starts[1:] + [len(heads)]
        top = ax.secondary_xaxis("top")
        top.set_xticks([(s + e - 1) / 2 for s, e in zip(starts, ends)],
                       [f"kv{kv_of[s]}" for s in starts])
        top.tick_params(length=0)
    for lp, hp in significant_squares(cells, block, layers, heads):
        ax.add_patch(Rectangle((hp - 0.5, lp - 0.5), 1, 1, fill=False, edgecolor="black",
                               lw=1.4, gid=MARK_GID, path_effects=_HALO))
    ax.figure.colorbar(im, ax=ax, shrink=0.8, label="mean score M (layer_head_avg)")
    ax.set_title(title or block)
    return im


def caption(meta: Mapping, block: str | None = None, summary: Mapping | None = None) -> str:
    """Caption of the map of one block (or of the 2x2 panel)."""
    what = f"Block {block}" if block else "Blocks Q, K, V, O"
    text = (f"{what}: mean QK-OV interference layer_head_avg over all sample pairs, "
            f"{style.describe(meta)}; real layer and query-head ids. Boxed: significant "
            f"conflicts ({style.significance_rule(summary)}).")
    if block is None or block in style.SHARED_BLOCKS:
        text += (" K/V parameters are shared by the query heads of a GQA group: the whole "
                 "group is boxed, groups are separated by vertical lines (kv ids on top).")
    return text


def _size(n_layers: int, n_heads: int) -> tuple[float, float]:
    return min(1.8 + 0.38 * n_heads, 9.0), min(1.3 + 0.2 * n_layers, 9.0)


def write_block_heatmaps(heatmap: Mapping, cells, out_dir: str | Path,
                         summary: Mapping | None = None) -> list[dict]:
    """Write ``heatmap_<B>.{pdf,png}`` per block and ``heatmap_panel.{pdf,png}`` (2x2).
    Returns manifest entries [{'path', 'caption'}]."""
    cells = load_cells(cells)
    meta, out_dir = heatmap["meta"], Path(out_dir)
    w, h = _size(len(meta["layers"]), len(meta["heads"]))
    entries = []
    with style.context():
        for b in style.BLOCKS:
            fig, ax = style.new_figure(w, h)
            draw_block_heatmap(ax, heatmap, cells, b, title=f"{b}: {style.describe(meta)}")
            paths = style.save_figure(fig, out_dir / f"heatmap_{b}")
            entries += style.entries(paths, caption(meta, b, summary))
        fig, axes = style.new_figure(2 * w, 2 * h, nrows=2, ncols=2)
        for ax, b in zip(axes.flat, style.BLOCKS):
            draw_block_heatmap(ax, heatmap, cells, b)
        fig.suptitle(style.describe(meta))
        paths = style.save_figure(fig, out_dir / "heatmap_panel")
        entries += style.entries(paths, caption(meta, summary=summary))
    return entries
