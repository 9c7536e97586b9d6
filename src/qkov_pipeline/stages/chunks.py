"""Layer chunks (resources.collect.layer_chunks = K > 1): rule ``chunk_scores`` collects and
scores one contiguous chunk of a model's layers for both arms of a pair, with no gradient
store (:func:`run_chunk`); rule ``scores`` joins the K chunks (:func:`run_join`; it also
writes the one chunk that stages.scores.run_stores scores from the stores). A run's only
chunk is saved joined, so the ``scores`` job reads it without importing torch. A chunk
job takes a GPU of its own (slot = chunk index), prints its plan and refuses, before
collecting, a layer that cannot fit (interference.scores.chunks). A chunk job of random
weights makes the model itself and starts without prepare_model's folder; the join then
checks the data's tokenizer digests it recorded against model.json. The joined cells.csv
equals the stores' byte for byte (same device type and threads; tests/test_chunks.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from ..jobs import set_threads
from ..plan import MICRO_BATCH
from .scores import write

logger = logging.getLogger("qkov.scores")
HOST_SHARE = 0.8   # of the host's free memory (and the job's mem_mb) rows kept there may take


def _load(job, ex: dict, slot: int):
    """(model on its device, task -> role -> batch, task -> data meta, device, device info,
    threads) of a chunk job."""
    from interference.data import load_task_batches
    from interference.models import load_prepared

    from ..jobs import choose_devices, log_placement
    from .tokenizer import check_same_tokenizer

    threads = set_threads(job, ex)
    devices, dev_info = choose_devices(job.held_locks, ex.get("device", "auto"), slot,
                                       ex.get("gpu") or 1)
    device = devices[0]
    logger.info("device %s (%s); threads %d", ", ".join(devices), dev_info, threads)
    mcfg = next(iter(job.slice["stores"].values()))["data"]["model"]
    # random weights are made here, without prepare_model's folder (plan.loads_prepared):
    # the data's tokenizer is then checked against model.json where the chunks are joined
    model_json = job.input.model[0] if "model" in job.input.keys() else None
    with job.timed("load"):
        folder = Path(model_json).parent if model_json else None
        model, _ = load_prepared(folder, mcfg, devices)
        log_placement(model, dev_info)
        batches, metas = {}, {}
        for path in job.input.data:
            b, _, meta = load_task_batches(Path(path).parent)
            if model_json:
                check_same_tokenizer(model_json, meta, Path(path).parent)
            batches[meta["task_name"]], metas[meta["task_name"]] = b, meta
    return model, batches, metas, device, dev_info, threads


def chunk_plan(job, model, batches, ex: dict, device: str, threads: int) -> dict:
    """This chunk's plan, logged before any collection (scores.chunks.plan_chunk_job)."""
    from interference.placement import model_devices
    from interference.scores.chunks import memory_budget, plan_chunk_job

    store = next(iter(job.slice["stores"].values()))
    mcfg = store["data"]["model"]
    # a model placed over several GPUs: each must have the pass's budget free (activations
    # and x, δ of its layers live on it)
    budget = min(memory_budget(ex.get("chunk_memory_mb"), ex.get("gradient_memory_mb", 1024),
                               str(d)) for d in model_devices(model))
    # on a GPU, factored rows may stay in host memory instead (fewer passes for a large
    # model): within HOST_SHARE of what the host has free and the job asked for (mem_mb)
    host = None
    if device.startswith("cuda"):
        from interference.gradients.collect import available_memory

        have = [x for x in (available_memory(), float(ex.get("mem_mb") or 0) * 2**20) if x]
        host = HOST_SHARE * min(have) if have else None
    return plan_chunk_job(model, batches, int(job.wildcards["chunk"]),
                          int(job.slice["layer_chunks"]),
                          include_bias=mcfg.get("include_bias", False),
                          attention_stack=mcfg.get("attention_stack"),
                          store_dtype=store["fisher"]["store_dtype"],
                          gradient_format=ex.get("gradient_format", "dense"),
                          model_dtype=mcfg["dtype"], budget=budget, device=device,
                          threads=threads, micro_batch=MICRO_BATCH, host_budget=host)


