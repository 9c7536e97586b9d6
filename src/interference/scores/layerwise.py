"""Heatmaps for models whose per-sample gradients do not fit anywhere: recompute by layer chunk.

A LLaMA-2-7B-shaped model has 2.1 G attention weights: 8.6 GB of float32 gradient per
sample, 2.6 TB for 300 samples. Instead of storing them, each chunk of layers is
collected, scored and dropped: for chunk c, every sample's forward and backward runs
with gradients switched on for chunk c's attention weights only (autograd then stops at
the chunk's lowest layer), the chunk's Fisher and per-sample gradients are held in memory,
and the chunk's (layer, block) scores are computed. Every (layer, block) score reads only
that layer's gradients and Fisher, so the result equals the stored path
(tests/test_layerwise.py, tests/test_chunks.py: byte-identical cells.csv).

- :func:`chunk_layers`: a model's layers in contiguous chunks (the workflow's chunk jobs);
- :func:`layer_passes`: a chunk's layers in passes whose rows fit a memory budget (one
  forward + backward per sample and pass);
- :func:`plan_passes`: the passes and micro-batch of least time whose peak memory (rows,
  per-sample gradients of a micro-batch, Fisher, activations) fits a budget;
- :func:`score_layers`: collect and score some layers, pass by pass, for the arms of an
  analysis (main A vs B, control A vs A') and the reference disruptors;
- :func:`join_heatmaps`: chunks' heatmaps (and reference scores) -> one heatmap;
- :func:`layerwise_heatmap`: all of it in one process (benchmarks/bench_7b.py).
"""
from __future__ import annotations

import gc
import logging
import math
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .._tables import ROLES
from ..architectures import BLOCKS, QKOVConfig, QKOVIndexer
from ..device import in_background, triton_interpreting
from ..gradients import FisherCollector
from ..gradients.collect import collect_role
from ..gradients.kernels import warm_up_square_sum
from .arms import arm_results
from .metric import QKOVInterferenceMetric

logger = logging.getLogger("qkov.scores")

WARM_UP_DEVICES = ("cuda",)   # where score_layers compiles its kernels ahead, in a thread
# a plan keeping its rows on the host is taken over one keeping them on the device only when
# its estimate is at most this share of the other's: the estimates are within 0.74-1.20x of
# measured times, and the host plan's copies are the least known part (RESULTS.md, "The
# collection time estimate")
HOST_PLAN_SHARE = 0.9


def chunk_layers(layers: list[int], n_chunks: int) -> list[list[int]]:
    """``layers`` in ``min(n_chunks, len(layers))`` contiguous chunks whose sizes differ by
    at most one (the first ones larger)."""
    if int(n_chunks) < 1:
        raise ValueError(f"layer chunks must be >= 1, got {n_chunks}")
    k = min(int(n_chunks), len(layers))
    q, r = divmod(len(layers), k)
    out, start = [], 0
    for c in range(k):
        stop = start + q + (c < r)
        out.append(list(layers[start:stop]))
        start = stop
    return out


def layer_passes(layers: list[int], bytes_of_layer: dict[int, int],
                 budget_bytes: float | None) -> list[list[int]]:
    """``layers`` in as few contiguous passes as keep each pass's rows (``bytes_of_layer``,
    all samples) within ``budget_bytes`` (None: one pass). A layer alone over the budget
    is a ValueError: nothing can be collected within it."""
    if budget_bytes is None:
        return [list(layers)]
    passes, cur, used = [], [], 0
    for layer in layers:
        b = int(bytes_of_layer[layer])
        if b > budget_bytes:
            raise ValueError(f"one layer's gradient rows ({b / 2**30:.2f} GB for layer {layer}) "
                             f"exceed the memory budget ({budget_bytes / 2**30:.2f} GB): use "
                             "fewer or shorter samples, or a larger budget")
        if cur and used + b > budget_bytes:
            passes.append(cur)
            cur, used = [], 0
        cur.append(layer)
        used += b
    passes.append(cur)
    return passes


