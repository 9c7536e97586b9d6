"""Layer chunks (resources.collect.layer_chunks = K > 1): rule ``chunk_scores`` collects and
scores one contiguous chunk of a model's layers for both arms of a pair, with no gradient
store (:func:`run_chunk`); rule ``scores`` joins the K chunks into the heatmap one job over
the stores would have written (:func:`run_join`).

A chunk job takes a GPU of its own like a collect shard (qkov_pipeline.jobs.choose_device,
slot = chunk index; under SLURM the one it was given), builds or loads the model there,
prints its estimate (passes, memory, time) and refuses, before collecting, a chunk whose
single layer does not fit the memory for rows (resources.collect.chunk_memory_mb, else 80%
of the GPU's free memory, else gradient_memory_mb on the CPU). Each (layer, block) score
reads only its layer's gradients and Fisher, and every sample runs in the same micro-batch
as in the collect job, so the joined cells.csv equals the stores' byte for byte (same
device type and threads; tests/test_chunks.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..plan import MICRO_BATCH
from .gradients import _set_threads
from .scores import write

logger = logging.getLogger("qkov.scores")


def _load(job, ex: dict, slot: int):
    """(model on its device, task -> role -> batch, task -> data meta, device, device info,
    threads) of a chunk job."""
    from interference.data import load_task_batches
    from interference.models import load_prepared

    from ..jobs import choose_device

    threads = _set_threads(job, ex)
    device, dev_info = choose_device(job.held_locks, ex.get("device", "auto"), slot)
    logger.info("device %s (%s); threads %d", device, dev_info, threads)
    mcfg = next(iter(job.slice["stores"].values()))["data"]["model"]
    with job.timed("load"):
        model, _ = load_prepared(Path(job.input.model[0]).parent, mcfg, device)
        batches, metas = {}, {}
        for path in job.input.data:
            b, _, meta = load_task_batches(Path(path).parent)
            batches[meta["task_name"]], metas[meta["task_name"]] = b, meta
    return model, batches, metas, device, dev_info, threads


def memory_budget(ex: dict, device: str) -> float:
    """Bytes one pass may peak at beyond the model (stored rows, a micro-batch's per-sample
    gradients and their copy, the Fisher's float64 sums, activations: collect.pass_memory):
    resources.collect.chunk_memory_mb, else 80% of the GPU's free memory after the model
    (20% left for the CUDA context, cuBLAS workspaces, the scoring and the estimate's
    error), else gradient_memory_mb on the CPU."""
    if ex.get("chunk_memory_mb"):
        return float(ex["chunk_memory_mb"]) * 2**20
    if device.startswith("cuda"):
        import torch

        return 0.8 * torch.cuda.mem_get_info(torch.device(device))[0]
    return float(ex.get("gradient_memory_mb", 1024)) * 2**20


def chunk_plan(job, model, batches, ex: dict, device: str, threads: int) -> dict:
    """This chunk's layers, passes, micro-batch and estimate (peak memory per pass,
    seconds), logged before any collection (layerwise.plan_chunk); refuses (ValueError) a
    chunk whose single layer does not fit the budget at micro-batch 1."""
    from interference.architectures import QKOVConfig, QKOVIndexer
    from interference.gradients.collect import stored_format
    from interference.results import size_text as size
    from interference.scores.layerwise import chunk_layers, plan_chunk

    s = job.slice
    mcfg = next(iter(s["stores"].values()))["data"]["model"]
    fisher = next(iter(s["stores"].values()))["fisher"]
    qcfg = QKOVConfig.from_model(model, include_bias=mcfg.get("include_bias", False))
    indexer = QKOVIndexer(model, qcfg)
    index, k = int(job.wildcards["chunk"]), int(s["layer_chunks"])
    chunks = chunk_layers(indexer.layers, k)
    if index >= len(chunks):
        raise ValueError(f"chunk {index}: the model has {len(indexer.layers)} attention "
                         f"layers, so only {len(chunks)} chunks (layer_chunks={k})")
    tokens = {(t, r): [int(x) for x in b["attention_mask"].sum(1).tolist()]
              for t, by_role in batches.items() for r, b in by_role.items()}
    budget = memory_budget(ex, device)
    fmt = stored_format(model, ex.get("gradient_format", "dense"))
    plan = plan_chunk(model, indexer, chunks[index],
                      [x for (_, r), v in tokens.items() if r != "fisher" for x in v],
                      [x for v in tokens.values() for x in v], [len(v) for v in tokens.values()],
                      fisher["store_dtype"], fmt, mcfg["dtype"], budget, device, threads,
                      MICRO_BATCH)
    fisher_bytes = 8 * len(batches) * sum(e.numel for (l, _), e in indexer.entries.items()
                                          if l in chunks[index])   # float64 on the host, per task
    logger.info("chunk %d of %d: layers %s in %d pass(es) of <= %d layers, micro-batch %d; "
                "peak beyond the model <= %s per pass (budget %s; rows %s, per-sample "
                "gradients %s + copy, Fisher sums %s, activations %s); host Fisher %s; about "
                "%.1f s of forward+backward", index, len(chunks), chunks[index],
                len(plan["passes"]), max(len(p) for p in plan["passes"]), plan["micro_batch"],
                size(max(plan["peaks"])), size(budget), size(plan["rows_bytes"]),
                size(plan["memory"][0]["grads"]), size(plan["memory"][0]["fisher"]),
                size(plan["memory"][0]["act"]), size(fisher_bytes), plan["estimate_s"])
    if plan["micro_batch"] != MICRO_BATCH:
        logger.warning("chunk %d: micro-batch %d instead of %d to fit the budget: the Fisher "
                       "is summed in other units, so cells.csv may differ from the stores' "
                       "run in the last digits", index, plan["micro_batch"], MICRO_BATCH)
    return dict(plan, index=index, n_chunks=len(chunks), layers=chunks[index],
                qkov_config=qcfg, fisher_bytes=fisher_bytes, budget_bytes=budget)


def run_chunk(job) -> None:
    """One layer chunk of a pair: both arms' heatmaps and reference scores on its layers
    into ``chunks/<c>/<arm>/``, with the squared gradient norms of these layers."""
    from interference.gradients.collect import make_collector
    from interference.results import save_heatmap, write_json
    from interference.scores.layerwise import score_layers

    s = job.slice
    ex = dict(job.exec)
    out = Path(job.output.part)
    spill = out.parent / f".spill{job.wildcards['chunk']}"
    shutil.rmtree(spill, ignore_errors=True)
    t0 = time.time()
    # before CUDA starts: large, variously sized blocks (a micro-batch's [m, P] rows and
    # their cat, records of varying token counts) fragment fixed segments (the B2 OOM
    # found 31.6 GiB reserved but unallocated); growable segments let freed pages serve
    # the next large block. An explicit setting of the user's is kept.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    model, batches, metas, device, dev_info, threads = _load(job, ex, int(job.wildcards["chunk"]))
    plan = chunk_plan(job, model, batches, ex, device, threads)
    fisher = next(iter(s["stores"].values()))["fisher"]
    scores_ex = job.exec_of("scores")
    m = plan["micro_batch"]
    transient = {tuple(p): x["transient"] for p, x in zip(plan["passes"], plan["memory"])}

    def make(layers):
        # on the GPU the store holds what the stored roles' transients leave of the budget
        # (beyond it rows spill to disk rather than run out of memory)
        held = dict(ex, gradient_memory_mb=max(
            0.0, plan["budget_bytes"] - transient[tuple(layers)]) / 2**20) \
            if device.startswith("cuda") else ex
        return make_collector(fisher, held, plan["qkov_config"], spill, False, m,
                              layers=layers, store_device=device)

    ref_task = s["task_a"] if s["reference"] == "within_task" else s["reference"]
    t_collect = time.time()
    with job.timed("collect_and_score"):
        res = score_layers(model, batches, s["task_a"], s["task_b"], plan["passes"], make,
                           arms=tuple(s["arms"]), reference_task=ref_task,
                           metric_kwargs=dict(s["metric"], device=device,
                                              device_memory_mb=scores_ex.get("device_memory_mb")),
                           fisher_mode=fisher["mode"], micro_batch=m,
                           contents={t: m.get("content") for t, m in metas.items()})
    seconds = time.time() - t_collect
    shutil.rmtree(spill, ignore_errors=True)
    for arm, r in res.items():
        save_heatmap(out / arm, r["heat"], reference_scores=r["ref"], extra={
            "sq_norms_b": r["sq_norms_b"].tolist(), "sq_norms_r": r["sq_norms_r"].tolist(),
            "qkov_config": plan["qkov_config"].to_dict(), "top_k": r["top_k"],
            "sample_ids_r": r["ids_r"]})
    write_json(out / "chunk.json", {
        "index": plan["index"], "n_chunks": plan["n_chunks"], "layers": plan["layers"],
        "passes": plan["passes"], "micro_batch": m, "rows_bytes": plan["rows_bytes"],
        "predicted_peak_bytes": max(plan["peaks"]),
        "budget_bytes": plan["budget_bytes"], "estimate_s": plan["estimate_s"],
        "seconds_collect_and_score": seconds, "seconds_total": time.time() - t0,
        "seconds_load": job.metrics.get("time.load_s"), "started": t0, "finished": time.time(),
        "device": device, "device_info": dev_info, "threads": threads,
        "peak_device_bytes": _peak(device), "config_hash": job.config_hash})
    logger.info("chunk %d: layers %s collected and scored in %.1f s (estimate %.0f s)",
                plan["index"], plan["layers"], seconds, plan["estimate_s"])
    # a chunk is part of its pair's scores: the join puts its numbers in the scores record
    # and it logs no MLflow run of its own (as a collect shard)
    job.log_to_mlflow = False


def _peak(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(torch.device(device)))


def run_join(job) -> None:
    """Rule scores with layer chunks: the chunks' heatmaps of this arm, joined in layer
    order, written as the stores' path writes them (norms = sqrt of summed squares)."""
    from interference.architectures import QKOVConfig
    from interference.results import load_heatmap
    from interference.scores.layerwise import join_heatmaps

    from ..jobs import read_json

    arm = job.slice["arm"]
    dirs = sorted((Path(d) for d in job.input.chunks), key=lambda d: int(d.name))
    infos = [read_json(d / "chunk.json") for d in dirs]
    if [i["index"] for i in infos] != list(range(len(dirs))) or \
            any(i["n_chunks"] != len(dirs) for i in infos):
        raise ValueError(f"the chunk folders {[str(d) for d in dirs]} are not chunks "
                         f"0..{len(dirs) - 1} of one plan")
    loaded = [load_heatmap(d / arm) for d in dirs]
    extra = loaded[0][0]["extra"]
    with job.timed("join"):
        heat, ref = join_heatmaps([h for h, _ in loaded], [r for _, r in loaded],
                                  QKOVConfig(**extra["qkov_config"]), int(extra["top_k"]))
    norms_b = np.sqrt(np.sum([h["extra"]["sq_norms_b"] for h, _ in loaded], axis=0))
    norms_r = np.sqrt(np.sum([h["extra"]["sq_norms_r"] for h, _ in loaded], axis=0))
    ids_r = list(extra["sample_ids_r"])
    for i in infos:
        job.metric(f"chunk{i['index']}.time.total_s", i["seconds_total"])
        job.metric(f"chunk{i['index']}.time.collect_and_score_s", i["seconds_collect_and_score"])
        job.metric(f"chunk{i['index']}.passes", len(i["passes"]))
    job.metric("chunks.n", len(infos))
    job.metric("time.chunks_wall_s", max(i["seconds_total"] for i in infos))
    write(job, heat, ref, ids_r, norms_b, norms_r, layer_chunks=[
        {k: i[k] for k in ("index", "layers", "passes", "device", "device_info", "seconds_total",
                           "seconds_load", "seconds_collect_and_score", "estimate_s",
                           "rows_bytes", "peak_device_bytes", "started", "finished")}
        | {k: i.get(k) for k in ("micro_batch", "predicted_peak_bytes")}
        for i in infos])
