"""collect: one task's Fisher and per-sample gradients, role by role, saved as a store.

Roles: ``fisher`` updates the Fisher only; ``scored``, ``reference`` and ``control`` store
g_i (FisherCollector.collect_fisher(..., role=...)); disjointness by dataset id is checked
by the collector. Output ``_stores/<task>-<hash>/``: ``grads/`` (FisherCollector.save_task:
the gradient rows and fisher.safetensors) and ``store.json`` (per-role sample ids, losses,
gradient norms, token counts, sizes, timings, the estimate). Before collecting, the job
states its estimate and refuses a store the disk (or, on the CPU, the memory) cannot hold.
With ``resources.collect.shards`` = N > 1 the work is split into N ``collect_shard`` jobs
and gathered bitwise (qkov_pipeline.stages.shards). GPUs: a free one by lock file
(qkov_pipeline.jobs.acquire_gpu), under SLURM the one given; store.json says which.
resources.collect.gpu = N > 1: the job holds N GPUs and places the model over them (a
model larger than one GPU; interference.placement).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from interference.gradients.collect import (available_memory, check_disk, check_memory,
                                            collect_role, collection_estimate,
                                            engine_micro_batch, log_estimate, make_collector,
                                            role_entry, stored_entry)

from ..jobs import choose_devices, log_placement, set_threads
from ..plan import MICRO_BATCH, ROLE_ORDER

logger = logging.getLogger("qkov.gradients")


# ----------------------------------------------------------------------------- jobs

def collect_exec(job) -> dict:
    """resources.collect (+ disk_safety) of the job's experiment: the shard jobs
    (rule collect_shard) run with the collect rule's execution settings."""
    if job.rule == "collect":
        return dict(job.exec)
    return job.exec_of("collect")


def load_inputs(job, ex: dict, slot: int):
    """(model on its device, batches, data meta, QKOVConfig, QKOVIndexer, device, device
    info, threads) of a collect job."""
    from interference.architectures import QKOVConfig, QKOVIndexer
    from interference.data import load_task_batches
    from interference.models import load_prepared

    from .tokenizer import check_same_tokenizer

    s = job.slice
    d = s["data"]
    threads = set_threads(job, ex)
    devices, dev_info = choose_devices(job.held_locks, ex.get("device", "auto"), slot,
                                       ex.get("gpu") or 1)
    device = devices[0]
    logger.info("device %s (%s); threads %d", ", ".join(devices), dev_info, threads)
    with job.timed("load"):
        model, _ = load_prepared(Path(job.input.model).parent, d["model"], devices)
        batches, records, meta = load_task_batches(Path(job.input.data).parent)
    log_placement(model, dev_info)
    check_same_tokenizer(job.input.model, meta, Path(job.input.data).parent)
    unknown = sorted(set(batches) - set(ROLE_ORDER))
    if unknown:
        raise ValueError(f"{job.input.data}: unknown roles {unknown}")
    qcfg = QKOVConfig.from_model(model, include_bias=d["model"].get("include_bias", False),
                                 attention_stack=d["model"].get("attention_stack"))
    return model, batches, meta, qcfg, QKOVIndexer(model, qcfg), device, dev_info, threads


def micro_batch_of(ex: dict) -> int:
    """The gradient engine's micro-batch of a collect job (resources.collect.micro_batch)
    within the MICRO_BATCH-sample units it collects."""
    return engine_micro_batch(ex.get("micro_batch", MICRO_BATCH), MICRO_BATCH)


