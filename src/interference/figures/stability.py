"""Figure 7: stability across split seeds (issue 10).

Given, per split seed, the layer x head maps and the cells table: the Spearman rank
correlation of the maps between seeds (as in :func:`.ablation.rank_correlations`), the
Jaccard overlap of the significant sets between seeds, and how many seeds flag each cell.

Inputs: ``maps`` {seed: {block: layer_head_avg [n_layers, n_heads]}}, ``cells`` {seed:
cells DataFrame or CSV path}; seeds are used as labels (str()).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from . import style
from .ablation import draw_matrix, jaccard_matrix, rank_correlations, significant_set
from .inputs import cell_name, load_cells

KEY = ["block", "layer", "head", "kv_head", "kv_group"]


def flag_counts(cells: Mapping[object, object]) -> pd.DataFrame:
    """One row per distinct cell (union over seeds): cell, block, layer, head, kv_head,
    kv_group, n_seeds_flagged (seeds where it is significant), n_seeds, share_flagged;
    sorted by n_seeds_flagged (descending), then cell name."""
    frames = []
    for seed, c in cells.items():
        df = load_cells(c)
        df = df.assign(cell=[cell_name(r) for r in df.to_dict("records")], seed=str(seed))
        frames.append(df[["cell"] + [k for k in KEY if k in df] + ["seed", "significant"]])
    long = pd.concat(frames, ignore_index=True)
    out = (long.groupby("cell", sort=False)
           .agg(**{k: (k, "first") for k in KEY if k in long},
                n_seeds_flagged=("significant", "sum"))
           .reset_index())
    out["n_seeds_flagged"] = out["n_seeds_flagged"].astype(int)
    out["n_seeds"] = len(cells)
    out["share_flagged"] = out["n_seeds_flagged"] / len(cells)
    return out.sort_values(["n_seeds_flagged", "cell"], ascending=[False, True],
                           kind="stable").reset_index(drop=True)


def write_stability_report(maps: Mapping, cells: Mapping, out_dir: str | Path,
                           kv_head_of=None, flip: Iterable[str] = (),
                           stem: str = "stability") -> list[dict]:
    """Write ``<stem>.{pdf,png}``, ``<stem>_cells.csv`` (:func:`flag_counts`) and
    ``<stem>_pairs.csv`` (seed_a, seed_b, spearman, jaccard); returns manifest entries."""
    out_dir = Path(out_dir)
    maps = {str(k): v for k, v in maps.items()}
    cells = {str(k): v for k, v in cells.items()}
    rho = rank_correlations(maps, "pooled", kv_head_of, flip)
    jac = jaccard_matrix({s: significant_set(c) for s, c in cells.items()})
    flags = flag_counts(cells)
    n = len(cells)
    pairs = pd.DataFrame([dict(seed_a=a, seed_b=b, spearman=rho.loc[a, b],
                               jaccard=jac.loc[a, b])
                          for i, a in enumerate(rho.index) for b in rho.index[i + 1:]],
                         columns=["seed_a", "seed_b", "spearman", "jaccard"])
    hist = np.bincount(flags["n_seeds_flagged"], minlength=n + 1)[1:]  # cells flagged k times
    with style.context():
        fig, (ax1, ax2, ax3) = style.new_figure(3 * (1.8 + 0.35 * n), 1.8 + 0.35 * n, ncols=3)
        draw_matrix(ax1, rho, "Spearman ρ of maps across seeds")
        draw_matrix(ax2, jac, "Jaccard of significant sets", 0.0, 1.0, style.SEQUENTIAL)
        ax3.bar(np.arange(1, n + 1), hist, color=style.OKABE_ITO[0])
        ax3.set_xticks(np.arange(1, n + 1))
        ax3.set_xlabel("seeds flagging the cell")
        ax3.set_ylabel("cells")
        ax3.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax3.set_title("how often a cell is significant")
        paths = style.save_figure(fig, out_dir / stem)
    paths += [style.write_csv(out_dir / f"{stem}_cells.csv", flags),
              style.write_csv(out_dir / f"{stem}_pairs.csv", pairs)]
    text = (f"Stability across {n} split seeds: Spearman rank correlation of the layer x head "
            "maps (distinct cells, mean over blocks), Jaccard overlap of the significant "
            "cells (n/a: both empty), and the number of cells flagged significant by exactly "
            "k seeds.")
    return style.entries(paths, text)
