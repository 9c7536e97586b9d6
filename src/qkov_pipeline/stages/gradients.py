"""collect: one task's Fisher and per-sample gradients, role by role, saved as a store.

Roles: ``fisher`` updates the Fisher only; ``scored``, ``reference`` and ``control`` store
g_i (FisherCollector.collect_fisher(..., role=...)); disjointness by dataset id is checked
by the collector. Output ``_stores/<task>-<hash>/``: ``grads/`` (FisherCollector.save_task:
the gradient rows and fisher.safetensors) and ``store.json`` (per-role sample ids, losses,
gradient norms, token counts, sizes, timings). Before collecting, the job states the disk
it needs and refuses when the disk cannot hold it.

Shards (``resources.collect.shards`` = N > 1, an execution setting like threads): the
task's samples are cut into micro-batch units (``MICRO_BATCH`` samples of one role, the
batches the gradient engine runs anyway) and the units into N contiguous groups of about
equal size (:func:`shard_plan`). Rule ``collect_shard`` collects one group per job (own GPU
or node) and saves it with the Fisher as partial sums + counts; rule ``collect`` then
gathers them (:func:`run_gather`: row files hard-linked, Fisher = Σ partial sums / total
count). Every g_i is computed in the same micro-batch as unsharded and the Fisher is summed
unit by unit in the same order, so the gathered store equals the unsharded one bitwise
(same threads and device type). Fisher mode ``ema`` is order-dependent across calls and is
refused with more than one shard.

GPUs: on a machine with several visible GPUs and no scheduler assigning them (no
``SLURM_JOB_ID``), each collect job takes a free GPU by a lock file
(:func:`qkov_pipeline.jobs.acquire_gpu`; shard i tries GPU i mod n first), so shards that
run at the same time run on different GPUs. Under SLURM (``resources.collect.gpu: 1`` -> ``--gpus=1``) the job
uses the GPU SLURM gave it. store.json ``shards`` / ``device_info`` say which device ran what.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from ..jobs import choose_device, read_json
from ..plan import MICRO_BATCH, ROLE_ORDER, planned_shards, shard_plan

logger = logging.getLogger("qkov.gradients")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ----------------------------------------------------------------------------- planning


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


# ----------------------------------------------------------------------------- disk

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


# ----------------------------------------------------------------------------- jobs

def collect_exec(job) -> dict:
    """resources.collect (+ disk_safety) of the job's experiment: the shard jobs
    (rule collect_shard) run with the collect rule's execution settings."""
    if job.rule == "collect":
        return dict(job.exec)
    meta = job.smk.config.get("_qkov", {})
    return dict(meta.get("exec", {}).get(job.experiment, {}).get("collect", {}))


