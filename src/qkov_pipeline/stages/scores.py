"""scores: the QK-OV heatmap of one analysis and split seed, with its reference scores.

The arms (``main``: A vs B; ``control``: A vs A', normalised by the same Fisher) and the
reference disruptors' scores are :mod:`interference.scores.arms`. Output: ``split<seed>/``
with scores.npz and heatmap.json (interference.results).

Rule ``chunk_scores`` computes, per pair and split seed, both arms and the reference scores
together (task A's rows are made once for B, A' and R; the reference scores once for both
arms) into ``split<seed>/chunks/<c>/`` (temporary); rule ``scores`` writes one arm's files
from the chunks (:func:`qkov_pipeline.stages.chunks.run_join`). With the gradient stores
(``resources.collect.layer_chunks`` = 1) there is one chunk of every layer
(:func:`run_stores`); with layer chunks K > 1 each of K jobs collects and scores its layers
(:func:`qkov_pipeline.stages.chunks.run_chunk`).

Before scoring, a stores job refuses a stale store (its recorded config hash is not the
hash of the store slice this analysis needs) and a task B whose samples are task A's (same
ids and texts: "task A equals task B" is decided by samples, not names).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from interference._tables import BLOCKS

from ..plan import digest

logger = logging.getLogger("qkov.scores")


def store_metas(dirs) -> dict[str, dict]:
    """task -> (directory, the meta saved with the store: config hash, data meta, indexer)."""
    out = {}
    for d in dirs:
        index = Path(d) / "index.json"
        if not index.is_file():
            raise ValueError(f"gradient store {d} has no index.json (an interrupted collection?); "
                             f"delete {Path(d).parent} and rerun (snakemake --rerun-incomplete)")
        meta = json.loads(index.read_text()).get("meta", {})
        out[meta.get("task")] = dict(meta, directory=str(d))
    return out


def check_stores(s: dict, metas: dict[str, dict]) -> None:
    """Each store must be the one this analysis' config asks for (a store copied in from another
    model or config, or left from an older version, is stale): its recorded config hash equals
    the hash of the store slice this job expects."""
    for task, sslice in s["stores"].items():
        meta = metas.get(task)
        if meta is None:
            raise ValueError(f"no gradient store of task {task!r} among the inputs "
                             f"({sorted(k for k in metas if k)}); rerun the collect rule")
        want = digest(sslice)
        got = meta.get("store_slice_hash") or meta.get("config_hash")
        if got != want:
            raise ValueError(
                f"gradient store {meta['directory']} is stale: it was collected for config hash "
                f"{got!r} but this analysis needs {want!r} (another model, data, split seed or "
                f"Fisher settings, or an older version of the workflow). Delete "
                f"{Path(meta['directory']).parent} and rerun, or rerun with "
                f"`snakemake --forcerun collect`")


def store_contents(metas: dict[str, dict]) -> dict[str, dict | None]:
    """task -> {sample id: content digest} recorded with its store (None where unknown)."""
    return {t: (m.get("data") or {}).get("content") for t, m in metas.items()}


def run(job) -> None:
    if job.rule == "chunk_scores":
        if list(getattr(job.input, "grads", []) or []):
            return run_stores(job)
        from .chunks import run_chunk

        return run_chunk(job)
    from .chunks import run_join

    return run_join(job)


def run_stores(job) -> None:
    """Rule chunk_scores with the gradient stores (resources.collect.layer_chunks = 1): both
    arms' heatmaps and the reference scores on every layer, in one pass over the (layer,
    block)s (interference.scores.arms.score_arms), into ``chunks/0/<arm>/``; rule scores
    writes each arm's files from there."""
    from interference.gradients import FisherCollector
    from interference.results import write_json
    from interference.scores import QKOVInterferenceMetric
    from interference.scores.arms import arm_results

    from .chunks import save_chunk_arms

    s = job.slice
    t0 = time.time()
    a, b, arms = s["task_a"], s["task_b"], tuple(s["arms"])
    ref_task = a if s["reference"] == "within_task" else s["reference"]
    dirs = [Path(p) for p in job.input.grads]
    metas = store_metas(dirs)
    check_stores(s, metas)
    with job.timed("open_stores"):
        collector = FisherCollector.from_saved(dirs)
    device = job.device()
    metric = QKOVInterferenceMetric(collector.config, collector, device=device,
                                    device_memory_mb=job.exec.get("device_memory_mb"),
                                    **s["metric"])
    with job.timed("score_arms"):
        res = arm_results(metric, arms, a, b, ref_task, store_contents(metas))
    seconds = job.metrics["time.score_arms_s"]
    out = Path(job.output.part)
    save_chunk_arms(out, res, only=True)
    layers = list(collector.layers)
    write_json(out / "chunk.json", {
        "index": 0, "n_chunks": 1, "saved_joined": True, "layers": layers, "source": "stores",
        "seconds_score": seconds, "seconds_total": time.time() - t0,
        "started": t0, "finished": time.time(), "device": str(device),
        "config_hash": job.config_hash})
    logger.info("%s: %s and the reference scored in one pass over %d layers in %.1f s",
                job.wildcards["pair"], " and ".join(arms), len(layers), seconds)
    # its numbers go into each arm's scores record (no run of its own: RULES_WITHOUT_RUNS)


def write(job, heat: dict, ref: dict, ids_r: list[str], norms_b, norms_r, **more) -> None:
    """heatmap.json + scores.npz of the analysis, its metrics and log line; ``norms_b`` /
    ``norms_r``: [n] gradient norms of the disruptors / reference samples."""
    from interference.results import save_heatmap

    s = job.slice
    a, b, arm = s["task_a"], s["task_b"], s["arm"]
    ref_task = a if s["reference"] == "within_task" else s["reference"]
    meta = heat["meta"]
    extra = {"arm": arm, "pair": job.wildcards["pair"], "split_seed": int(job.wildcards["seed"]),
             "disruptor_task": b if arm == "main" else a, "reference_task": ref_task,
             "reference": s["reference"], "sample_ids_r": ids_r,
             "norms_b": [float(x) for x in norms_b], "norms_r": [float(x) for x in norms_r],
             "config_hash": job.config_hash, **more}
    with job.timed("save"):
        save_heatmap(Path(job.output.heatmap).parent, heat, extra=extra, reference_scores=ref)
    for blk in BLOCKS:
        job.metric(f"score.{blk}.mean", float(np.mean(heat[blk]["layer_head_avg"])))
        job.metric(f"score.{blk}.reference_mean", float(np.mean(ref[blk])))
    shares = [v["share_lambda_gt_fisher"] for v in meta["ridge"].values()]
    job.metric("ridge.max_share_lambda_gt_fisher", max(shares))
    logger.info("%s: %d x %d (B) and %d x %d (R) pairs, %d layers x %d heads; block means %s",
                job.wildcards["pair"], len(meta["sample_ids_a"]), len(meta["sample_ids_b"]),
                len(meta["sample_ids_a"]), len(ids_r), len(meta["layers"]), len(meta["heads"]),
                {blk: f"{np.mean(heat[blk]['layer_head_avg']):.4g}" for blk in BLOCKS})
    job.artifact(job.output.heatmap)
