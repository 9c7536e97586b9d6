"""Readers of the saved results the figures are made from.

- cells: the statistics' table, one row per DISTINCT cell (columns block, layer, head,
  kv_head, kv_group, statistic, p_value, q_value, effect_size, ci_low, ci_high,
  significant, q_significant, ...); ``kv_group`` lists the real query-head ids that share
  the cell ("0,1,2" for a K/V cell under GQA, "5" for a Q/O cell).
- null samples of the top cells, ``null_top.npz`` (optional, written by the stats stage):
    null      float [n_top, N]  the permutation statistics T*_c of each top cell
    statistic float [n_top]     the observed T_c
    cells     str   [n_top]     cell names in the grammar "Q/L3/H5" (K/V: "K/L3/KV1"), a
                                unicode array (not object: it is read without pickle)
- texts: sample id -> text, or sample id -> record with 'prompt' (and 'answer'), or a
  list of such records with 'id', or a path to a JSON file holding either.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .._tables import SHARED_BLOCKS

REQUIRED = ("block", "layer", "head", "kv_group", "p_value", "q_value", "statistic",
            "effect_size", "significant")


def load_cells(cells: pd.DataFrame | str | Path) -> pd.DataFrame:
    """The cells table (a DataFrame or a CSV path) with normalised dtypes: kv_group str,
    layer/head int, significant/q_significant bool. Missing columns are an error."""
    from ..results import check_schema

    where = "cells table" if isinstance(cells, pd.DataFrame) else str(cells)
    df = (pd.read_csv(cells, dtype={"kv_group": str}) if not isinstance(cells, pd.DataFrame)
          else cells.copy())
    versions = (sorted({str(v) for v in df["schema_version"].dropna()})
                if "schema_version" in df.columns else [])
    for version in versions:
        check_schema(version, where, "the cells table")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{where} lacks columns {missing} (schema "
                         f"{', '.join(versions) or 'unversioned'}): regenerate it with the "
                         f"statistics stage of this version (`snakemake --forcerun stats`)")
    df["kv_group"] = df["kv_group"].astype(str)
    df["layer"] = df["layer"].astype(int)
    df["head"] = df["head"].astype(int)
    for col in ("significant", "q_significant"):
        if col in df.columns and df[col].dtype != bool:
            df[col] = df[col].astype(str).str.lower().map({"true": True, "false": False})
            if df[col].isna().any():
                raise ValueError(f"cells column {col!r} holds values other than True/False")
    return df


def cell_name(row: Mapping) -> str:
    """The cell's name: 'Q/L3/H5' for Q/O, 'K/L3/KV1' for K/V (stats' naming grammar)."""
    if row["block"] in SHARED_BLOCKS:
        return f"{row['block']}/L{int(row['layer'])}/KV{int(row['kv_head'])}"
    return f"{row['block']}/L{int(row['layer'])}/H{int(row['head'])}"


def grid_positions(cells: pd.DataFrame, layers: Sequence[int], heads: Sequence[int]
                   ) -> list[list[tuple[int, int]]]:
    """For each row of ``cells``, the (layer position, head position) grid squares it covers
    on a [n_layers, n_heads] map: one for Q/O, every query head of the group for K/V."""
    lpos = {int(l): k for k, l in enumerate(layers)}
    hpos = {int(h): k for k, h in enumerate(heads)}
    out = []
    for layer, group in zip(cells["layer"], cells["kv_group"]):
        qheads = [int(h) for h in str(group).split(",")]
        unknown = [h for h in qheads if h not in hpos] + ([] if layer in lpos else [layer])
        if unknown:
            raise ValueError(f"cells name layer/heads {unknown} that are not on the heatmap's "
                             f"axes (layers {list(layers)}, heads {list(heads)})")
        out.append([(lpos[layer], hpos[h]) for h in qheads])
    return out


def load_null(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(null [n_top, N], statistic [n_top], cell names [n_top]) from ``null_top.npz``."""
    with np.load(path, allow_pickle=False) as z:
        null, stat, names = z["null"], z["statistic"], [str(c) for c in z["cells"]]
    if null.ndim != 2 or null.shape[0] != len(stat) or len(names) != len(stat):
        raise ValueError(f"{path}: expected null [n_top, N], statistic [n_top], cells "
                         f"[n_top]; got {null.shape}, {stat.shape}, {len(names)}")
    return null, stat, names


def load_texts(texts) -> dict[str, str]:
    """Sample id -> text from a dict, a list of records or a JSON path (see module doc)."""
    if texts is None:
        return {}
    if isinstance(texts, (str, Path)):
        texts = json.loads(Path(texts).read_text())
    if isinstance(texts, list):
        texts = {str(r["id"]): r for r in texts}
    out = {}
    for key, val in texts.items():
        if isinstance(val, Mapping):
            val = " → ".join(str(val[k]) for k in ("prompt", "answer") if val.get(k))
        out[str(key)] = str(val)
    return out


def excerpt(text: str | None, n: int = 80) -> str:
    """One-line excerpt of at most ``n`` characters ('' for None)."""
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"
