"""collect with shards (resources.collect.shards = N > 1): rule ``collect_shard`` collects one
contiguous group of micro-batch units of a task (:func:`run_shard`), rule ``collect`` gathers
the groups into the store one job would have written (:func:`run_gather`: row files
hard-linked, Fisher = Σ partial sums / total count; bitwise equal to the unsharded store).
See qkov_pipeline.stages.gradients for the store and qkov_pipeline.plan for the shard plan.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from interference.gradients.collect import (check_shards, collect_role, disk_plan,
                                            gathered_entries, make_collector, shard_summaries,
                                            take)

from ..jobs import read_json
from ..plan import MICRO_BATCH, ROLE_ORDER, planned_shards, shard_plan
from .gradients import collect_exec, estimate_and_check, load_inputs, micro_batch_of

logger = logging.getLogger("qkov.gradients")


def run_shard(job) -> None:
    """One shard of a task (rule collect_shard): its units of every role, saved with the
    Fisher as partial sums; ``shard.json`` says what it collected, where and how fast."""
    import torch

    from interference.results import write_json

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
    model, batches, meta, qcfg, indexer, device, dev_info, threads = load_inputs(job, ex, index)
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
    estimate_and_check(job, ex, model, indexer,
                       {r: take(batches[r], a, b) for r, (a, b) in ranges.items()},
                       device, threads, out)
    micro_batch = micro_batch_of(ex)
    collector = make_collector(f, ex, qcfg, spill, True, micro_batch)
    shard = {"task": task, "index": index, "n_shards": len(plan), "ranges": ranges,
             "roles": {}, "device": device, "device_info": dev_info, "threads": threads,
             "micro_batch": micro_batch,
             "torch": torch.__version__, "config_hash": job.config_hash}
    t_collect = time.time()
    for role in ROLE_ORDER:
        if role not in ranges:
            continue
        a, b = ranges[role]
        res = collect_role(collector, model, batches[role], task, role, f["mode"], a, b,
                           MICRO_BATCH)
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
    # and in the collect record (no MLflow run of its own: jobs.RULES_WITHOUT_RUNS).


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
    batches, _, meta = load_task_batches(Path(job.input.data).parent)
    roles = [r for r in ROLE_ORDER if r in batches]
    check_shards(task, shards, dirs, {r: batches[r]["sample_ids"] for r in roles})
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
    info["roles"] = gathered_entries(shards, batches, store, task, roles)
    for role, entry in info["roles"].items():
        if role != "fisher":
            job.metric(f"grad.{role}.mean_grad_norm", entry["mean_grad_norm"])
        job.metric(f"grad.{role}.n", entry["n"])
        job.metric(f"grad.{role}.mean_loss", entry["mean_loss"])
        job.metric(f"time.{role}_s", entry["seconds"])
    info["shards"] = shard_summaries(shards)
    for m in shards:
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