def estimate_and_check(job, ex: dict, model, indexer, batches: dict, device: str,
                       threads: int, where: Path) -> dict:
    """The collection's estimate (rows, disk, memory, time), logged and recorded before
    any work; refuses (RuntimeError) a store the disk cannot hold and, on the CPU, rows and
    Fisher the host memory cannot hold."""
    est = collection_estimate(model, indexer, batches, job.slice["fisher"]["store_dtype"],
                              ex.get("gradient_format", "dense"),
                              float(ex.get("gradient_memory_mb", 1024)), device, threads,
                              micro_batch_of(ex))
    log_estimate(job.slice["data"]["task"], est)
    for k in ("rows_bytes", "memory_bytes", "seconds"):
        job.metric(f"estimate.{k}", est[k])
    check_disk(where, est["disk"], float(ex.get("disk_safety", 0.9)))
    if device == "cpu":
        check_memory(est, available_memory())
    return est


def run(job) -> None:
    from .shards import run_gather, run_shard

    if job.rule == "collect_shard":
        return run_shard(job)
    if list(getattr(job.input, "shards", []) or []):
        return run_gather(job)
    return run_collect(job)


def run_collect(job) -> None:
    """The whole task in this job (resources.collect.shards = 1)."""
    import torch

    s = job.slice
    d, f = s["data"], s["fisher"]
    task = d["task"]
    ex = collect_exec(job)
    out = Path(job.output.manifest).parent
    grads = Path(job.output.grads)
    spill = out / ".spill"
    shutil.rmtree(spill, ignore_errors=True)
    model, batches, meta, qcfg, indexer, device, dev_info, threads = load_inputs(job, ex, 0)
    n_params = indexer.total_size
    roles = [r for r in ROLE_ORDER if r in batches]
    est = estimate_and_check(job, ex, model, indexer, batches, device, threads, out)
    micro_batch = micro_batch_of(ex)
    collector = make_collector(f, ex, qcfg, spill, False, micro_batch)
    info = {"task": task, "split_seed": d["split_seed"], "roles": {},
            "n_attention_params": n_params, "device": device, "device_info": dev_info,
            "threads": threads, "micro_batch": micro_batch, "torch": torch.__version__,
            "config_hash": job.config_hash,
            "store_dtype": f["store_dtype"], "fisher_mode": f["mode"], "n_shards": 1,
            **est["disk"], "estimate": {k: v for k, v in est.items() if k != "disk"}}
    total_t, total_n = time.time(), 0
    for role in roles:
        batch = batches[role]
        n = len(batch["sample_ids"])
        logger.info("%s/%s: %d samples (%s) ...", task, role, n,
                    "Fisher only" if role == "fisher" else "g_i stored")
        res = collect_role(collector, model, batch, task, role, f["mode"], 0, n, MICRO_BATCH)
        total_n += n
        entry = role_entry(batch, res["losses"], res["sample_ids"], res["seconds"])
        if role != "fisher":
            entry.update(stored_entry(collector.gradient_manager, task, role))
            job.metric(f"grad.{role}.mean_grad_norm", entry["mean_grad_norm"])
        info["roles"][role] = entry
        job.metric(f"grad.{role}.n", n)
        job.metric(f"grad.{role}.mean_loss", entry["mean_loss"])
        job.metric(f"time.{role}_s", entry["seconds"])
        logger.info("%s/%s: %d samples in %.1f s (%.2f s/sample), mean loss %.4f", task, role,
                    n, entry["seconds"], entry["seconds"] / n, entry["mean_loss"])
    job.metric("time.collect_s", time.time() - total_t)
    job.metric("time.per_sample_s", (time.time() - total_t) / max(total_n, 1))
    with job.timed("save"):
        collector.save_task(task, grads, meta={"config_hash": job.config_hash,
                                               "data": meta, "store_slice_hash": job.config_hash})
    shutil.rmtree(spill, ignore_errors=True)
    info["disk_bytes"] = int(sum(p.stat().st_size for p in grads.rglob("*") if p.is_file()))
    info["memory"] = collector.gradient_manager.get_memory_usage()
    from interference.results import write_json

    write_json(job.output.manifest, info)
    job.metric("store.disk_mb", info["disk_bytes"] / 2**20)
    job.tags["qkov.device"] = device
    job.artifact(job.output.manifest)


