"""stats: which cells of one analysis (and split seed) are real, task-specific conflicts.

QKOVStatistics.test_scores on the saved heatmap: disruptors B (task B's scored samples; for
the control arm, A') against the reference disruptors R, one row per DISTINCT cell (K/V per
kv head under GQA). Output: ``split<seed>/cells.csv`` (the statistics' table plus
schema_version, config_hash and the analysis' coordinates; units and meanings of its
columns in ``cells.schema.json`` beside it) and ``stats.json`` (summary, settings,
layer_head_avg with bootstrap intervals, fdr_corrected, units). The cells tables' data
dictionary (column -> unit, meaning) is interference.results.COLUMNS.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from interference._tables import BLOCKS

logger = logging.getLogger("qkov.stats")


def run(job) -> None:
    from interference.results import (LEAD, SCHEMA_VERSION, atomic_path, load_heatmap,
                                      write_json, write_table_schema)
    from interference.stats import QKOVStatistics

    s = job.slice
    st_cfg = dict(s["stats"])
    reference = st_cfg.pop("reference")
    heat, ref = load_heatmap(Path(job.input.heatmap).parent)
    if ref is None:
        raise ValueError(f"{job.input.heatmap}: no reference scores saved; rerun the scores rule")
    meta, extra = heat["meta"], heat["extra"]
    a, b = meta["task_a"], meta["task_b"]
    stats = QKOVStatistics(progress=True, **st_cfg)
    norms_b = norms_r = None
    if stats.disruption_norm == "l2":
        if meta["settings"].get("gj_norm") == "l2":
            norms_b, norms_r = np.ones(len(meta["sample_ids_b"])), np.ones(len(extra["sample_ids_r"]))
        else:
            norms_b, norms_r = np.asarray(extra["norms_b"]), np.asarray(extra["norms_r"])
    rt = extra["reference_task"]
    with job.timed("test"):
        res = stats.test_scores({blk: heat[blk]["scores"] for blk in BLOCKS}, ref,
                                meta["layers"], meta["heads"], meta["kv_head_of"],
                                variant=meta["variant"], norms_b=norms_b, norms_r=norms_r,
                                ids_b=[(b, i) for i in meta["sample_ids_b"]],
                                ids_r=[(rt, i) for i in extra["sample_ids_r"]],
                                ids_a=[(a, i) for i in meta["sample_ids_a"]])
    cells = res["cells"].copy()
    coords = {"schema_version": SCHEMA_VERSION, "config_hash": job.config_hash,
              "experiment": job.experiment, "model": job.wildcards["model"],
              "pair": job.wildcards["pair"], "arm": extra["arm"],
              "split_seed": int(job.wildcards["seed"]), "task_a": a, "task_b": b}
    for k, v in coords.items():
        cells[k] = v
    cells = cells[[c for c in LEAD if c in cells] + [c for c in cells if c not in LEAD]]
    with atomic_path(job.output.cells) as tmp:
        cells.to_csv(tmp, index=False)
    write_table_schema(job.output.cells, list(cells.columns), job.config_hash)
    summary = res["summary"]
    summary.update(coords, reference=reference, reference_task=rt,
                   n_reference=len(extra["sample_ids_r"]),
                   block_means={blk: float(np.mean(heat[blk]["layer_head_avg"])) for blk in BLOCKS})
    doc = {"schema_version": SCHEMA_VERSION, "config_hash": job.config_hash,
           "summary": summary, "settings": res["settings"],
           "fdr_corrected": res["fdr_corrected"],
           "layer_head_avg": {blk: {k: np.asarray(v).tolist() for k, v in d.items()}
                              for blk, d in res["layer_head_avg"].items()},
           "layers": meta["layers"], "heads": meta["heads"], "kv_head_of": meta["kv_head_of"],
           "units": {"statistic": summary["test"],
                     "effect_size": "Cohen's d (pooled sd)", "ci": f"bootstrap "
                     f"{summary.get('ci_method', 'basic')} interval of the B - R mean "
                     "difference of disruption shares",
                     "layer_head_avg": "mean QK-OV score M (unitless)"}}
    write_json(job.output.stats, doc)
    nt = res["null_top"]
    with atomic_path(job.output.null_top) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, null=nt["null"], statistic=nt["statistic"], cells=nt["cells"])
    job.metric("stats.n_cells", summary["n_cells"])
    job.metric("stats.n_q_significant", summary["n_q_significant"])
    job.metric("stats.n_significant", summary["n_significant"])
    job.metric("stats.n_q_opposite", summary["n_q_opposite"])
    job.metric("stats.min_pvalue", summary["min_pvalue"])
    job.metric("stats.n_permutations", summary["n_permutations"])
    job.metric("stats.global_ratio", summary["global"]["ratio"])
    job.metric("stats.global_p_value", summary["global"]["p_value"])
    job.metric("stats.mde_d", summary["power"]["mde_d"])
    for blk in BLOCKS:
        job.metric(f"stats.{blk}.n_significant", summary["n_significant_by_block"].get(blk, 0))
        job.metric(f"score.{blk}.mean", summary["block_means"][blk])
    for w in summary.get("warnings", []):
        logger.warning("%s", w)
    logger.info("%s split %s: %d distinct cells, %d with q <= %g, %d significant (q and d >= %g)"
                "; %d with q <= %g the other way (B lower: not conflicts)",
                job.wildcards["pair"], job.wildcards["seed"], summary["n_cells"],
                summary["n_q_significant"], stats.fdr_alpha, summary["n_significant"],
                stats.min_effect_size, summary["n_q_opposite"], stats.fdr_alpha)
    job.artifact(job.output.cells, "tables")
    job.artifact(job.output.stats, "tables")
