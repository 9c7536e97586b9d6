"""Shared look, titles and atomic writers of the figures.

Colour-blind-safe choices only: viridis for non-negative maps, ColorBrewer RdBu (reversed,
centred on 0) for signed maps and correlations, the Okabe-Ito palette for categories.
Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state), so the
library works under any backend and in notebooks; every writer writes a temporary file
next to its target and renames it into place (``os.replace``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import matplotlib as mpl
import pandas as pd
from matplotlib.figure import Figure

from .._tables import BLOCKS, SHARED_BLOCKS
from ..results import atomic_path

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000"]
BLOCK_COLOURS = dict(zip(BLOCKS, OKABE_ITO))
SEQUENTIAL = "viridis"
DIVERGING = "RdBu_r"
FORMATS = ("pdf", "png")
RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7,
      "ytick.labelsize": 7, "legend.fontsize": 7, "figure.dpi": 100, "savefig.dpi": 200,
      "pdf.fonttype": 42, "axes.spines.top": False, "axes.spines.right": False}


def new_figure(w: float, h: float, **subplots) -> tuple[Figure, object]:
    """A pyplot-free figure of ``w`` x ``h`` inches and its axes (``Figure.subplots``).
    Call it, draw and save inside ``with context():``."""
    fig = Figure(figsize=(w, h), layout="constrained")
    return fig, fig.subplots(**subplots)


def context():
    """rc settings (fonts, sizes) to build and save figures under."""
    return mpl.rc_context(RC)


def describe(meta: Mapping) -> str:
    """'task A <a> x task B <b>, variant <v>' from a heatmap's meta."""
    return (f"task A {meta.get('task_a', '?')} × task B {meta.get('task_b', '?')}, "
            f"variant {meta.get('variant', '?')}")


def save_figure(fig: Figure, stem: str | Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write ``fig`` to ``<stem>.pdf`` and ``<stem>.png`` atomically; returns the paths.

    Metadata that changes between runs (creation date) is left out, so reruns on the same
    inputs give identical PDFs.
    """
    out = []
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        meta = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=meta)
        out.append(path)
    return out


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_csv(path: str | Path, df: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV (no index) atomically."""
    return write_text(path, df.to_csv(index=False))


def entries(paths: Iterable[str | Path], caption: str) -> list[dict]:
    """Manifest entries [{'path', 'caption'}] for the files of one figure or table."""
    return [{"path": str(p), "caption": caption} for p in paths]


def significance_rule(summary: Mapping | None = None) -> str:
    """'q <= 0.05 and d >= 0.2' from the statistics summary, or the generic rule."""
    s = summary or {}
    alpha, d = s.get("fdr_alpha", "alpha"), s.get("min_effect_size", "threshold")
    return f"q <= {alpha} and Cohen's d >= {d}"
