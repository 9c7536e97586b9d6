"""scores: the QK-OV heatmap of one analysis and split seed, with its reference scores.

Arm ``main``: A vs B (``compute_heatmap``). Arm ``control``: A vs A' (task A's held-out
``control`` samples in B's place), normalised by the SAME Fisher as the main arm (pooled
A and B by default) so the two are comparable. Both arms also score the reference
disruptors R (held-out task-A samples) against the same task-A samples with the same
normaliser (``pair_scores(..., fisher_tasks=...)``): the statistics compare B (or A') with R.
Output: ``split<seed>/`` with scores.npz and heatmap.json (interference.results).

Before scoring, the job refuses a stale store (its recorded config hash is not the hash of
the store slice this analysis needs) and a task B whose samples are task A's (same ids and
texts: "task A equals task B" is decided by samples, not names).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from interference._tables import BLOCKS, ROLES

from ..config import digest

logger = logging.getLogger("qkov.scores")


def control_heatmap(metric, task_a: str, task_b: str) -> dict:
    """A vs A' in compute_heatmap's format: task A's scored samples against its control
    samples, normalised as the pair A vs B is."""
    ids_c = metric.fisher_collector.sample_ids(task_a, "control")
    if not ids_c:
        raise ValueError(f"task {task_a!r} has no control samples; set control.n_control > 0")
    heat = metric.heatmap_of(task_a, metric.scored_ids(task_a), task_a, ids_c,
                             list(metric.fisher_collector.layers),
                             list(range(metric.config.num_heads)),
                             metric.fisher_tasks(task_a, task_b))
    heat["meta"]["control_of"] = task_b
    return heat


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


def check_disjoint_tasks(collector, metas: dict[str, dict], a: str, disruptor: str,
                         disruptor_ids: list[str], ref_task: str, ref_ids: list[str]) -> None:
    """B's disruptors (A' for the control) and the reference disruptors must not be samples
    of task A (any role): "task A equals task B" is decided by sample ids and texts, never by
    names. A held-out split of A shares none, so the negative control passes."""
    content = {t: (m.get("data") or {}).get("content") for t, m in metas.items()}
    a_ids = set(collector.sample_ids(a, "fisher"))
    for role in collector.gradient_manager.roles(a):
        a_ids |= set(collector.sample_ids(a, role))
    for task, ids, what in ((disruptor, disruptor_ids, "disruptors"),
                            (ref_task, ref_ids, "reference disruptors")):
        if task == a:   # the same task: roles are disjoint by id (split_task, collector)
            a_role = {i: r for r in ROLES
                      for i in collector.sample_ids(a, r)}
            clash = [i for i in ids if i in a_role and a_role[i] not in ("control", "reference")]
        else:
            ca, cb = content.get(a), content.get(task)
            clash = [i for i in ids if i in a_ids and (ca is None or cb is None
                                                       or ca.get(i) == cb.get(i))]
        if clash:
            raise ValueError(
                f"the {what} ({task!r}: {len(clash)} of {len(ids)} samples, e.g. {clash[:3]}) are "
                f"also samples of task A ({a!r}) with the same text: task A equals task B here. "
                "The negative control A vs A' is built in (control.enabled); to compare two "
                "variants of a source, make their samples differ")


def run(job) -> None:
    from interference.gradients import FisherCollector
    from interference.results import save_heatmap
    from interference.scores import QKOVInterferenceMetric

    s = job.slice
    a, b, arm = s["task_a"], s["task_b"], s["arm"]
    ref_task = a if s["reference"] == "within_task" else s["reference"]
    dirs = [Path(p) for p in job.input.grads]
    metas = store_metas(dirs)
    check_stores(s, metas)
    with job.timed("open_stores"):
        collector = FisherCollector.from_saved(dirs)
    check_disjoint_tasks(collector, metas, a, b if arm == "main" else a,
                         collector.sample_ids(b, "scored") if arm == "main"
                         else collector.sample_ids(a, "control"),
                         ref_task, collector.sample_ids(ref_task, "reference"))
    metric = QKOVInterferenceMetric(collector.config, collector, device=job.device(),
                                    device_memory_mb=job.exec.get("device_memory_mb"),
                                    **s["metric"])
    with job.timed("heatmap"):
        heat = metric.compute_heatmap(a, b) if arm == "main" else control_heatmap(metric, a, b)
    meta = heat["meta"]
    ids_r = collector.sample_ids(ref_task, "reference")
    if not ids_r:
        raise ValueError(f"no reference samples of task {ref_task!r} in the stores")
    with job.timed("reference"):
        ref = metric.pair_scores(a, meta["sample_ids_a"], ref_task, ids_r,
                                 meta["layers"], meta["heads"],
                                 fisher_tasks=tuple(meta["fisher_tasks"]))
    store = collector.gradient_manager
    disruptor_task = b if arm == "main" else a
    extra = {"arm": arm, "pair": job.wildcards["pair"], "split_seed": int(job.wildcards["seed"]),
             "disruptor_task": disruptor_task, "reference_task": ref_task,
             "reference": s["reference"], "sample_ids_r": ids_r,
             "norms_b": store.grad_norms(disruptor_task, meta["sample_ids_b"]).tolist(),
             "norms_r": store.grad_norms(ref_task, ids_r).tolist(),
             "config_hash": job.config_hash}
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