def plan_passes(layers: list[int], peak_of: Callable[[list[int], int], int],
                budget_bytes: float | None, seconds_of: Callable[[list[list[int]], int], float],
                micro_batches: tuple[int, ...] = (8, 4, 2, 1)) -> dict:
    """The fastest split of ``layers`` into contiguous passes, and its micro-batch, whose
    every pass peaks within ``budget_bytes``.

    For each micro-batch m of ``micro_batches`` the layers are packed greedily from the
    lowest (``peak_of(pass_layers, m)``: bytes, monotone in the pass's layers, e.g.
    collect.pass_memory); among the m whose single layers fit, the one of least
    ``seconds_of(passes, m)`` wins, ties to the larger m. A pass re-runs every sample's
    forward and backward, a smaller m only adds per-micro-batch overhead, so fewer passes
    with a smaller m usually win (see collect.estimate).
    Returns {'passes', 'micro_batch', 'seconds', 'peaks': bytes per pass}; budget None:
    one pass with the largest m. ValueError when no m fits a single layer.
    """
    if budget_bytes is None:
        m = max(micro_batches)
        return {"passes": [list(layers)], "micro_batch": m,
                "seconds": seconds_of([list(layers)], m),
                "peaks": [peak_of(list(layers), m)]}
    best = None
    for m in sorted(micro_batches, reverse=True):
        passes = _pack(layers, lambda p: peak_of(p, m), budget_bytes)
        if passes is not None:
            t = seconds_of(passes, m)
            if best is None or t < best["seconds"]:
                best = {"passes": passes, "micro_batch": m, "seconds": t,
                        "peaks": [peak_of(p, m) for p in passes]}
    if best is None:
        m = min(micro_batches)
        worst = max(layers, key=lambda l: peak_of([l], m))
        raise ValueError(f"one layer's pass peaks at {peak_of([worst], m) / 2**30:.2f} GiB "
                         f"(layer {worst}, micro-batch {m}), over the memory budget "
                         f"({budget_bytes / 2**30:.2f} GiB): use fewer or shorter samples, or "
                         "a larger budget")
    return best


