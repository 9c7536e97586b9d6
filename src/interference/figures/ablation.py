"""Figure 6: ablation summary — how robust are the conclusions across variants?

- Spearman rank correlation between the variants' layer x head maps, per block over the
  distinct cells (K/V: one column per kv group, so shared columns are not counted several
  times), 'pooled' = the mean of the per-block correlations (blocks are on different
  scales, so their values are never ranked together). Variants whose conflicts are
  negative (``signed``) are passed in ``flip`` and negated first.
- The number of significant cells per variant (stacked by block) and, as a marker, the
  number with q <= alpha alone.
- Variants on different layer x head grids (a model ablation) have no common cells: their
  correlation is n/a; their counts are still compared.

Inputs: ``maps`` {variant: {block: layer_head_avg [n_layers, n_heads]}} (same axes for all
variants) and ``cells`` {variant: cells DataFrame or CSV path}.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.ticker import MaxNLocator

from . import style
from .blocks import distinct_head_positions
from .inputs import cell_name, load_cells

Maps = Mapping[str, Mapping[str, np.ndarray]]


def rank_correlations(maps: Maps, block: str = "pooled", kv_head_of=None,
                      flip: Iterable[str] = ()) -> pd.DataFrame:
    """Spearman correlations [n_variants, n_variants] between the maps of one block (or
    'pooled': the mean over the blocks all variants have). kv_head_of [n_heads] selects the
    distinct K/V columns (None: all columns are distinct); a mapping {variant: kv_head_of}
    gives each variant its own. Variants on different grids (another model: other shape or
    kv grouping) have no common cells: their correlation is NaN."""
    names = list(maps)
    kv = dict(kv_head_of) if isinstance(kv_head_of, Mapping) else dict.fromkeys(names, kv_head_of)
    blocks = [b for b in style.BLOCKS if all(b in maps[n] for n in names)]
    if block != "pooled":
        blocks = [block]
    mats = []
    for b in blocks:
        arrs = {n: np.asarray(maps[n][b], dtype=float) * (-1 if n in flip else 1) for n in names}
        grids: dict[tuple, list[str]] = {}   # variants on the same grid are compared
        for n in names:
            k = kv.get(n)
            grids.setdefault((arrs[n].shape, None if k is None else tuple(int(x) for x in k)),
                             []).append(n)
        mat = np.full((len(names), len(names)), np.nan)
        for (shape, k), members in grids.items():
            cols = distinct_head_positions(b, k if k is not None else range(shape[1]))
            vecs = np.stack([arrs[n][:, cols].ravel() for n in members], axis=1)  # [cells, v]
            idx = [names.index(n) for n in members]
            mat[np.ix_(idx, idx)] = pd.DataFrame(vecs).corr(method="spearman").to_numpy()
        mats.append(mat)
    with np.errstate(all="ignore"):
        return pd.DataFrame(np.mean(mats, axis=0), index=names, columns=names)


def significant_set(cells) -> set[str]:
    """Names ('Q/L3/H5', 'K/L3/KV1') of the significant cells of a cells table."""
    df = load_cells(cells)
    return {cell_name(r) for r in df[df["significant"]].to_dict("records")}


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; NaN when both are empty (undefined, shown as 'n/a')."""
    return len(a & b) / len(a | b) if a | b else float("nan")


def jaccard_matrix(sets: Mapping[str, set]) -> pd.DataFrame:
    """Pairwise Jaccard overlaps [n, n] of named sets."""
    names = list(sets)
    return pd.DataFrame([[jaccard(sets[a], sets[b]) for b in names] for a in names],
                        index=names, columns=names)


