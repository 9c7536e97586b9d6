"""Collecting one task's Fisher and per-sample gradients role by role, and what a store's
manifest says about them: the library side of the workflow's collect jobs.

- :func:`make_collector`: a FisherCollector with the workflow's settings;
- :func:`collect_role`: samples [start, stop) of one role (the Fisher of mode ``mean`` summed
  one micro-batch unit per call, so shards and one job add the same sums in the same order);
- :func:`role_entry` / :func:`stored_entry`: a role's entry of store.json;
- :func:`disk_plan` / :func:`check_disk`: the store's size, refused before any work when the
  disk cannot hold it;
- :func:`take`: samples [start, stop) of a batch.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

logger = logging.getLogger("qkov.gradients")

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def take(batch: dict, start: int, stop: int) -> dict:
    """Samples [start, stop) of a batch: per-sample tensors and lists sliced, the rest kept."""
    import torch

    n = len(batch["sample_ids"])
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == n:
            out[key] = value[start:stop]
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = list(value[start:stop])
        else:
            out[key] = value
    return out


def disk_plan(n_params: int, n_stored: int, store_dtype: str) -> dict:
    """Bytes of the final store and the peak while saving (spilled rows are moved, not copied)."""
    final = n_params * BYTES[store_dtype] * n_stored
    return {"final_bytes": final, "peak_bytes": final}  # save moves spilled rows


def check_disk(where: Path, plan: dict, safety: float) -> None:
    free = shutil.disk_usage(where).free
    gb = 2 ** 30
    logger.info("gradient store: %.2f GB on disk (peak %.2f GB while saving); %.2f GB free at %s",
                plan["final_bytes"] / gb, plan["peak_bytes"] / gb, free / gb, where)
    if plan["peak_bytes"] > safety * free:
        raise RuntimeError(
            f"not enough disk for the gradient store at {where}: it needs up to "
            f"{plan['peak_bytes'] / gb:.2f} GB while saving ({plan['final_bytes'] / gb:.2f} GB "
            f"kept) but {free / gb:.2f} GB are free (workflow.disk_safety={safety}). Free space, "
            "point workflow.results at a bigger disk, use fisher.store_dtype=bfloat16 (half "
            "the size) or fewer scored/reference/control samples")


def make_collector(f: dict, ex: dict, qcfg, spill: Path, partials: bool, micro_batch: int):
    """A FisherCollector for the fisher settings ``f`` and the collect rule's execution
    settings ``ex`` (gradient_memory_mb, gradient_format), spilling to ``spill``."""
    from .fisher import FisherCollector

    return FisherCollector(
        enable_cross_task_analysis=True,
        gradient_memory_mb=float(ex.get("gradient_memory_mb", 1024)),
        ema_decay=f["ema_decay"], store_dtype=f["store_dtype"], spill_dir=spill, config=qcfg,
        loss_reduction=f["loss_reduction"], progress=False, micro_batch=micro_batch,
        fisher_partials=partials, gradient_format=ex.get("gradient_format", "dense"))


def collect_role(collector, model, batch: dict, task: str, role: str, mode: str,
                 start: int, stop: int, micro_batch: int) -> dict:
    """Samples [start, stop) of one role, one micro-batch unit per call (the engine's own
    micro-batches, so the same numbers), under one progress bar counting the role's samples
    (rate, ETA). The Fisher (mode mean) is summed one unit per call, so shards (whole units)
    and one job add the same sums in the same order; mode ema takes one call (one update).
    Returns n, per-sample losses (batch order), sample ids, seconds."""
    from tqdm.auto import tqdm

    t = time.time()
    calls = [(a, min(a + micro_batch, stop)) for a in range(start, stop, micro_batch)]
    if role == "fisher" and mode != "mean":
        calls = [(start, stop)]
    losses, ids = [], []
    with tqdm(total=stop - start, desc=f"{task} ({role})", unit="sample") as bar:
        for a, b in calls:
            res = collector.collect_fisher(model, take(batch, a, b), task=task, mode=mode,
                                           role=role)
            losses += res["losses"]
            ids += list(res["sample_ids"])
            bar.update(b - a)
    return {"n": stop - start, "losses": losses, "sample_ids": ids, "seconds": time.time() - t}


def role_entry(batch: dict, losses: list[float], ids: list[str], seconds: float) -> dict:
    n = len(ids)
    return {"n": n, "mean_loss": sum(losses) / n, "seconds": seconds,
            "seconds_per_sample": seconds / n, "sample_ids": list(ids),
            "mean_tokens": float(batch["attention_mask"].sum(1).float().mean())}


def stored_entry(store, task: str, role: str) -> dict:
    import numpy as np

    ids = store.ids(task, role)
    norms = [float(x) for x in store.grad_norms(task, ids)]
    return {"grad_norms": norms, "mean_grad_norm": float(np.mean(norms)),
            "losses": [store.losses[(task, i)] for i in ids]}


def check_shards(task: str, shards: list[dict], dirs: list, ids_by_role: dict[str, list]) -> None:
    """The shard manifests (sorted by index) form shards 0..n-1 of one plan, one store folder
    each, and together hold every sample of every role once, in the data's order."""
    if [m["index"] for m in shards] != list(range(len(shards))) or \
            any(m["n_shards"] != len(shards) for m in shards) or len(dirs) != len(shards):
        raise ValueError(f"{task}: the shard manifests do not form shards 0..{len(shards) - 1} "
                         f"of one plan: {[(m['index'], m['n_shards']) for m in shards]}")
    for role, ids in ids_by_role.items():
        got = [i for m in shards for i in m["roles"].get(role, {}).get("sample_ids", [])]
        if got != [str(i) for i in ids]:
            raise ValueError(f"{task}/{role}: the shards collected {len(got)} samples, not the "
                             f"data's {len(ids)} in order")