def plan_chunk(model, indexer, layers: list[int], stored: list[int], every: list[int],
               role_sizes: list[int], store_dtype: str, gradient_format: str, model_dtype: str,
               budget_bytes: float | None, device: str, threads: int,
               max_micro_batch: int = 8, n_tasks: int = 2, score_rows: int = 0,
               score_rows_all: int = 0, host_budget_bytes: float | None = None) -> dict:
    """Passes and micro-batch of one chunk (:func:`plan_passes` over collect.pass_memory
    and collect.estimate).

    Args:
        stored / every: tokens of each stored sample / of every sample (Fisher included).
        role_sizes: samples of each (task, role) collection call (micro-batches per pass).
        gradient_format: the stored format (collect.stored_format).
        budget_bytes: peak bytes a pass may use beyond the model (None: no limit).
        n_tasks / score_rows: tasks whose Fisher is summed, rows of the largest arm's
            (layer, block) operands (collect.pass_memory).
        score_rows_all: rows of task A and of every disruptor set together (score_arms'
            one pass over the sets: task A's rows made once per (layer, block)); reserved
            instead of ``score_rows`` when that takes no more passes and the same
            micro-batch, else the sets are scored one by one (A's rows made per set).
        host_budget_bytes: host memory a pass's factored rows may take when kept there
            instead of on the device (None: never): such a plan ('rows_on_host' True; the
            device then holds one layer's factors twice while that layer is scored: their
            copies and their padded stack, factored._padded) is taken when its estimate,
            the rows' copies to the host and back included (collect.HOST_COPY_BYTES_S), is
            at most HOST_PLAN_SHARE of the plan with the rows on the device, or where none
            fits that way.
        When not even one layer fits with ``score_rows`` rows of operands, a tile of rows
            is reserved instead (``score_rows`` halved, down to one row of each task: the
            tile whose plan takes the least estimated time, of equal times the largest;
            'score_tiles' True): the metric then scores each (layer, block) in tiles of
            rows, rebuilding each tile's rows (the time estimate leaves that out).
    Returns plan_passes' dict plus 'memory' (collect.pass_memory of each pass), 'rows_bytes'
    (largest pass's rows on the device), 'host_rows_bytes' (on the host), 'score_rows' (the
    rows reserved), 'estimate_s'.
    """
    from ..gradients.collect import (HOST_COPY_BYTES_S, estimate, layer_bytes,
                                     pass_flops_per_token, pass_memory)

    per_layer = layer_bytes(indexer, stored, store_dtype, gradient_format, model_dtype)
    longest = max(every)
    sizes = [2 ** k for k in range(int(max_micro_batch).bit_length()) if 2 ** k < max_micro_batch]
    cands = tuple(sorted({int(max_micro_batch), *sizes}, reverse=True))

    def memory(p, m, rows, host):
        held = sum(per_layer[l] for l in p)
        return pass_memory(indexer, p, 0 if host else held, m, longest, gradient_format,
                           store_dtype, n_tasks, rows,
                           staged_bytes=2 * max(per_layer[l] for l in p) if host else 0)

    def seconds(passes, m):
        n_micro = sum(-(-n // m) for n in role_sizes)
        return estimate([pass_flops_per_token(model, indexer, p) for p in passes], every,
                        device, model_dtype, threads, n_micro)

    # every layer's rows go to the host and back once, however many passes
    copy_s = 2 * sum(per_layer[l] for l in layers) / HOST_COPY_BYTES_S

    def planned(rows, host):
        def peak(p, m):
            if host and sum(per_layer[l] for l in p) > host_budget_bytes:
                return math.inf                      # the host cannot hold the pass's rows
            return memory(p, m, rows, host)["peak"]

        def timed(passes, m):
            return seconds(passes, m) + (copy_s if host else 0.0)
        return dict(plan_passes(layers, peak, budget_bytes, timed, cands), score_rows=rows)

    def fitted(host):
        try:
            return dict(planned(score_rows, host), score_tiles=False)
        except ValueError as err:
            last = err
        tiles, best = [score_rows], None
        while tiles[-1] > 2:
            tiles.append(max(2, tiles[-1] // 2))
        for rows in tiles[1:]:               # the least time; of equal times, larger tiles
            try:
                got = planned(rows, host)
            except ValueError as err:
                last = err
                continue
            if best is None or got["seconds"] < best["seconds"]:
                best = got
        if best is None:
            raise last
        return dict(best, score_tiles=True)

    where = [False] + ([True] if host_budget_bytes and gradient_format != "dense" else [])
    plans, errors = {}, {}
    for host in where:
        try:
            plans[host] = fitted(host)
        except ValueError as err:
            errors[host] = err
    if not plans:
        raise errors[False]
    host = True in plans and (False not in plans or
                              plans[True]["seconds"] <= HOST_PLAN_SHARE * plans[False]["seconds"])
    plan = plans[host]
    if score_rows_all > score_rows and not plan["score_tiles"]:
        try:
            wide = planned(score_rows_all, host)
        except ValueError:               # one layer with every set's operands is too much
            wide = None
        if wide is not None and len(wide["passes"]) <= len(plan["passes"]) \
                and wide["micro_batch"] == plan["micro_batch"]:
            plan = dict(wide, score_tiles=False)
    plan["rows_on_host"] = host
    plan["memory"] = [memory(p, plan["micro_batch"], plan["score_rows"], host)
                      for p in plan["passes"]]
    plan["rows_bytes"] = max(x["rows"] for x in plan["memory"])
    plan["host_rows_bytes"] = max(sum(per_layer[l] for l in p) for p in plan["passes"]) \
        if host else 0
    plan["estimate_s"] = plan["seconds"]
    return plan


def _pack(layers: list[int], peak: Callable[[list[int]], int],
          budget: float) -> list[list[int]] | None:
    """Contiguous passes, each as long as ``peak`` stays within ``budget`` (None: a layer
    alone is over it)."""
    passes, cur = [], []
    for layer in layers:
        if cur and peak(cur + [layer]) <= budget:
            cur.append(layer)
            continue
        if peak([layer]) > budget:
            return None
        if cur:
            passes.append(cur)
        cur = [layer]
    passes.append(cur)
    return passes


def _collect(collector, model, batches, fisher_mode: str, micro_batch: int) -> dict:
    """Every task's Fisher samples, then every task's stored roles in :data:`ROLES` order
    (no stored row is held while a Fisher is summed: collect.pass_memory). Each role's
    numbers are those of the workflow's collect job (per task and role, same order).
    Returns the seconds of each phase ('fisher', 'stored')."""
    seconds = {}
    for phase in (("fisher",), tuple(r for r in ROLES if r != "fisher")):
        t0 = time.perf_counter()
        for task, by_role in batches.items():
            for role in phase:
                if role in by_role:
                    n = len(by_role[role]["sample_ids"])
                    collect_role(collector, model, by_role[role], task, role, fisher_mode, 0,
                                 n, micro_batch)
        seconds["fisher" if phase == ("fisher",) else "stored"] = time.perf_counter() - t0
    return seconds


def score_layers(model, batches: dict[str, dict[str, dict]], task_a: str, task_b: str,
                 passes: list[list[int]], make_collector: Callable[[list[int]], FisherCollector],
                 *, arms: tuple[str, ...] = ("main",), reference_task: str | None = None,
                 metric_kwargs: dict | None = None, fisher_mode: str = "mean",
                 micro_batch: int = 8, contents: dict | None = None,
                 progress: bool = True) -> dict[str, dict]:
    """Collect and score the layers of ``passes``, one pass at a time.

    Args:
        batches: task -> role ('fisher', 'scored', 'reference', 'control') -> batch.
        make_collector: layers -> an empty FisherCollector restricted to them.
        arms: 'main' (A vs B) and/or 'control' (A vs A').
        contents: task -> {sample id: content digest} (check_disjoint_tasks), or None.
    Returns:
        arm -> {'heat': heatmap of these layers, 'ref': block -> [n_a, n_r, n_layers,
        n_heads] or None, 'ids_r': the reference samples, 'sq_norms_b' / 'sq_norms_r': [n]
        squared gradient norms of the disruptors / reference samples over these layers,
        'config': the QKOVConfig, 'top_k'}.
    """
    reference_task = reference_task or task_a
    parts: dict[str, list] = {arm: [] for arm in arms}
    warming = None
    for layers in tqdm(passes, desc="layer passes", disable=not progress):
        collector = make_collector(list(layers))
        if warming is None:
            warming = warm_up_kernels(model, batches, task_a, collector.config,
                                      metric_kwargs, micro_batch)
        took = _collect(collector, model, batches, fisher_mode, micro_batch)
        metric = QKOVInterferenceMetric(collector.config, collector, **(metric_kwargs or {}))
        store = collector.gradient_manager
        t0 = time.perf_counter()
        for arm, r in arm_results(metric, arms, task_a, task_b, reference_task,
                                  contents).items():
            parts[arm].append(r)
        budget = metric.device_memory_mb
        logger.info("layers %d-%d: Fisher samples %.1f s, stored samples %.1f s, %s scored "
                    "in %.1f s (device budget of the operands: %s)", layers[0], layers[-1],
                    took["fisher"], took["stored"], " and ".join(arms),
                    time.perf_counter() - t0,
                    "none" if budget is None else f"{budget / 1024:.1f} GiB")
        store.release()                 # drop this pass's rows before the next
        del metric, collector, store
        gc.collect()                    # collector <-> store/Fisher are cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if warming is not None:
        warming.join()
    return {arm: join_parts(p) for arm, p in parts.items()}


def warm_up_kernels(model, batches: dict, task_a: str, config: QKOVConfig,
                    metric_kwargs: dict | None, micro_batch: int):
    """On a device of :data:`WARM_UP_DEVICES`, a started thread (to be joined) that compiles
    the Triton kernels a pass will first need, while the pass collects: the Fisher samples'
    square sums at ``micro_batch`` and the metric's contraction of task A's scored samples
    against each set's size (from ``batches``). On a fresh machine each kernel's first use
    otherwise compiles it on the critical path (RESULTS.md, B2 session 21). None elsewhere,
    and in Triton's interpreter (nothing to compile; two threads in it would collide)."""
    device = next(model.parameters()).device
    if device.type not in WARM_UP_DEVICES or triton_interpreting():
        return None
    metric = QKOVInterferenceMetric(config, None, **(metric_kwargs or {}))
    n_a = len(batches[task_a]["scored"]["input_ids"])
    n_js = [len(b["input_ids"]) for by_role in batches.values()
            for role, b in by_role.items() if role != "fisher"]

    def work():
        warm_up_square_sum(device, micro_batch)
        metric.warm_up(n_a, n_js)

    return in_background(work, device, "kernel warm-up")


def join_parts(parts: list[dict]) -> dict:
    """Passes' (or chunks') results of one arm, in layer order -> one result."""
    heat, ref = join_heatmaps([p["heat"] for p in parts], [p["ref"] for p in parts],
                              parts[0]["config"], parts[0]["top_k"])
    return {"heat": heat, "ref": ref, "ids_r": parts[0]["ids_r"], "config": parts[0]["config"],
            "top_k": parts[0]["top_k"],
            "sq_norms_b": np.sum([p["sq_norms_b"] for p in parts], axis=0),
            "sq_norms_r": np.sum([p["sq_norms_r"] for p in parts], axis=0)}


def join_heatmaps(parts: list[dict], refs: list[dict | None] | None, config: QKOVConfig,
                  top_k: int) -> tuple[dict, dict | None]:
    """Heatmaps of consecutive layer ranges (same samples, heads and settings) -> the
    heatmap of all their layers, as ``compute_heatmap`` makes it in one piece: scores
    concatenated along the layer axis, ``layer_head_avg`` and ``top_conflicts``
    recomputed over all layers, ridge diagnostics merged. ``refs``: the parts' reference
    scores (block -> [n_a, n_r, n_layers_part, n_heads]), joined the same way; ``config``
    (the model's QKOVConfig) and ``top_k`` rank the top conflicts as the metric does."""
    meta = dict(parts[0]["meta"])
    for p in parts[1:]:
        for k in ("sample_ids_a", "sample_ids_b", "heads", "settings", "fisher_tasks"):
            if p["meta"][k] != meta[k]:
                raise ValueError(f"heatmap parts differ in {k}: cannot join them")
    layers = [layer for p in parts for layer in p["meta"]["layers"]]
    if len(set(layers)) != len(layers):
        raise ValueError(f"heatmap parts overlap in layers: {layers}")
    ranker = QKOVInterferenceMetric(config, None, **meta["settings"], top_k=top_k,
                                    device="cpu")
    out = {}
    for b in BLOCKS:     # one part: its arrays as they are (a copy is 1.3 GB for B2's arms)
        scores = _joined([p[b]["scores"] for p in parts], axis=2)
        out[b] = {"scores": scores, "layer_head_avg": scores.mean(axis=(0, 1)),
                  "top_conflicts": ranker.top_conflicts(b, scores, layers, meta["heads"],
                                                        meta["sample_ids_a"],
                                                        meta["sample_ids_b"]),
                  "layers": list(layers), "heads": list(meta["heads"])}
    ridge = {}
    for p in parts:
        ridge.update(p["meta"]["ridge"])
    meta.update(layers=layers, ridge=ridge)
    out["meta"] = meta
    ref = None
    if refs and all(r is not None for r in refs):
        ref = {b: _joined([r[b] for r in refs], axis=2) for b in BLOCKS}
    return out, ref


def _joined(arrays: list[np.ndarray], axis: int) -> np.ndarray:
    """np.concatenate of ``arrays`` along ``axis``; the array itself when there is one."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)


def layerwise_heatmap(model, batches: dict[str, dict[str, dict]], task_a: str, task_b: str, *,
                      layers_per_chunk: int = 1, reference_task: str | None = None,
                      metric_kwargs: dict | None = None, fisher_mode: str = "mean",
                      engine: str = "auto", micro_batch: int = 8, store_device=None,
                      gradient_memory_mb: float = 1e9, store_dtype: str = "float32",
                      gradient_format: str = "dense", config: QKOVConfig | None = None,
                      progress: bool = True):
    """Collect and score chunk by chunk (``layers_per_chunk`` layers per pass), in one
    process.

    Returns:
        (heatmap, reference_scores): the heatmap as ``compute_heatmap`` makes it (its meta
        has no live metric) and block -> [n_a, n_r, n_layers, n_heads] for the reference
        disruptors (or None).
    """
    config = config or QKOVConfig.from_model(model)
    all_layers = QKOVIndexer(model, config).layers
    passes = [all_layers[k:k + layers_per_chunk]
              for k in range(0, len(all_layers), layers_per_chunk)]
    device = store_device or next(model.parameters()).device

    def make(layers):
        return FisherCollector(
            enable_cross_task_analysis=True, gradient_memory_mb=gradient_memory_mb,
            store_dtype=store_dtype, config=config, engine=engine, micro_batch=micro_batch,
            layers=layers, store_device=device, gradient_format=gradient_format,
            keep_fisher_sums=False)

    res = score_layers(model, batches, task_a, task_b, passes, make,
                       reference_task=reference_task, metric_kwargs=metric_kwargs,
                       fisher_mode=fisher_mode, micro_batch=micro_batch,
                       progress=progress)["main"]
    res["heat"]["meta"]["recompute"] = "layerwise"
    return res["heat"], res["ref"]