def significant_counts(cells: Mapping[str, object]) -> pd.DataFrame:
    """Per variant (rows): significant cells per block (columns Q, K, V, O), 'significant'
    (total) and 'q_significant' (q <= alpha, any effect size)."""
    rows = {}
    for name, c in cells.items():
        df = load_cells(c)
        row = {b: int(df.loc[df["block"] == b, "significant"].sum()) for b in style.BLOCKS}
        row["significant"] = int(df["significant"].sum())
        row["q_significant"] = int(df["q_significant"].sum()) if "q_significant" in df else np.nan
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def draw_matrix(ax, df: pd.DataFrame, title: str, vmin=-1.0, vmax=1.0, cmap=style.DIVERGING):
    """An annotated square matrix (rows and columns = df's index and columns)."""
    im = ax.imshow(df.to_numpy(float), vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(df.shape[1]), df.columns, rotation=45, ha="right")
    ax.set_yticks(range(df.shape[0]), df.index)
    for (i, j), v in np.ndenumerate(df.to_numpy(float)):
        rgb = to_rgb(im.cmap(im.norm(v))) if np.isfinite(v) else (1, 1, 1)
        ax.text(j, i, f"{v:.2f}" if np.isfinite(v) else "n/a", ha="center", va="center",
                fontsize=6, color="white" if np.dot(rgb, [0.3, 0.59, 0.11]) < 0.5 else "black")
    ax.spines[:].set_visible(False)
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)
    return im


def draw_counts(ax, counts: pd.DataFrame) -> None:
    """Stacked bars of significant cells per block per variant; diamonds: q <= alpha only."""
    x = np.arange(len(counts))
    bottom = np.zeros(len(counts))
    for b in style.BLOCKS:
        ax.bar(x, counts[b], bottom=bottom, color=style.BLOCK_COLOURS[b], label=b)
        bottom += counts[b].to_numpy()
    ax.plot(x, counts["q_significant"], "D", color="black", ms=4, label="q <= alpha only")
    ax.set_xticks(x, counts.index, rotation=45, ha="right")
    ax.set_ylabel("significant cells")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False, fontsize=6, loc="upper left", bbox_to_anchor=(1, 1))


def write_ablation_summary(maps: Maps, cells: Mapping[str, object], out_dir: str | Path,
                           kv_head_of=None, flip: Iterable[str] = (),
                           stem: str = "ablation_summary") -> list[dict]:
    """Write ``<stem>.{pdf,png}``, ``<stem>_correlations.csv`` (block, variant_a, variant_b,
    spearman; blocks and 'pooled') and ``<stem>_counts.csv``; returns manifest entries."""
    out_dir, flip = Path(out_dir), tuple(flip)
    blocks = ["pooled"] + [b for b in style.BLOCKS if all(b in m for m in maps.values())]
    corr = {b: rank_correlations(maps, b, kv_head_of, flip) for b in blocks}
    long = pd.concat([c.rename_axis(index="variant_a", columns="variant_b").stack()
                      .rename("spearman").reset_index().assign(block=b)
                      for b, c in corr.items()])[["block", "variant_a", "variant_b", "spearman"]]
    counts = significant_counts(cells)
    n = len(maps)
    with style.context():
        fig, (ax1, ax2) = style.new_figure(3.0 + 1.1 * n, 1.8 + 0.3 * n, ncols=2)
        draw_matrix(ax1, corr["pooled"], "Spearman ρ of layer×head maps\n(mean over blocks)")
        draw_counts(ax2, counts)
        ax2.set_title("significant cells per variant")
        paths = style.save_figure(fig, out_dir / stem)
    paths += [style.write_csv(out_dir / f"{stem}_correlations.csv", long),
              style.write_csv(out_dir / f"{stem}_counts.csv",
                              counts.rename_axis("variant").reset_index())]
    text = (f"Ablation summary over {n} variants: Spearman rank correlation of the "
            "layer x head maps (distinct cells, mean of the per-block correlations; "
            f"negated first: {', '.join(flip) or 'none'}) and the number of significant "
            "cells per variant, stacked by block (diamonds: q <= alpha regardless of d).")
    return style.entries(paths, text)