def _set_threads(job, ex: dict) -> int:
    """torch's thread count from the config (resources.collect.threads), as every job."""
    import torch

    threads = int(ex.get("threads", job.threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)
    return threads


def _collector(f: dict, ex: dict, qcfg, spill: Path, partials: bool):
    from interference.gradients import FisherCollector

    return FisherCollector(
        enable_cross_task_analysis=True,
        gradient_memory_mb=float(ex.get("gradient_memory_mb", 1024)),
        ema_decay=f["ema_decay"], store_dtype=f["store_dtype"], spill_dir=spill, config=qcfg,
        loss_reduction=f["loss_reduction"], progress=True, micro_batch=MICRO_BATCH,
        fisher_partials=partials, gradient_format=ex.get("gradient_format", "dense"))


def _collect_role(collector, model, batch: dict, task: str, role: str, mode: str,
                  start: int, stop: int) -> dict:
    """Samples [start, stop) of one role. The Fisher (mode mean) is summed one micro-batch
    unit per call, so shards (whole units) and one job add the same sums in the same order.
    Returns n, per-sample losses (batch order), sample ids, seconds."""
    t = time.time()
    calls = [(start, stop)]
    if role == "fisher" and mode == "mean":
        calls = [(a, min(a + MICRO_BATCH, stop)) for a in range(start, stop, MICRO_BATCH)]
    losses, ids = [], []
    for a, b in calls:
        res = collector.collect_fisher(model, take(batch, a, b), task=task, mode=mode, role=role)
        losses += res["losses"]
        ids += list(res["sample_ids"])
    return {"n": stop - start, "losses": losses, "sample_ids": ids, "seconds": time.time() - t}


def _load(job, ex: dict, slot: int):
    from interference.architectures import QKOVConfig, QKOVIndexer
    from interference.data import load_task_batches
    from interference.models import load_prepared

    s = job.slice
    d = s["data"]
    threads = _set_threads(job, ex)
    device, dev_info = choose_device(ex.get("device", "auto"), slot)
    logger.info("device %s (%s); threads %d", device, dev_info, threads)
    with job.timed("load"):
        model, _ = load_prepared(Path(job.input.model).parent, d["model"])
        model.to(device)
        batches, records, meta = load_task_batches(Path(job.input.data).parent)
    unknown = sorted(set(batches) - set(ROLE_ORDER))
    if unknown:
        raise ValueError(f"{job.input.data}: unknown roles {unknown}")
    qcfg = QKOVConfig.from_model(model, include_bias=d["model"].get("include_bias", False))
    n_params = QKOVIndexer(model, qcfg).total_size
    return model, batches, meta, qcfg, n_params, device, dev_info, threads


def _role_entry(batch: dict, losses: list[float], ids: list[str], seconds: float) -> dict:
    n = len(ids)
    return {"n": n, "mean_loss": sum(losses) / n, "seconds": seconds,
            "seconds_per_sample": seconds / n, "sample_ids": list(ids),
            "mean_tokens": float(batch["attention_mask"].sum(1).float().mean())}


def _stored_entry(store, task: str, role: str) -> dict:
    import numpy as np

    ids = store.ids(task, role)
    norms = [float(x) for x in store.grad_norms(task, ids)]
    return {"grad_norms": norms, "mean_grad_norm": float(np.mean(norms)),
            "losses": [store.losses[(task, i)] for i in ids]}


def run(job) -> None:
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
    model, batches, meta, qcfg, n_params, device, dev_info, threads = _load(job, ex, 0)
    roles = [r for r in ROLE_ORDER if r in batches]
    n_stored = sum(len(batches[r]["sample_ids"]) for r in roles if r != "fisher")
    plan = disk_plan(n_params, n_stored, f["store_dtype"])
    check_disk(out, plan, float(ex.get("disk_safety", 0.9)))
    collector = _collector(f, ex, qcfg, spill, partials=False)
    info = {"task": task, "split_seed": d["split_seed"], "roles": {},
            "n_attention_params": n_params, "device": device, "device_info": dev_info,
            "threads": threads, "torch": torch.__version__, "config_hash": job.config_hash,
            "store_dtype": f["store_dtype"], "fisher_mode": f["mode"], "n_shards": 1, **plan}
    total_t, total_n = time.time(), 0
    for role in roles:
        batch = batches[role]
        n = len(batch["sample_ids"])
        logger.info("%s/%s: %d samples (%s) ...", task, role, n,
                    "Fisher only" if role == "fisher" else "g_i stored")
        res = _collect_role(collector, model, batch, task, role, f["mode"], 0, n)
        total_n += n
        entry = _role_entry(batch, res["losses"], res["sample_ids"], res["seconds"])
        if role != "fisher":
            entry.update(_stored_entry(collector.gradient_manager, task, role))
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


def run_shard(job) -> None:
    """One shard of a task (rule collect_shard): its units of every role, saved with the
    Fisher as partial sums; ``shard.json`` says what it collected, where and how fast."""
    import torch

    from interference.results import write_json

    from .. import tracking

    s = job.slice
    d, f = s["data"], s["fisher"]
    task = d["task"]
    ex = collect_exec(job)
    index = int(job.wildcards["shard"])
    requested = int(ex.get("shards", 1))
    out = Path(job.output.manifest).parent
    grads = Path(job.output.grads)
    spill = out / ".spill"
    shutil.rmtree(spill, ignore_errors=True)
    t0 = time.time()
    model, batches, meta, qcfg, n_params, device, dev_info, threads = _load(job, ex, index)
    started = time.time()
    sizes = {r: len(b["sample_ids"]) for r, b in batches.items()}
    plan = shard_plan(sizes, requested)
    if f["mode"] != "mean":
        planned_shards(s, requested)          # raises the EMA message
    if index >= len(plan):
        raise ValueError(f"shard {index} of {task}: the data ({sizes}) makes only "
                         f"{len(plan)} shards of {MICRO_BATCH}-sample units")
    ranges = plan[index]
    logger.info("shard %d of %d (%s): %s", index, len(plan), task,
                {r: f"[{a}, {b})" for r, (a, b) in ranges.items()})
    n_stored = sum(b - a for r, (a, b) in ranges.items() if r != "fisher")
    check_disk(out, disk_plan(n_params, n_stored, f["store_dtype"]),
               float(ex.get("disk_safety", 0.9)))
    collector = _collector(f, ex, qcfg, spill, partials=True)
    shard = {"task": task, "index": index, "n_shards": len(plan), "ranges": ranges,
             "roles": {}, "device": device, "device_info": dev_info, "threads": threads,
             "torch": torch.__version__, "config_hash": job.config_hash}
    t_collect = time.time()
    for role in ROLE_ORDER:
        if role not in ranges:
            continue
        a, b = ranges[role]
        res = _collect_role(collector, model, batches[role], task, role, f["mode"], a, b)
        shard["roles"][role] = res
        job.metric(f"grad.{role}.n", res["n"])
        logger.info("%s/%s [%d, %d): %d samples in %.1f s", task, role, a, b, res["n"],
                    res["seconds"])
    shard["seconds_collect"] = time.time() - t_collect
    with job.timed("save"):
        collector.save_task(task, grads, partial=True, meta={
            "config_hash": job.config_hash, "data": meta, "store_slice_hash": job.config_hash,
            "shard": index, "n_shards": len(plan)})
    shutil.rmtree(spill, ignore_errors=True)
    shard["seconds_total"] = time.time() - t0
    shard["started"], shard["finished"] = started, time.time()   # collecting (after loading)
    shard["memory"] = collector.gradient_manager.get_memory_usage()
    write_json(job.output.manifest, shard)
    # A shard is part of its store's collect run: the gather puts its numbers in store.json
    # and in the collect record; it logs no MLflow run of its own (in no tracking mode).
    os.environ[tracking.ENV_MODE] = "off"


def run_gather(job) -> None:
    """Rule collect with shards: combine the shards' stores (row files hard-linked, Fisher
    = Σ partial sums / count) into ``grads/`` and write store.json as one job would."""
    import torch

    from interference.data import load_task_batches
    from interference.gradients import FisherCollector, GradientStore
    from interference.results import write_json

    s = job.slice
    d, f = s["data"], s["fisher"]
    task = d["task"]
    shards = sorted((read_json(p) for p in job.input.shards), key=lambda m: m["index"])
    dirs = [Path(p) for p in job.input.shard_grads]
    if [m["index"] for m in shards] != list(range(len(shards))) or \
            any(m["n_shards"] != len(shards) for m in shards) or len(dirs) != len(shards):
        raise ValueError(f"{task}: the shard manifests do not form shards 0..{len(shards) - 1} "
                         f"of one plan: {[(m['index'], m['n_shards']) for m in shards]}")
    batches, _, meta = load_task_batches(Path(job.input.data).parent)
    roles = [r for r in ROLE_ORDER if r in batches]
    for role in roles:    # every sample once, in order
        got = [i for m in shards for i in m["roles"].get(role, {}).get("sample_ids", [])]
        if got != [str(i) for i in batches[role]["sample_ids"]]:
            raise ValueError(f"{task}/{role}: the shards collected {len(got)} samples, not the "
                             f"data's {len(batches[role]['sample_ids'])} in order")
    grads = Path(job.output.grads)
    with job.timed("gather"):
        FisherCollector.gather_saved(dirs, grads, meta={
            "config_hash": job.config_hash, "data": meta, "store_slice_hash": job.config_hash,
            "n_shards": len(shards)})
    store = GradientStore.open(grads)
    n_params = store.size
    n_stored = sum(len(batches[r]["sample_ids"]) for r in roles if r != "fisher")
    devices = [m["device"] for m in shards]
    info = {"task": task, "split_seed": d["split_seed"], "roles": {},
            "n_attention_params": n_params, "device": ",".join(dict.fromkeys(devices)),
            "threads": shards[0]["threads"], "torch": torch.__version__,
            "config_hash": job.config_hash, "store_dtype": f["store_dtype"],
            "fisher_mode": f["mode"], "n_shards": len(shards),
            **disk_plan(n_params, n_stored, f["store_dtype"])}
    for role in roles:
        parts = [m["roles"][role] for m in shards if role in m["roles"]]
        losses = [x for p in parts for x in p["losses"]]
        ids = [i for p in parts for i in p["sample_ids"]]
        entry = _role_entry(batches[role], losses, ids, sum(p["seconds"] for p in parts))
        if role != "fisher":
            entry.update(_stored_entry(store, task, role))
            job.metric(f"grad.{role}.mean_grad_norm", entry["mean_grad_norm"])
        info["roles"][role] = entry
        job.metric(f"grad.{role}.n", entry["n"])
        job.metric(f"grad.{role}.mean_loss", entry["mean_loss"])
        job.metric(f"time.{role}_s", entry["seconds"])
    info["shards"] = [{k: m[k] for k in ("index", "device", "device_info", "threads",
                                         "seconds_collect", "seconds_total", "started",
                                         "finished", "ranges")}
                      for m in shards]
    for m in shards:
        info["shards"][m["index"]]["n"] = {r: v["n"] for r, v in m["roles"].items()}
        job.metric(f"shard{m['index']}.time.collect_s", m["seconds_collect"])
        job.metric(f"shard{m['index']}.time.total_s", m["seconds_total"])
    total_n = sum(e["n"] for e in info["roles"].values())
    job.metric("time.collect_s", sum(m["seconds_collect"] for m in shards))
    job.metric("time.collect_wall_s", max(m["seconds_collect"] for m in shards))
    job.metric("time.per_sample_s", sum(m["seconds_collect"] for m in shards) / max(total_n, 1))
    job.metric("shards.n", len(shards))
    info["disk_bytes"] = int(sum(p.stat().st_size for p in grads.rglob("*") if p.is_file()))
    info["memory"] = {k: sum(m["memory"].get(k, 0) for m in shards)
                      for k in ("ram_mb", "disk_mb", "n_samples", "n_on_disk")}
    write_json(job.output.manifest, info)
    job.metric("store.disk_mb", info["disk_bytes"] / 2**20)
    job.tags["qkov.shards"] = len(shards)
    job.tags["qkov.device"] = ",".join(f"{m['index']}:{m['device']}@{m['device_info']['host']}"
                                       for m in shards)
    job.artifact(job.output.manifest)
    logger.info("gathered %d shards of %s: %s", len(shards), task,
                {m["index"]: (m["device"], m["device_info"].get("host")) for m in shards})
