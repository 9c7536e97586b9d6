"""Figure 4: sample-pair forensics of the top cells.

For each of the top cells (table order of :func:`.tables.top_cells`), the k sample pairs
(i of task A, j of task B) with the largest score M_ij,c (smallest for the signed variant),
with their dataset ids and a text excerpt; the figure shows those scores beside the cell's
mean over all pairs (dashed line). K/V cells are read from the first query head of the group
(all its columns hold the same values).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from . import style
from .inputs import cell_name, excerpt, grid_positions, load_texts
from .tables import top_cells

COLUMNS = ["cell", "block", "layer", "head", "kv_head", "rank", "sample_a", "sample_b", "score",
           "cell_mean", "text_a", "text_b"]


def top_pairs(scores: np.ndarray, k: int, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) index arrays [k] of the k most extreme entries of ``scores`` [n_a, n_b]: the
    largest (the smallest for the signed variant, where conflict is negative), ties broken
    by position."""
    flat = np.asarray(scores, dtype=float).ravel()
    order = np.argsort(flat if signed else -flat, kind="stable")[:k]
    return np.unravel_index(order, np.shape(scores))


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
        for rank, (i, j) in enumerate(zip(*top_pairs(m, k, signed)), start=1):
            a, b = str(ids_a[i]), str(ids_b[j])
            rows.append(dict(cell=cell_name(cell), block=cell["block"], layer=cell["layer"],
                             head=cell["head"], kv_head=cell.get("kv_head"), rank=rank,
                             sample_a=a, sample_b=b, score=float(m[i, j]),
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


def dominant_samples(table: pd.DataFrame, share: float = 0.5) -> list[dict]:
    """Samples that dominate the top cells: in at least ``share`` of the top pairs of at
    least ``share`` of the cells. [{'task': 'A'|'B', 'sample', 'n_cells', 'n_pairs'}], the
    most cells first."""
    out = []
    n_cells = table["cell"].nunique()
    for task, col in (("A", "sample_a"), ("B", "sample_b")):
        if table.empty:
            continue
        per_cell = table.groupby(["cell", col]).size() / table.groupby("cell").size()
        strong = per_cell[per_cell >= share].reset_index()
        for sample, n in strong[col].value_counts().items():
            if n >= share * n_cells:
                out.append(dict(task=task, sample=str(sample), n_cells=int(n),
                                n_pairs=int((table[col] == sample).sum())))
    return sorted(out, key=lambda d: (-d["n_cells"], -d["n_pairs"]))


def dominance_note(table: pd.DataFrame) -> str:
    """One sentence naming the dominating samples ('' when none dominates)."""
    notes = [f"task-{d['task']} sample {d['sample']} is in at least half of the top pairs of "
             f"{d['n_cells']} of {table['cell'].nunique()} cells ({d['n_pairs']} of "
             f"{len(table)} pairs)" for d in dominant_samples(table)]
    return ("Note: " + "; ".join(notes) + ".") if notes else ""


def _pair_lines(r: Mapping, width: int) -> str:
    """Both ids in full and a wrapped excerpt of each text, for one pair."""
    lines = [f"#{r['rank']}  score {r['score']:.4g}"]
    for tag, sid, text in (("A", r["sample_a"], r["text_a"]), ("B", r["sample_b"], r["text_b"])):
        lines.append(f"{tag} {sid}")
        lines += textwrap.wrap(excerpt(text, 2 * width) or "(no text)", width,
                               initial_indent="   ", subsequent_indent="   ")[:2]
    return "\n".join(lines)


def draw_forensics(axes, table: pd.DataFrame, width: int = 70) -> None:
    """Per cell a pair of axes: the top pairs' scores as bars (rank on the axis, dashed:
    the cell's mean over all pairs) and, beside them, each pair's ids in full with wrapped
    excerpts of both texts. ``axes``: [n_cells, 2]."""
    for (ax, tx), (name, sub) in zip(axes, table.groupby("cell", sort=False)):
        k = len(sub)
        y = np.arange(k)[::-1]
        ax.barh(y, sub["score"], color=style.BLOCK_COLOURS[sub["block"].iat[0]])
        ax.set_yticks(y, [f"#{r}" for r in sub["rank"]])
        ax.set_ylim(-0.5, k - 0.5)
        ax.axvline(sub["cell_mean"].iat[0], color="black", ls="--", lw=1,
                   label="mean over all pairs")
        ax.set_title(name, loc="left")
        ax.set_xlabel("score M_ij")
        tx.set_axis_off()
        tx.set_ylim(-0.5, k - 0.5)
        tx.set_xlim(0, 1)
        for yy, r in zip(y, sub.to_dict("records")):
            tx.text(0, yy, _pair_lines(r, width), va="center", ha="left", fontsize=6,
                    family="monospace", parse_math=False, linespacing=1.15)
    for ax, tx in axes[table["cell"].nunique():]:
        ax.set_visible(False)
        tx.set_visible(False)


def write_forensics(heatmap: Mapping, cells, out_dir: str | Path, texts=None,
                    n_cells: int = 4, k: int = 5) -> list[dict]:
    """Write ``forensics.{pdf,png,csv,md}``; returns manifest entries."""
    out_dir = Path(out_dir)
    table = pair_forensics(heatmap, cells, texts, n_cells, k, excerpt_chars=400)
    meta = heatmap["meta"]
    note = dominance_note(table)
    text = (f"Sample-pair forensics ({style.describe(meta)}): for the top {n_cells} cells, the "
            f"{k} (task-A sample, task-B sample) pairs with the most extreme score, with both "
            "dataset ids in full and excerpts of both texts; dashed: the cell's mean over all "
            "pairs. Longer excerpts in forensics.md/csv. " + note).strip()
    n = max(table["cell"].nunique(), 1)
    with style.context():
        fig, axes = style.new_figure(11.0, n * (0.62 * k + 0.7) + 0.5, nrows=n, ncols=2,
                                     squeeze=False, width_ratios=[1, 3.2])
        draw_forensics(list(axes), table)
        fig.suptitle(f"Most conflicting sample pairs: {style.describe(meta)}"
                     + (f"\n{note}" if note else ""))
        paths = style.save_figure(fig, out_dir / "forensics")
    md = to_markdown(table) + (f"\n{note}\n" if note else "")
    paths += [style.write_csv(out_dir / "forensics.csv", table),
              style.write_text(out_dir / "forensics.md", md)]
    return style.entries(paths, text)
