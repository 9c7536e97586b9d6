"""Figure 5: the statistics' own diagnostics.

- p-value histogram over the distinct cells, with the count expected per bin if every
  null were true (p uniform: m / n_bins). A spike near 0 over a flat floor is what a few
  real conflicts look like; a floor far below the line, conservative p-values; a U shape,
  a miscalibrated test.
- (optional) the permutation null T* of the top cells, from ``null_top.npz`` (format in
  :mod:`.inputs`), with the observed statistic T marked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from . import style
from .inputs import load_cells, load_null


def draw_pvalue_histogram(ax, cells, bins: int = 20) -> None:
    """Histogram of ``cells['p_value']`` [m] on [0, 1] and the uniform reference m / bins."""
    p = load_cells(cells)["p_value"].to_numpy(float)
    ax.hist(p, bins=bins, range=(0, 1), color=style.OKABE_ITO[0], edgecolor="white")
    ax.axhline(len(p) / bins, color="black", ls="--", lw=1, label="uniform (all nulls true)")
    ax.set_xlim(0, 1)
    ax.set_xlabel("permutation p-value")
    ax.set_ylabel("cells")
    ax.legend(frameon=False)


def draw_null(axes, null: np.ndarray, statistic: np.ndarray, names: list[str]) -> None:
    """One histogram per top cell: null [n_top, N] draws, observed statistic [n_top] marked."""
    for ax, t_null, t, name in zip(axes, null, statistic, names):
        ax.hist(t_null, bins=40, color=style.OKABE_ITO[4], edgecolor="none")
        ax.axvline(t, color=style.OKABE_ITO[5], lw=2, label="observed T")
        ax.set_title(name)
        ax.set_xlabel("T* (permutation null)")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(frameon=False)


def write_pvalue_histogram(cells, out_dir: str | Path, meta: Mapping | None = None,
                           summary: Mapping | None = None) -> list[dict]:
    """Write ``pvalue_histogram.{pdf,png}``; returns manifest entries."""
    df = load_cells(cells)
    what = style.describe(meta) if meta else ""
    n_sig = int(df["significant"].sum())
    with style.context():
        fig, ax = style.new_figure(3.6, 2.6)
        draw_pvalue_histogram(ax, df)
        ax.set_title(f"p-values of {len(df)} cells ({n_sig} significant)\n{what}")
        paths = style.save_figure(fig, Path(out_dir) / "pvalue_histogram")
    text = (f"Permutation p-values of all {len(df)} distinct cells ({what}); dashed: the count "
            f"per bin if no cell were a conflict. {n_sig} cells significant "
            f"({style.significance_rule(summary)}).")
    return style.entries(paths, text)


def write_null_figure(null_npz: str | Path, out_dir: str | Path, meta: Mapping | None = None,
                      max_cells: int = 6) -> list[dict]:
    """Write ``null_top.{pdf,png}`` from ``null_top.npz``; returns manifest entries."""
    null, stat, names = load_null(null_npz)
    null, stat, names = null[:max_cells], stat[:max_cells], names[:max_cells]
    n = len(names)
    if n == 0:
        raise ValueError(f"{null_npz}: no cells")
    with style.context():
        fig, axes = style.new_figure(2.6 * min(n, 3), 2.2 * ((n + 2) // 3), nrows=(n + 2) // 3,
                                     ncols=min(n, 3), squeeze=False)
        draw_null(list(axes.flat), null, stat, names)
        if meta:
            fig.suptitle(style.describe(meta))
        paths = style.save_figure(fig, Path(out_dir) / "null_top")
    text = (f"Permutation null distributions T* of the top {n} cells ({null.shape[1]} "
            "permutations each) with the observed statistic T (vertical line).")
    return style.entries(paths, text)
