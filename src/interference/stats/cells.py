"""Distinct cells of a QK-OV heatmap (SPEC section 6).

A cell is a DISTINCT parameter set (block, layer, head). Q and O have one cell per query
head; under grouped-query attention K and V have one cell per (layer, kv_head), because
the query heads of one group read the very same K/V parameters. Tests, FDR and counts use
these distinct cells; figures broadcast K/V values back to the query-head columns.

Cell order (the column order of every disruption matrix in this package): blocks in the
order given (canonically Q, K, V, O), then layer position, then head (or kv-head) position.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .._tables import BLOCKS, SHARED_BLOCKS

CELL_COLUMNS = ["block", "layer", "head", "kv_head", "kv_group", "n_query_heads", "shared",
                "layer_pos", "head_pos", "head_positions", "name"]


def _as_int_list(values: Sequence, what: str) -> list[int]:
    try:
        out = [int(v) for v in values]
    except TypeError as exc:  # pragma: no cover - defensive
        raise ValueError(f"{what} must be a sequence of integers, got {values!r}") from exc
    return out


def distinct_cells(layers: Sequence[int], heads: Sequence[int],
                   kv_head_of: Sequence[int] | None = None,
                   blocks: Sequence[str] = BLOCKS) -> pd.DataFrame:
    """Enumerate the distinct cells of a heatmap.

    Parameters
    ----------
    layers : real layer ids of the heatmap's layer axis (length n_layers).
    heads : real query-head ids of the heatmap's head axis (length n_heads).
    kv_head_of : kv head read by each entry of `heads` (length n_heads); None means
        multi-head attention (kv_head_of[h] = heads[h]).
    blocks : which blocks, in the order their cells are laid out.

    Returns
    -------
    DataFrame, one row per distinct cell, columns:
      block, layer (real id), head (query head; for K/V the smallest selected query head of
      the group), kv_head (for K/V the shared kv head; for Q/O the kv head that query head
      reads), kv_group (the selected query heads whose columns this cell covers, "0,1,2"),
      n_query_heads, shared (True for K/V cells covering more than one query head),
      layer_pos / head_pos (positions on the heatmap axes of the representative column),
      head_positions (tuple of head-axis positions covered), name ("Q/L3/H5", "K/L3/KV1").
    """
    layers = _as_int_list(layers, "layers")
    heads = _as_int_list(heads, "heads")
    if kv_head_of is None:
        kv_head_of = list(heads)
    kv_head_of = _as_int_list(kv_head_of, "kv_head_of")
    if len(kv_head_of) != len(heads):
        raise ValueError(f"kv_head_of has {len(kv_head_of)} entries but there are "
                         f"{len(heads)} heads")
    if len(set(layers)) != len(layers) or len(set(heads)) != len(heads):
        raise ValueError("layers and heads must not contain duplicates")
    unknown = [b for b in blocks if b not in BLOCKS]
    if unknown:
        raise ValueError(f"unknown blocks {unknown}; expected a subset of {BLOCKS}")

    # kv groups among the selected heads, in order of first appearance
    groups: dict[int, list[int]] = {}
    for pos, kv in enumerate(kv_head_of):
        groups.setdefault(kv, []).append(pos)

    rows = []
    for block in blocks:
        for lpos, layer in enumerate(layers):
            if block in SHARED_BLOCKS:
                for kv, positions in groups.items():
                    qheads = [heads[p] for p in positions]
                    rep = positions[int(np.argmin(qheads))]
                    rows.append(dict(block=block, layer=layer, head=heads[rep], kv_head=kv,
                                     kv_group=",".join(str(h) for h in sorted(qheads)),
                                     n_query_heads=len(positions), shared=len(positions) > 1,
                                     layer_pos=lpos, head_pos=rep,
                                     head_positions=tuple(positions),
                                     name=f"{block}/L{layer}/KV{kv}"))
            else:
                for hpos, head in enumerate(heads):
                    rows.append(dict(block=block, layer=layer, head=head,
                                     kv_head=kv_head_of[hpos], kv_group=str(head),
                                     n_query_heads=1, shared=False, layer_pos=lpos,
                                     head_pos=hpos, head_positions=(hpos,),
                                     name=f"{block}/L{layer}/H{head}"))
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


def n_distinct_cells(n_layers: int, n_heads: int, n_kv_heads: int | None = None,
                     blocks: Sequence[str] = BLOCKS) -> int:
    """Number of distinct cells: n_layers * (n_heads per Q/O block + n_kv_heads per K/V)."""
    n_kv = n_heads if n_kv_heads is None else n_kv_heads
    return int(sum(n_layers * (n_kv if b in SHARED_BLOCKS else n_heads) for b in blocks))


def gather_cells(scores: Mapping[str, np.ndarray], cells: pd.DataFrame, *,
                 rtol: float = 1e-6, what: str = "scores") -> np.ndarray:
    """Stack the distinct-cell columns of per-block score tensors.

    scores[B]: [n_a, n_j, n_layers, n_heads] (any leading shape works: [..., L, H]).
    Returns [..., m] with m = len(cells), in cell order. For K/V cells, the columns of all
    query heads of the group must hold the same values (within `rtol`): a mismatch means
    the scores were not computed per kv group and is an error.
    """
    out = []
    for block, sub in cells.groupby("block", sort=False):
        arr = scores[block]
        lpos = sub["layer_pos"].to_numpy()
        hpos = sub["head_pos"].to_numpy()
        flat = arr.reshape(arr.shape[:-2] + (-1,))
        col = lpos * arr.shape[-1] + hpos
        # every (layer, head) in order (no GQA): the block as it is, else one gather
        out.append(flat if np.array_equal(col, np.arange(flat.shape[-1]))
                   else np.take(flat, col, axis=-1))
        if block in SHARED_BLOCKS:
            for lp, positions, name in zip(lpos, sub["head_positions"], sub["name"]):
                if len(positions) < 2:
                    continue
                ref = arr[..., lp, positions[0]]
                scale = float(np.max(np.abs(ref))) if ref.size else 0.0
                for p in positions[1:]:
                    other = arr[..., lp, p]
                    if not np.allclose(other, ref, rtol=rtol, atol=rtol * scale):
                        raise ValueError(
                            f"{what}: the {block} columns of the query heads of kv group "
                            f"{name} differ; under GQA they must hold identical values")
    # groupby(sort=False) keeps the order of first appearance, i.e. the cell order
    return np.concatenate(out, axis=-1)


def conflict_order(q, statistic, signed: bool = False, then: Sequence = ()) -> np.ndarray:
    """Indices of cells, most conflicting first: the cells whose statistic T points the
    conflict's way (T > 0; T < 0 for the ``signed`` variant) by q, then by T (the farther
    that way first); after them the others, the least significant first, so the cells most
    significantly the other way come last. Ties: by the arrays of ``then`` in turn
    (ascending), then by position. A two-sided q says how significant a cell is, not which
    way: ordered by q alone, cells significant the other way rank among the conflicts."""
    toward = (-1.0 if signed else 1.0) * np.asarray(statistic, float)
    q = np.asarray(q, float)
    other = ~(toward > 0)                 # NaN T: with the others
    keys = [np.asarray(k) for k in reversed(list(then))]
    # np.lexsort sorts by its last key first
    return np.lexsort((*keys, -toward, np.where(other, -q, q), other))


def broadcast_to_heads(values: np.ndarray, cells: pd.DataFrame, block: str,
                       n_layers: int, n_heads: int, fill: float = np.nan) -> np.ndarray:
    """Place per-cell values [m] (or [..., m]) of one block on the [.., n_layers, n_heads]
    grid, repeating K/V values over the query heads of their group."""
    values = np.asarray(values)
    grid = np.full(values.shape[:-1] + (n_layers, n_heads), fill, dtype=float)
    idx = np.flatnonzero(cells["block"].to_numpy() == block)
    heads = cells["head_positions"].to_numpy()[idx]
    count = np.fromiter((len(h) for h in heads), dtype=np.intp, count=len(idx))
    if count.sum():                      # one cell per (layer, query head) it covers
        hp = np.concatenate([np.asarray(h, dtype=np.intp) for h in heads])
        lp = np.repeat(cells["layer_pos"].to_numpy()[idx], count)
        grid[..., lp, hp] = values[..., np.repeat(idx, count)]
    return grid