def run_chunk(job) -> None:
    """One layer chunk of a pair: both arms' heatmaps and reference scores on its layers
    into ``chunks/<c>/<arm>/``, with the squared gradient norms of these layers."""
    from interference.gradients.collect import make_collector
    from interference.results import write_json
    from interference.scores.chunks import operand_budget_mb, peak_device_bytes
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
        # (beyond it rows spill to disk rather than run out of memory); rows kept on the
        # host: what the plan gave them there
        if plan["rows_on_host"]:
            held = dict(ex, gradient_memory_mb=plan["host_rows_bytes"] / 2**20)
        elif device.startswith("cuda"):
            held = dict(ex, gradient_memory_mb=max(
                0.0, plan["budget_bytes"] - transient[tuple(layers)]) / 2**20)
        else:
            held = ex
        return make_collector(fisher, held, plan["qkov_config"], spill, False, m,
                              layers=layers, keep_fisher_sums=False,
                              store_device="cpu" if plan["rows_on_host"] else device)

    ref_task = s["task_a"] if s["reference"] == "within_task" else s["reference"]
    # the scoring operands on a GPU stay within what the plan left them (not 80% of the
    # free memory of the moment, which the one pass over every disruptor set could take
    # beyond the chunk's budget); an explicit resources.scores.device_memory_mb is kept
    score_mb = scores_ex.get("device_memory_mb")
    if device.startswith("cuda") and score_mb == "auto":
        score_mb = operand_budget_mb(plan)
        logger.info("scoring operands within %.1f GiB (the plan's budget less rows and "
                    "Fisher)", score_mb / 1024)
    t_collect = time.time()
    with job.timed("collect_and_score"):
        res = score_layers(model, batches, s["task_a"], s["task_b"], plan["passes"], make,
                           arms=tuple(s["arms"]), reference_task=ref_task,
                           metric_kwargs=dict(s["metric"], device=device,
                                              device_memory_mb=score_mb),
                           fisher_mode=fisher["mode"], micro_batch=m,
                           contents={t: m.get("content") for t, m in metas.items()})
    seconds = time.time() - t_collect
    shutil.rmtree(spill, ignore_errors=True)
    only = plan["n_chunks"] == 1
    save_chunk_arms(out, res, only=only)
    write_json(out / "chunk.json", {
        "index": plan["index"], "n_chunks": plan["n_chunks"], "saved_joined": only,
        "layers": plan["layers"],
        "passes": plan["passes"], "micro_batch": m, "rows_bytes": plan["rows_bytes"],
        "rows_on_host": plan["rows_on_host"], "host_rows_bytes": plan["host_rows_bytes"],
        "score_tiles": plan["score_tiles"], "predicted_peak_bytes": max(plan["peaks"]),
        "budget_bytes": plan["budget_bytes"], "estimate_s": plan["estimate_s"],
        "seconds_collect_and_score": seconds, "seconds_total": time.time() - t0,
        "seconds_load": job.metrics.get("time.load_s"), "started": t0, "finished": time.time(),
        "device": device, "device_info": dev_info, "threads": threads,
        "peak_device_bytes": peak_device_bytes(device), "config_hash": job.config_hash,
        "tokenizer_digests": {t: m.get("tokenizer_digest") for t, m in metas.items()}})
    logger.info("chunk %d: layers %s collected and scored in %.1f s (estimate %.0f s)",
                plan["index"], plan["layers"], seconds, plan["estimate_s"])
    # a chunk is part of its pair's scores: the join puts its numbers in the scores record
    # (it logs no MLflow run of its own: jobs.RULES_WITHOUT_RUNS)


def save_chunk_arms(out: Path, res: dict[str, dict], only: bool) -> None:
    """Each arm's result of a chunk (score_layers' format: heat, ref, ids_r, sq_norms_b,
    sq_norms_r, config, top_k) as ``out/<arm>/`` heatmap folders, which run_join reads.
    ``only``: the run's only chunk, saved as the join of itself (numpy means over the
    pairs, top conflicts ranked on the host), so rule scores reads it back without torch
    (interference.scores.join)."""
    from interference.results import save_heatmap
    from interference.scores.layerwise import join_heatmaps

    for arm, r in res.items():
        heat, ref = join_heatmaps([r["heat"]], [r["ref"]], r["config"], r["top_k"]) if only \
            else (r["heat"], r["ref"])
        save_heatmap(out / arm, heat, reference_scores=ref, extra={
            "sq_norms_b": r["sq_norms_b"].tolist(), "sq_norms_r": r["sq_norms_r"].tolist(),
            "qkov_config": r["config"].to_dict(), "top_k": r["top_k"],
            "sample_ids_r": r["ids_r"]})


def run_join(job) -> None:
    """Rule scores: this arm's heatmap and reference scores from the pair's chunks (layer
    order; norms = sqrt of the chunks' summed squares), written with its record. One chunk
    read from the stores, or K layer chunks (their times and plans go in the record)."""
    from interference.scores.join import join_chunk_folders

    with job.timed("join"):
        heat, ref, norms_b, norms_r, ids_r, infos = join_chunk_folders(job.input.chunks,
                                                                       job.slice["arm"])
    if "model" in job.input.keys():     # layer chunks: the model gates what they scored
        check_chunk_tokenizers(job.input.model[0], job.input.chunks, infos)
    if infos[0].get("source") == "stores":
        job.metric("time.score_arms_s", infos[0]["seconds_score"])
        job.metric("time.chunk_total_s", infos[0]["seconds_total"])
        return write(job, heat, ref, ids_r, norms_b, norms_r)
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


def check_chunk_tokenizers(model_json: str | Path, chunk_dirs: list, infos: list[dict]) -> None:
    """Each chunk's data were tokenised by the tokenizer model.json records (the digests
    its chunk.json lists per task; a chunk job that made random weights could not compare
    them itself). Raises ValueError naming the chunk (stages.tokenizer.check_same_tokenizer)."""
    from .tokenizer import check_same_tokenizer

    for folder, info in zip(chunk_dirs, infos):
        for task, digest in (info.get("tokenizer_digests") or {}).items():
            check_same_tokenizer(model_json, {"tokenizer_digest": digest},
                                 f"{folder} (task {task})")
