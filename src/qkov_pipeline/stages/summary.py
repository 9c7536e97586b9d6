"""summary: the run summary of one experiment (summary.json and summary.md).

Per analysis (pair and its control) and split seed: distinct cells, cells with q <= alpha,
significant cells (q and d), per block, the global B/R disruption ratio and its p-value,
block means; the control's count beside the pair's (it should be about 0); with several
split seeds, the stability across them (rank correlation, Jaccard, cells flagged by all
seeds). Per task and role: samples, mean tokens, mean loss and mean gradient norm (what
differs besides content). ``metrics``: the same numbers flat, logged on the MLflow parent
run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from interference.figures.summary import (UNITS, control_figure, control_vs_pair, markdown,
                                          summary_metrics)

from ..jobs import read_json

logger = logging.getLogger("qkov.summary")


def collect(job) -> dict:
    from interference.results import SCHEMA_VERSION

    s = job.slice
    doc = {"schema_version": SCHEMA_VERSION, "experiment": s["experiment"],
           "config_hash": job.config_hash, "analyses": {}, "tasks": {}, "metrics": {}}
    for path in job.input.stats:
        p = Path(path)
        pair, seed = p.parent.parent.name, int(p.parent.name.removeprefix("split"))
        sm = read_json(p)["summary"]
        a = doc["analyses"].setdefault(pair, {"arm": sm["arm"], "task_a": sm["task_a"],
                                              "task_b": sm["task_b"], "model": sm["model"],
                                              "seeds": {}})
        a["seeds"][seed] = {k: sm.get(k) for k in (
            "n_cells", "n_cells_by_block", "n_q_significant", "n_significant",
            "n_significant_by_block",
            "n_q_significant_by_block", "block_means", "global", "min_pvalue",
            "n_permutations", "exact", "fdr_alpha", "min_effect_size", "n_a", "n_b", "n_r",
            "warnings", "test", "two_sided", "n_q_opposite", "power")}
    for path in job.input.cells:
        p = Path(path)
        table = pd.read_csv(p, dtype={"kv_group": str})
        a = doc["analyses"][p.parent.name]
        a["cells_csv"] = str(p)
        a["n_significant_all_seeds"] = int((table["n_seeds_significant"]
                                            == table["n_split_seeds"]).sum())
        stab = p.parent / "stability.json"   # written by the same tables job as cells.csv
        if stab.is_file():
            a["stability"] = read_json(stab).get("summary")
    doc["control"] = control_vs_pair(doc["analyses"])
    for path in getattr(job.input, "validation", []) or []:
        p = Path(path)
        v = read_json(p)
        a = doc["analyses"][p.parent.parent.parent.name]
        a.setdefault("validation", {})[int(p.parent.parent.name.removeprefix("split"))] = {
            k: v[k] for k in ("n_cells", "n_cells_total", "n_eval_a", "n_eval_b", "task_a",
                              "task_b", "verdict")}
    for path in job.input.figures:
        p = Path(path)
        doc["analyses"][p.parent.parent.name]["figures"] = [
            str(p.parent / e["path"]) for e in read_json(p)]
    for path in job.input.stores:
        info = read_json(path)
        t = doc["tasks"].setdefault(info["task"], {})
        # no timings here (they live in MLflow): equal configs give an equal summary.json
        t[info["split_seed"]] = {role: {k: r.get(k) for k in (
            "n", "mean_tokens", "mean_loss", "mean_grad_norm")}
            for role, r in info["roles"].items()}
    doc["units"] = dict(UNITS)
    doc["metrics"] = summary_metrics(doc)
    return doc


def run(job) -> None:
    from interference.results import atomic_path, write_json

    doc = collect(job)
    doc["figures"] = [str(p) for p in control_figure(doc, Path(job.output.json).parent)]
    write_json(job.output.json, doc)
    with atomic_path(job.output.md) as tmp:
        tmp.write_text(markdown(doc))
    for k, v in doc["metrics"].items():
        job.metric(k, v)
    for pair, a in doc["analyses"].items():
        for seed, r in a["seeds"].items():
            logger.info("%-28s split %s: %4d significant of %d cells (q <= alpha: %d)", pair,
                        seed, r["n_significant"], r["n_cells"], r["n_q_significant"])
    job.artifact(job.output.md)
    job.artifact(job.output.json)
    for f in doc["figures"]:
        job.artifact(f, "figures")
