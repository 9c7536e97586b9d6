"""V1: the counterfactual validation of the default pair, end to end, without the workflow.

Runs what the workflow runs for experiment `validate` (SmolLM2-135M, math vs code, split
seed 0) through the same library calls and stage helpers, on one device, and times each
step: model, data (+ eval samples), gradients and Fisher (collect), map (scores + stats),
validation (counterfactuals, validity, arms). Also times the floor of the validation: the
forward passes it cannot avoid (one forward of both eval sets per cell and step rule) and
the fine-tuning steps (one forward+backward per step and arm), measured in the same run.

    python benchmarks/bench_validation.py --out /tmp/v1                # the default config
    python benchmarks/bench_validation.py --out /tmp/v1 --max-cells 48 # a stratified sample
    python benchmarks/bench_validation.py --out /tmp/v1 --experiment tiny_validate

For machines without Hydra (a GPU box with torch only) the config is composed from conf/
by a small YAML merge; where Hydra is installed the two are checked to be equal.
Writes <out>/bench_validation.json and the validation tables (as the validate rule does).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def compose_yaml(conf: Path, experiment: str | None) -> dict:
    """conf/config.yaml + its group defaults + conf/experiment/<experiment>.yaml (whose own
    defaults may name other experiments or `override /model: X`)."""
    import yaml

    def load(p):
        return yaml.safe_load(Path(p).read_text()) or {}

    top = load(conf / "config.yaml")
    cfg: dict = {}
    for entry in top.pop("defaults"):
        if entry == "_self_" or not isinstance(entry, dict):
            continue
        (key, option), = entry.items()
        if option is None:
            continue
        group, _, target = key.partition("@")
        node = load(conf / group / f"{option}.yaml")
        path = (target or group).split(".")
        cur = cfg
        for p in path[:-1]:
            cur = cur.setdefault(p, {})
        cur[path[-1]] = node
    cfg = _merge(top, cfg)   # `_self_` first: the groups' values win

    def apply(name: str, cfg: dict) -> dict:
        exp = load(conf / "experiment" / f"{name}.yaml")
        for entry in exp.pop("defaults", []) or []:
            if isinstance(entry, str):
                cfg = apply(entry, cfg)
            else:
                (key, option), = entry.items()
                group = key.split()[-1].lstrip("/")
                cfg[group] = load(conf / group / f"{option}.yaml")
        return _merge(cfg, exp)

    if experiment and experiment != "default":
        cfg = apply(experiment, cfg)
    cfg["experiment"] = experiment or "default"
    cfg["overrides"] = []
    return cfg


def compose(experiment: str | None) -> dict:
    cfg = compose_yaml(ROOT / "conf", experiment)
    try:
        from qkov_pipeline.config import compose as hydra_compose
        ref = hydra_compose(ROOT / "conf", experiment)
    except ImportError:
        return cfg
    if ref != cfg:
        raise SystemExit("the YAML composition differs from Hydra's; fix compose_yaml")
    return cfg


def _assign(tree: dict, item: str) -> None:
    """Set ``tree``'s entry at dotted KEY of ``item`` ('KEY=VALUE', VALUE read as YAML); a
    KEY that names no existing entry is an error (a typo would otherwise change nothing)."""
    import yaml

    key, _, value = item.partition("=")
    *path, last = key.split(".")
    for p in path:
        tree = tree[p]
    if last not in tree:
        raise KeyError(f"{key!r} is not a setting of the composed config")
    tree[last] = yaml.safe_load(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default="validate")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-cells", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="validation.micro_batch (samples per forward; larger on a GPU)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a validation setting, e.g. --set n_eval=24 --set intervention=false")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="any other setting of the composed config, e.g. --config "
                         "fisher.store_dtype=float32")
    args = ap.parse_args()

    import logging

    import numpy as np
    import pandas as pd
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from interference.gradients import FisherCollector
    from interference.gradients.objectives import default_objective
    from interference.models import build_from_config, load_prepared, load_tokenizer, save_prepared
    from interference.scores import QKOVInterferenceMetric
    from interference.stats import QKOVStatistics
    from interference.architectures import QKOVIndexer
    from interference.validation import CellParams, ValidationSettings, distinct_cells, validate_map
    from interference.validation.candidates import map_means
    from interference.validation.run import intervention_arms
    from interference.validation.io import concat_batches, save_validation
    from interference.validation.losses import sample_losses
    from qkov_pipeline import plan as qc
    from qkov_pipeline.stages.data import prepare_group
    from qkov_pipeline.stages.prepare_eval import eval_split

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose(args.experiment)
    for item in args.config:
        _assign(cfg, item)
    vcfg = dict(cfg["validation"], enabled=True)
    if args.max_cells:
        vcfg["max_cells"] = args.max_cells
    if args.micro_batch:
        vcfg["micro_batch"] = args.micro_batch
    for item in args.set:
        _assign(vcfg, item)
    a, b = cfg["pairs"][0]
    seed = cfg["data"]["split_seeds"][0]
    times: dict[str, float] = {}

    def tick(name, t0):
        if device == "cuda":
            torch.cuda.synchronize()
        times[name] = time.time() - t0
        print(f"{name}: {times[name]:.1f} s", flush=True)

    t = time.time()   # as rule prepare_model, then as every job loads it
    model, tokenizer = build_from_config(cfg["model"])
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    save_prepared(model, tokenizer, out / "_model" / "hf")
    model, _ = load_prepared(out / "_model", cfg["model"])
    tokenizer = load_tokenizer(out / "_model" / "hf")
    model.to(device).eval()
    tick("model", t)

    t = time.time()
    prepared = prepare_group(qc.data_slice(cfg, a, seed), tokenizer)
    evals = {task: eval_split(qc.data_slice(cfg, task, seed), vcfg["n_eval"], tokenizer)[0]["eval"]
             for task in (a, b)}
    tick("data", t)

    t = time.time()
    f = cfg["fisher"]
    collector = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=1e9,
                                ema_decay=f["ema_decay"], store_dtype=f["store_dtype"],
                                loss_reduction=f["loss_reduction"], micro_batch=8)
    for task in (a, b):
        batches = prepared[task][0]
        for role in ("fisher", "scored", "reference"):
            if role in batches:
                if role == "fisher":
                    n = batches[role]["input_ids"].shape[0]
                    for s0 in range(0, n, 8):
                        part = {k: v[s0:s0 + 8] for k, v in batches[role].items()}
                        collector.collect_fisher(model, part, task=task, mode=f["mode"],
                                                 role=role)
                else:
                    collector.collect_fisher(model, batches[role], task=task, mode=f["mode"],
                                             role=role)
    tick("collect", t)

    t = time.time()
    metric = QKOVInterferenceMetric(collector.config, collector, device=device, **cfg["metric"])
    heat = metric.compute_heatmap(a, b)
    meta = heat["meta"]
    ids_r = collector.sample_ids(a, "reference")
    ref = metric.pair_scores(a, meta["sample_ids_a"], a, ids_r, meta["layers"], meta["heads"],
                             fisher_tasks=tuple(meta["fisher_tasks"]))
    tick("scores", t)
    t = time.time()
    st = {k: v for k, v in cfg["stats"].items() if k != "reference"}
    res = QKOVStatistics(**st).test_scores(
        {blk: heat[blk]["scores"] for blk in "QKVO"}, ref, meta["layers"], meta["heads"],
        meta["kv_head_of"], variant=meta["variant"])
    cells = res["cells"]
    tick("stats", t)

    settings = ValidationSettings.from_dict({k: v for k, v in vcfg.items()
                                             if k not in ("enabled", "n_eval")})
    objective = default_objective(model, loss_reduction=f["loss_reduction"])
    train_b = concat_batches([prepared[b][0][r] for r in ("fisher", "scored")])
    t = time.time()   # counterfactuals first (saved), then the arms
    part = validate_map(model, objective, collector, a, b, cells, cfg["metric"], evals[a],
                        evals[b], train_b, replace(settings, intervention=False),
                        device=device, progress=True)
    tick("validate_counterfactuals", t)
    save_validation(out, part, extra={"pair": f"{a}__{b}", "split_seed": seed})
    print(part.validity[["step_rule", "candidate", "rho", "rho_cells_low", "rho_cells_high",
                         "rho_abs", "precision@0.1"]].to_string(), flush=True)
    t = time.time()
    result = part
    if settings.intervention:
        params = CellParams(model, QKOVIndexer(model, collector.config))
        all_cells = distinct_cells(params.indexer)
        key = f"mean_M[{cfg['metric']['variant']}]"
        first = part.cells[part.cells["step_rule"] == settings.step_rules[0]]
        if list(first["name"]) == [c.name for c in all_cells]:   # every cell: reuse, as
            mean_score = first[key].to_numpy()                      # validate_map does
        else:
            mean_score = map_means(collector, collector.config, a, b, cfg["metric"],
                                   all_cells, device)[key]
        arms, comparison = intervention_arms(
            model, objective, params, all_cells, cells, mean_score, train_b,
            evals[a], evals[b], settings, cfg["metric"]["variant"] == "signed", progress=True)
        result = replace(part, arms=arms, comparison=comparison)
    tick("validate_arms", t)
    times["validate"] = times["validate_counterfactuals"] + times["validate_arms"]
    doc = save_validation(out, result, extra={"pair": f"{a}__{b}", "split_seed": seed})

    # floors, measured here: one forward over both eval sets, one fine-tuning step
    t = time.time()
    for _ in range(3):
        sample_losses(model, objective, evals[a], settings.micro_batch)
        sample_losses(model, objective, evals[b], settings.micro_batch)
    tick("forward_eval_x3", t)
    idx = list(range(settings.finetune.batch_size))
    sub = {k: v[idx] for k, v in train_b.items() if k != "sample_ids"}
    t = time.time()
    for _ in range(3):
        loss = sample_losses(model, objective, sub, settings.micro_batch, grad=True).mean()
        loss.backward()
    tick("train_step_x3", t)
    model.zero_grad(set_to_none=True)
    n_rules, n_cells = len(settings.step_rules), result.meta["n_cells"]
    n_arms = len(result.arms)
    floor = (times["forward_eval_x3"] / 3 * (n_rules * (n_cells + 3))
             + times["train_step_x3"] / 3 * settings.finetune.steps * n_arms
             + times["forward_eval_x3"] / 3 * (n_arms + 1))
    report = {"experiment": args.experiment, "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda"
              else platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "config_overrides": args.config, "validation_overrides": args.set,
              "store_dtype": cfg["fisher"]["store_dtype"],
              "times_s": times, "validate_floor_s": floor,
              "validate_over_floor": times["validate"] / floor,
              "n_cells": n_cells, "n_arms_x_seeds": n_arms,
              "n_significant": int(np.asarray(cells["significant"]).sum()),
              "verdict": doc["verdict"]}
    (out / "bench_validation.json").write_text(json.dumps(report, indent=1, default=float))
    pd.set_option("display.width", 200)
    print(result.validity[["step_rule", "candidate", "rho", "rho_cells_low", "rho_cells_high",
                           "rho_abs", "precision@0.1"]].to_string())
    print(result.comparison.to_string())
    print(json.dumps({k: v for k, v in report.items() if k != "verdict"}, indent=1, default=float))


if __name__ == "__main__":
    main()
