"""Heatmaps for models whose per-sample gradients do not fit anywhere: recompute by layer chunk.

A LLaMA-2-7B-shaped model has 2.1 G attention weights: 8.6 GB of float32 gradient per
sample, 2.6 TB for 300 samples. Instead of storing them, each chunk of layers is
collected, scored and dropped: for chunk c, every sample's forward and backward runs
with gradients switched on for chunk c's attention weights only (autograd then stops at
the chunk's lowest layer), the chunk's Fisher and per-sample gradients are held within
the GPU budget, and the chunk's (layer, block) scores are computed. The cost is one
forward (and a partial backward) per sample per chunk; the result is identical to the
stored path (tests/test_layerwise.py), because every (layer, block) score only reads that
layer's gradients and Fisher.
"""
from __future__ import annotations

import gc

import numpy as np
import torch
from tqdm.auto import tqdm

from .._tables import ROLES
from ..architectures import BLOCKS, QKOVConfig, QKOVIndexer
from ..gradients import FisherCollector
from .metric import QKOVInterferenceMetric



def layerwise_heatmap(model, batches: dict[str, dict[str, dict]], task_a: str, task_b: str, *,
                      layers_per_chunk: int = 1, reference_task: str | None = None,
                      metric_kwargs: dict | None = None, fisher_mode: str = "mean",
                      engine: str = "auto", micro_batch: int = 8, store_device=None,
                      gradient_memory_mb: float = 1e9, store_dtype: str = "float32",
                      config: QKOVConfig | None = None, progress: bool = True):
    """Collect and score chunk by chunk.

    Args:
        batches: task -> role ('fisher', 'scored', 'reference', 'control') -> batch.
        reference_task: whose 'reference' samples are the reference disruptors
            (default task A); None when no reference batch exists.
    Returns:
        (heatmap, reference_scores): the heatmap as ``compute_heatmap`` makes it (its meta
        has no live metric) and block -> [n_a, n_r, n_layers, n_heads] for the reference
        disruptors (or None).
    """
    config = config or QKOVConfig.from_model(model)
    all_layers = QKOVIndexer(model, config).layers
    chunks = [all_layers[k:k + layers_per_chunk]
              for k in range(0, len(all_layers), layers_per_chunk)]
    reference_task = reference_task or task_a
    device = store_device or next(model.parameters()).device
    parts, ref_parts, meta = [], [], None
    for chunk in tqdm(chunks, desc="layer chunks", disable=not progress):
        collector = FisherCollector(
            enable_cross_task_analysis=True, gradient_memory_mb=gradient_memory_mb,
            store_dtype=store_dtype, config=config, engine=engine, micro_batch=micro_batch,
            layers=chunk, store_device=device)
        for task, by_role in batches.items():
            for role in ROLES:
                if role in by_role:
                    collector.collect_fisher(model, by_role[role], task=task, mode=fisher_mode,
                                             role=role)
        metric = QKOVInterferenceMetric(config, collector, **(metric_kwargs or {}))
        heat = metric.compute_heatmap(task_a, task_b, layers=chunk)
        parts.append(heat)
        ids_r = collector.sample_ids(reference_task, "reference")
        if ids_r:
            ref_parts.append(metric.pair_scores(task_a, heat["meta"]["sample_ids_a"],
                                                reference_task, ids_r, chunk,
                                                fisher_tasks=tuple(heat["meta"]["fisher_tasks"])))
        meta = heat["meta"]
        heat["meta"] = {k: v for k, v in meta.items() if k != "metric"}
        collector.gradient_manager.release()     # drop this chunk's rows before the next
        last_metric = metric
        del metric, collector
        gc.collect()                              # collector <-> store/Fisher are cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return _concatenate(parts, last_metric, meta, all_layers), (
        {b: np.concatenate([r[b] for r in ref_parts], axis=2) for b in BLOCKS}
        if ref_parts else None)


def _concatenate(parts, metric, meta, layers):
    heads = meta["heads"]
    out = {}
    for b in BLOCKS:
        scores = np.concatenate([p[b]["scores"] for p in parts], axis=2)
        out[b] = {"scores": scores, "layer_head_avg": scores.mean(axis=(0, 1)),
                  "top_conflicts": metric.top_conflicts(b, scores, layers, heads,
                                                         meta["sample_ids_a"],
                                                         meta["sample_ids_b"]),
                  "layers": list(layers), "heads": list(heads)}
    ridge = {}
    for p in parts:
        ridge.update(p["meta"]["ridge"])
    out["meta"] = {k: v for k, v in meta.items() if k != "metric"}
    out["meta"].update(layers=list(layers), ridge=ridge, recompute="layerwise")
    return out
