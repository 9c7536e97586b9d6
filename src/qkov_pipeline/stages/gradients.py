"""collect: one task's Fisher and per-sample gradients, role by role, saved as a store.

Roles: ``fisher`` updates the Fisher only; ``scored``, ``reference`` and ``control`` store
g_i (FisherCollector.collect_fisher(..., role=...)); disjointness by dataset id is checked
by the collector. Output ``_stores/<task>-<hash>/``: ``grads/`` (FisherCollector.save_task:
the gradient rows and fisher.safetensors) and ``store.json`` (per-role sample ids, losses,
gradient norms, token counts, sizes, timings). Before collecting, the job states the disk
it needs and refuses when the disk cannot hold it.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..jobs import read_json
from . import model as model_stage

logger = logging.getLogger("qkov.gradients")
ROLE_ORDER = ("fisher", "scored", "reference", "control")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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


def run(job) -> None:
    from interference.architectures import QKOVConfig, QKOVIndexer
    from interference.data import load_task_batches
    from interference.gradients import FisherCollector

    s = job.slice
    d, f = s["data"], s["fisher"]
    task, mcfg = d["task"], d["model"]
    out = Path(job.output.manifest).parent
    grads = Path(job.output.grads)
    spill = out / ".spill"
    shutil.rmtree(spill, ignore_errors=True)
    device = job.device()
    with job.timed("load"):
        model, _ = model_stage.load(Path(job.input.model).parent, mcfg)
        model.to(device)
        batches, records, meta = load_task_batches(Path(job.input.data).parent)
    qcfg = QKOVConfig.from_model(model, include_bias=mcfg.get("include_bias", False))
    n_params = QKOVIndexer(model, qcfg).total_size
    roles = [r for r in ROLE_ORDER if r in batches]
    unknown = sorted(set(batches) - set(ROLE_ORDER))
    if unknown:
        raise ValueError(f"{job.input.data}: unknown roles {unknown}")
    n_stored = sum(len(batches[r]["sample_ids"]) for r in roles if r != "fisher")
    plan = disk_plan(n_params, n_stored, f["store_dtype"])
    check_disk(out, plan, float(job.exec.get("disk_safety", 0.9)))
    collector = FisherCollector(
        enable_cross_task_analysis=True,
        gradient_memory_mb=float(job.exec.get("gradient_memory_mb", 1024)),
        ema_decay=f["ema_decay"], store_dtype=f["store_dtype"], spill_dir=spill, config=qcfg,
        loss_reduction=f["loss_reduction"], progress=True)
    info = {"task": task, "split_seed": d["split_seed"], "roles": {},
            "n_attention_params": n_params, "device": device,
            "threads": job.threads, "torch": torch.__version__, "config_hash": job.config_hash,
            "store_dtype": f["store_dtype"], "fisher_mode": f["mode"], **plan}
    total_t, total_n = time.time(), 0
    for role in roles:
        batch = batches[role]
        n = len(batch["sample_ids"])
        logger.info("%s/%s: %d samples (%s) ...", task, role, n,
                    "Fisher only" if role == "fisher" else "g_i stored")
        t = time.time()
        res = collector.collect_fisher(model, batch, task=task, mode=f["mode"], role=role)
        dt = time.time() - t
        total_n += n
        entry = {"n": n, "mean_loss": res["mean_loss"], "seconds": dt,
                 "seconds_per_sample": dt / n, "sample_ids": list(res["sample_ids"]),
                 "mean_tokens": float(batch["attention_mask"].sum(1).float().mean())}
        if role != "fisher":
            store = collector.gradient_manager
            ids = store.ids(task, role)
            entry["grad_norms"] = [float(x) for x in store.grad_norms(task, ids)]
            entry["mean_grad_norm"] = float(np.mean(entry["grad_norms"]))
            entry["losses"] = [store.losses[(task, i)] for i in ids]
            job.metric(f"grad.{role}.mean_grad_norm", entry["mean_grad_norm"])
        info["roles"][role] = entry
        job.metric(f"grad.{role}.n", n)
        job.metric(f"grad.{role}.mean_loss", res["mean_loss"])
        job.metric(f"time.{role}_s", dt)
        logger.info("%s/%s: %d samples in %.1f s (%.2f s/sample), mean loss %.4f", task, role,
                    n, dt, dt / n, res["mean_loss"])
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
    job.artifact(job.output.manifest)
