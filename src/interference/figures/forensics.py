"""Figure 4: sample-pair forensics of the top cells.

For each of the top cells (table order of :func:`.tables.top_cells`), the k sample pairs
(i of task A, j of task B) with the largest score M_ij,c (smallest for the signed variant),
with their dataset ids and a text excerpt; the figure shows those scores beside the cell's
mean over all pairs (dashed line). K/V cells are read from the first query head of the group
(all its columns hold the same values).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from . import style
from .inputs import cell_name, excerpt, grid_positions, load_texts
from .tables import top_cells

COLUMNS = ["cell", "block", "layer", "head", "kv_head", "rank", "sample_a", "sample_b", "score",
           "cell_mean", "text_a", "text_b"]


def pair_forensics(heatmap: Mapping, cells, texts=None, n_cells: int = 4, k: int = 5,
                   excerpt_chars: int = 80) -> pd.DataFrame:
    """One row per (top cell, rank r <= k) with columns :data:`COLUMNS`.

    heatmap[B]['scores'] [n_a, n_b, n_layers, n_heads]; meta['sample_ids_a'/'_b'] the
    dataset ids of its first two axes; texts: see :func:`.inputs.load_texts`."""
    meta = heatmap["meta"]
    ids_a, ids_b = meta["sample_ids_a"], meta["sample_ids_b"]
    texts = load_texts(texts)
    signed = meta.get("variant") == "signed"
    top = top_cells(cells, n_cells, variant=meta.get("variant", "qkov"))
    rows = []
    for cell, squares in zip(top.to_dict("records"), grid_positions(top, meta["layers"],
                                                                    meta["heads"])):
        lp, hp = squares[0]
        m = np.asarray(heatmap[cell["block"]]["scores"])[:, :, lp, hp]  # [n_a, n_b]
        flat = m.ravel()
        order = np.argsort(flat if signed else -flat, kind="stable")[:k]
        for rank, f in enumerate(order, start=1):
            i, j = np.unravel_index(f, m.shape)
            a, b = str(ids_a[i]), str(ids_b[j])
            rows.append(dict(cell=cell_name(cell), block=cell["block"], layer=cell["layer"],
                             head=cell["head"], kv_head=cell.get("kv_head"), rank=rank,
                             sample_a=a, sample_b=b, score=float(flat[f]),
                             cell_mean=float(m.mean()),
                             text_a=excerpt(texts.get(a), excerpt_chars),
                             text_b=excerpt(texts.get(b), excerpt_chars)))
    return pd.DataFrame(rows, columns=COLUMNS)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-markdown table of the forensics (no tabulate needed)."""
    cols = ["cell", "rank", "sample_a", "sample_b", "score", "text_a", "text_b"]
    esc = lambda v: (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", r"\|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(r[c]) for c in cols) + " |" for r in table.to_dict("records")]
    return "\n".join(lines) + "\n"


def draw_forensics(axes, table: pd.DataFrame) -> None:
    """One horizontal bar chart per cell: the top pairs' scores, labelled 'id_a × id_b'."""
    for ax, (name, sub) in zip(axes, table.groupby("cell", sort=False)):
        y = np.arange(len(sub))[::-1]
        ax.barh(y, sub["score"], color=style.BLOCK_COLOURS[sub["block"].iat[0]])
        ax.set_yticks(y, [excerpt(f"{a} × {b}", 32)
                          for a, b in zip(sub["sample_a"], sub["sample_b"])])
        ax.axvline(sub["cell_mean"].iat[0], color="black", ls="--", lw=1,
                   label="mean over all pairs")
        ax.set_title(name)
        ax.set_xlabel("score M_ij")
    for ax in axes[table["cell"].nunique():]:
        ax.set_visible(False)


def write_forensics(heatmap: Mapping, cells, out_dir: str | Path, texts=None,
                    n_cells: int = 4, k: int = 5) -> list[dict]:
    """Write ``forensics.{pdf,png,csv,md}``; returns manifest entries."""
    out_dir = Path(out_dir)
    table = pair_forensics(heatmap, cells, texts, n_cells, k)
    meta = heatmap["meta"]
    text = (f"Sample-pair forensics ({style.describe(meta)}): for the top {n_cells} cells, the "
            f"{k} (task-A sample, task-B sample) pairs with the most extreme score, by dataset "
            "id; dashed: the cell's mean over all pairs. Text excerpts in forensics.md/csv.")
    n = max(table["cell"].nunique(), 1)
    with style.context():
        rows = (n + 3) // 4
        fig, axes = style.new_figure(3.0 * min(n, 4), rows * (0.3 * k + 1.3), nrows=rows,
                                     ncols=min(n, 4), squeeze=False)
        draw_forensics(list(axes.flat), table)
        fig.suptitle(f"Most conflicting sample pairs: {style.describe(meta)}")
        paths = style.save_figure(fig, out_dir / "forensics")
    paths += [style.write_csv(out_dir / "forensics.csv", table),
              style.write_text(out_dir / "forensics.md", to_markdown(table))]
    return style.entries(paths, text)
