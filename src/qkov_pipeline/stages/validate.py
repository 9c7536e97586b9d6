"""validate: does a cell the map flags matter? (interference.validation.validate_map)

Reads the model, the pair's gradient stores (Fisher and scored gradients), the map's
cells.csv, task B's training samples (its fisher and scored roles: what fine-tuning on B
would use) and both tasks' held-out eval samples; runs the per-cell counterfactuals under
every step rule, scores the candidates' predictive validity, runs the fine-tuning arms, and
writes ``split<seed>/validation/`` (validation_cells.csv, validity.csv, precision.csv,
arms.csv, comparison.csv, validation.json with the verdict).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .scores import check_stores, store_metas

logger = logging.getLogger("qkov.validate")


def run(job) -> None:
    from interference.data import load_task_batches
    from interference.gradients import FisherCollector
    from interference.gradients.objectives import default_objective
    from interference.validation import ValidationSettings, validate_map
    from interference.validation.io import check_disjoint_eval, concat_batches, save_validation

    from interference.models import load_prepared

    from .tokenizer import check_same_tokenizer

    s = job.slice
    scores = s["stats"]["scores"]
    a, b = scores["task_a"], scores["task_b"]
    settings = ValidationSettings.from_dict(s["validation"])
    dirs = [Path(p) for p in job.input.grads]
    check_stores(scores, store_metas(dirs))
    mcfg = next(iter(scores["stores"].values()))["data"]["model"]
    device = job.device()
    with job.timed("load"):
        collector = FisherCollector.from_saved(dirs)
        model, _ = load_prepared(Path(job.input.model[0]).parent, mcfg)
        model.to(device).eval()
        evals = {}
        for path in job.input.eval:
            batches, _, meta = load_task_batches(Path(path).parent)
            check_same_tokenizer(job.input.model[0], meta, Path(path).parent)
            evals[meta["task_name"]] = batches["eval"]
        train, _, meta = load_task_batches(Path(job.input.train[0]).parent)
        check_same_tokenizer(job.input.model[0], meta, Path(job.input.train[0]).parent)
    for task in (a, b):
        check_disjoint_eval(collector, task, list(evals[task]["sample_ids"]))
    loss_reduction = next(iter(scores["stores"].values()))["fisher"]["loss_reduction"]
    objective = default_objective(model, loss_reduction=loss_reduction)
    train_b = concat_batches([train[r] for r in ("fisher", "scored") if r in train])
    with job.timed("validate"):
        result = validate_map(model, objective, collector, a, b,
                              pd.read_csv(job.input.cells[0], dtype={"kv_group": str}),
                              scores["metric"], evals[a], evals[b], train_b, settings,
                              device=device, progress=True)
    doc = save_validation(Path(job.output.json).parent, result,
                          extra={"pair": job.wildcards["pair"],
                                 "split_seed": int(job.wildcards["seed"]),
                                 "config_hash": job.config_hash})
    for rule, v in doc["verdict"].items():
        if rule == "intervention":
            for r in v:
                job.metric(f"intervention.top{r['fraction']:g}.diff", r["diff"])
                job.metric(f"intervention.top{r['fraction']:g}.p_value", r["p_value"])
            continue
        for cand, rho in v["rho"].items():
            job.metric(f"validity.{rule}.rho.{cand.replace('[', '.').rstrip(']')}", rho)
        logger.info("%s: best map score %s rho %.3f [%.3f, %.3f]; best baseline %s rho %.3f",
                    rule, v["best_map"], v["best_map_rho"], v["best_map_low"],
                    v["best_map_high"], v["best_baseline"], v["best_baseline_rho"])
    job.artifact(job.output.json)
