"""Input checks of the statistics: the validate step of validate -> compute -> assemble.

Each check raises ValueError naming the input and what was expected; the ones that
prepare inputs return them as float64 arrays (a named result where there are several).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .._tables import BLOCKS


@dataclass(frozen=True)
class DisruptionInputs:
    """Checked disruption matrices: x_b [n_b, m], x_r [n_r, m], the m cells, and the
    pooled matrices all_b [n_b, m + k], all_r [n_r, m + k] with the k extra columns."""

    x_b: np.ndarray
    x_r: np.ndarray
    cells: pd.DataFrame
    all_b: np.ndarray
    all_r: np.ndarray
    k: int


def generic_cells(m: int) -> pd.DataFrame:
    """m cells cell0..cell{m-1} of one block 'X', for matrices without a cells table."""
    return pd.DataFrame(dict(block=["X"] * m, layer=[0] * m, head=list(range(m)),
                             kv_head=list(range(m)), kv_group=[str(k) for k in range(m)],
                             n_query_heads=[1] * m, shared=[False] * m,
                             name=[f"cell{k}" for k in range(m)]))


def check_disruption(x_b, x_r, cells: pd.DataFrame | None, extra_b=None,
                     extra_r=None) -> DisruptionInputs:
    """The inputs of :meth:`QKOVStatistics.test_disruption`, checked."""
    x_b = np.asarray(x_b, dtype=np.float64)
    x_r = np.asarray(x_r, dtype=np.float64)
    if x_b.ndim != 2 or x_r.ndim != 2 or x_b.shape[1] != x_r.shape[1]:
        raise ValueError(f"x_b and x_r must be [n, m] with the same m; got {x_b.shape} "
                         f"and {x_r.shape}")
    m = x_b.shape[1]
    if m == 0:
        raise ValueError("no cells to test")
    if cells is None:
        cells = generic_cells(m)
    if len(cells) != m:
        raise ValueError(f"cells has {len(cells)} rows but the matrices have {m} columns")
    if extra_b is None:
        return DisruptionInputs(x_b, x_r, cells, x_b, x_r, 0)
    extra_b = np.asarray(extra_b, dtype=np.float64).reshape(x_b.shape[0], -1)
    extra_r = np.asarray(extra_r, dtype=np.float64).reshape(x_r.shape[0], -1)
    return DisruptionInputs(x_b, x_r, cells, np.hstack([x_b, extra_b]),
                            np.hstack([x_r, extra_r]), extra_b.shape[1])


@dataclass(frozen=True)
class ScoreArrays:
    """Checked score tensors: per block, B [n_a, n_b, L, H] and R [n_a, n_r, L, H]."""

    blocks: list[str]
    b: dict[str, np.ndarray]
    r: dict[str, np.ndarray]
    n_a: int
    n_b: int
    n_r: int


def _check_block_keys(scores_b: Mapping, scores_r: Mapping) -> list[str]:
    blocks = [b for b in BLOCKS if b in scores_b]
    extra_keys = set(scores_b) - set(BLOCKS)
    if extra_keys:
        raise ValueError(f"unknown blocks {sorted(extra_keys)} in scores_b; expected "
                         f"keys among {BLOCKS}")
    if not blocks:
        raise ValueError("scores_b holds no block (expected keys among Q, K, V, O)")
    missing = [b for b in blocks if b not in scores_r]
    if missing:
        raise ValueError(f"scores_r lacks blocks {missing} present in scores_b")
    return blocks


def _score_array(name: str, block: str, arr, n_layers: int, n_heads: int) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 4 or arr.shape[2:] != (n_layers, n_heads):
        raise ValueError(
            f"{name}[{block!r}] has shape {arr.shape}; expected [n_a, n_j, "
            f"{n_layers}, {n_heads}] for {n_layers} layers and {n_heads} heads")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}[{block!r}] contains NaN or infinite values "
                         "(missing data is an error)")
    return arr


def check_scores(scores_b: Mapping, scores_r: Mapping, n_layers: int,
                 n_heads: int) -> ScoreArrays:
    """The score tensors of :meth:`QKOVStatistics.test_scores`, checked: the same blocks,
    finite, one shape per group across blocks, the same task-A samples in both."""
    blocks = _check_block_keys(scores_b, scores_r)
    arr_b, arr_r = {}, {}
    shape_b = shape_r = None
    for b in blocks:
        sb = _score_array("scores_b", b, scores_b[b], n_layers, n_heads)
        sr = _score_array("scores_r", b, scores_r[b], n_layers, n_heads)
        if shape_b is None:
            shape_b, shape_r = sb.shape, sr.shape
        if sb.shape != shape_b or sr.shape != shape_r:
            raise ValueError(f"block {b}: shapes {sb.shape} / {sr.shape} differ from "
                             f"{shape_b} / {shape_r} of the first block")
        arr_b[b], arr_r[b] = sb, sr
    n_a, n_b = shape_b[:2]
    if shape_r[0] != n_a:
        raise ValueError(f"scores_b has {n_a} task-A samples but scores_r has "
                         f"{shape_r[0]}; the reference must be scored against the same "
                         "task-A samples")
    if n_a < 1:
        raise ValueError("no task-A samples")
    return ScoreArrays(blocks, arr_b, arr_r, int(n_a), int(n_b), int(shape_r[1]))


def check_ids(ids, n: int, name: str) -> None:
    """``ids`` (None allowed) must name exactly n samples."""
    if ids is not None and len(ids) != n:
        raise ValueError(f"{name} has {len(ids)} ids but the scores have {n} samples")


def check_disjoint(groups: Mapping[str, Sequence | None]) -> None:
    """No sample id may be in two of the named groups (None entries are skipped)."""
    items = [(k, set(v)) for k, v in groups.items() if v is not None]
    for a in range(len(items)):
        for b in range(a + 1, len(items)):
            both = items[a][1] & items[b][1]
            if both:
                example = sorted(map(repr, both))[:3]
                raise ValueError(f"{items[a][0]} and {items[b][0]} share {len(both)} sample "
                                 f"id(s), e.g. {', '.join(example)}; they must be disjoint")


def heatmap_collector(heatmap: Any, contribs, grads, fisher, scorer=None):
    """The FisherCollector that made ``heatmap``: contribs, grads and fisher must all come
    from it (their ``collector`` backlinks carry the heatmap's ``collector_token``), and so
    must ``scorer`` (the metric, when given)."""
    if not isinstance(heatmap, Mapping) or "meta" not in heatmap:
        raise ValueError("heatmap must be the dict returned by compute_heatmap, with a "
                         "'meta' entry")
    token = heatmap["meta"].get("collector_token")
    for name, obj in (("contribs", contribs), ("grads", grads), ("fisher", fisher)):
        if getattr(getattr(obj, "collector", None), "token", None) != token:
            raise ValueError(
                f"{name} does not come from the FisherCollector that made this heatmap "
                f"(collector_token {token!r}); pass that collector's "
                "contribution_cache, gradient_manager and Fisher")
    collector = grads.collector
    if contribs.collector is not collector or fisher.collector is not collector:
        raise ValueError("contribs, grads and fisher come from different FisherCollectors")
    if scorer is not None and getattr(scorer, "fisher_collector", None) is not collector:
        raise ValueError("scorer (the metric) was not made with the FisherCollector that "
                         f"made this heatmap (collector_token {token!r})")
    return collector


def reference_samples(collector, task_a: str, reference: str | None) -> tuple[str, list]:
    """(task of the reference disruptors, their ids): task A's 'reference' samples
    (``reference`` None or 'within_task') or a named control task's."""
    if reference is None or reference == "within_task":
        task_r = task_a
    elif isinstance(reference, str):
        task_r = reference
    else:
        raise ValueError("reference must be None, 'within_task' or a task name, got "
                         f"{reference!r}")
    try:
        ids_r = list(collector.sample_ids(task_r, "reference"))
    except KeyError:
        ids_r = []
    if not ids_r:
        raise ValueError(
            f"no reference samples of task {task_r!r} were collected. Collect held-out "
            f"samples (disjoint from its fisher and scored samples) with "
            f"collector.collect_fisher(model, batch, task={task_r!r}, role='reference') "
            "before calling test_heatmap")
    return task_r, ids_r


def heatmap_blocks(heatmap: Mapping) -> list[str]:
    """The blocks of a heatmap, each of which must hold per-sample scores."""
    blocks = [b for b in BLOCKS if b in heatmap]
    missing = [b for b in blocks if "scores" not in heatmap[b]]
    if not blocks or missing:
        raise ValueError(f"heatmap lacks per-sample scores for blocks "
                         f"{missing or list(BLOCKS)}")
    return blocks
