"""One call from a map and its gradient stores to the counterfactual validation of the map.

:func:`validate_map` measures, for task pair (A, B):

1. per-cell counterfactuals under every step rule (counterfactual.py): ΔL_A(c), ΔL_B(c),
   and the first-order prediction;
2. the predictive validity of every candidate score (candidates.py, validity.py);
3. the intervention arms (intervention.py) and top-k / bottom-k against random-k.

It returns a :class:`ValidationResult` of tidy tables; the caller saves them.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..architectures import QKOVIndexer
from ..stats.cells import conflict_order
from .candidates import baselines, gradient_moments, map_means, map_statistics
from .cells import Cell, CellParams, distinct_cells
from .counterfactual import STEP_RULES, StepRule, measure
from .intervention import FinetuneSettings, compare_arms, run_arms
from .validity import precision_curve, spearman, validity_table

RANK_BY = ("map", "effect_size", "mean_score")
logger = logging.getLogger("interference.validation")


@dataclass(frozen=True)
class ValidationSettings:
    """Settings of the validation (conf/validation/default.yaml documents each).

    Attributes:
        step_rules: step rules to run, side by side ('relative', 'adam').
        relative: 'relative' rule: ||Δθ_c|| / ||θ_c||.
        max_cells: None: every distinct cell; an int: a sample of that many, stratified by
            the map's mean score within each block (deciles), seeded.
        fractions: k as fractions of the cells, for precision@k and the arms.
        n_bootstrap / ci_level / seed: intervals and every random choice.
        rank_by: the map's ranking of cells for the arms: 'map' (the cells whose statistic
            T points the conflict's way by q, then T; then the others: :func:`_ranked`),
            'effect_size' or 'mean_score'.
        intervention: run the fine-tuning arms.
        finetune: the fine-tuning (AdamW) settings; lr and steps also set the 'adam' rule.
        n_random: random draws per k; seeds: fine-tuning seeds (data order).
        micro_batch: samples per forward pass.
        runs_per_pass: fine-tuning runs of the arms trained at once (``.ensemble``);
            None: 1 on a CPU, on a GPU one per 4 GB of free memory, at most 24.
    """

    step_rules: tuple = STEP_RULES
    relative: float = 0.05
    max_cells: int | None = None
    fractions: tuple = (0.05, 0.1, 0.2)
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    rank_by: str = "map"
    intervention: bool = True
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    n_random: int = 20
    seeds: tuple = (0, 1, 2)
    micro_batch: int = 16
    runs_per_pass: int | None = None

    def __post_init__(self):
        bad = [r for r in self.step_rules if r not in STEP_RULES]
        if bad or not self.step_rules:
            raise ValueError(f"step_rules {list(self.step_rules)}: each must be one of "
                             f"{STEP_RULES}")
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by={self.rank_by!r} is not one of {RANK_BY}")
        if any(not 0 < f < 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1), got {list(self.fractions)}")
        if self.max_cells is not None and self.max_cells < 3:
            raise ValueError(f"max_cells must be >= 3 or None, got {self.max_cells}")

    @classmethod
    def from_dict(cls, d: dict) -> "ValidationSettings":
        d = dict(d)
        ft = FinetuneSettings(**d.pop("finetune", {}))
        for key in ("step_rules", "fractions", "seeds"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(finetune=ft, **d)

    def rule(self, name: str) -> StepRule:
        return StepRule(name, relative=self.relative, lr=self.finetune.lr,
                        steps=self.finetune.steps)


def _runs_per_pass(settings: ValidationSettings, model) -> int:
    if settings.runs_per_pass is not None:
        return max(1, settings.runs_per_pass)
    device = next(model.parameters()).device
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(24, max(1, free // 2**32)))


@dataclass
class ValidationResult:
    """cells: one row per (step rule, cell); validity: one row per (step rule, candidate);
    precision: precision@k curves; arms: one row per (arm, seed); comparison: top and bottom
    vs random per k; meta: counts and settings."""

    cells: pd.DataFrame
    validity: pd.DataFrame
    precision: pd.DataFrame
    arms: pd.DataFrame
    comparison: pd.DataFrame
    meta: dict


def stratified_cells(cells: list[Cell], score: np.ndarray, n: int, seed: int) -> list[Cell]:
    """About ``n`` cells: within each block, an equal share from each decile of ``score``."""
    rng = np.random.default_rng(seed)
    blocks = sorted({c.block for c in cells})
    per_block = max(1, n // len(blocks))
    keep = []
    for block in blocks:
        idx = np.array([k for k, c in enumerate(cells) if c.block == block])
        order = idx[np.argsort(score[idx], kind="stable")]
        strata = np.array_split(order, min(10, len(order)))
        quota = np.diff(np.linspace(0, min(per_block, len(order)), len(strata) + 1).round()
                        ).astype(int)
        for stratum, m in zip(strata, quota):
            keep += rng.choice(stratum, size=min(m, len(stratum)), replace=False).tolist()
    return [cells[k] for k in sorted(keep)]


def _ranked(cells: list[Cell], table: pd.DataFrame, mean_score: np.ndarray, rank_by: str,
            signed: bool) -> list[Cell]:
    """Cells in the map's order, most conflicting first ('map': stats.cells.conflict_order,
    the order of the top-conflicts table; by q alone, the two-sided test's q put cells
    significant the other way among the conflicts: 11 of the default pair's 20% arm)."""
    t = table.set_index("name").loc[[c.name for c in cells]]
    sign = -1.0 if signed else 1.0
    if rank_by == "map":
        key = conflict_order(t["q_value"], t["statistic"], signed)
    elif rank_by == "effect_size":
        key = np.argsort(-sign * t["effect_size"].to_numpy(float), kind="stable")
    else:
        key = np.argsort(-mean_score, kind="stable")
    return [cells[k] for k in key]


def validate_map(model, objective, collector, task_a: str, task_b: str, cells_table: pd.DataFrame,
                 metric_settings: dict, eval_a: dict, eval_b: dict, train_b: dict,
                 settings: ValidationSettings, device: str | None = None,
                 progress: bool = True) -> ValidationResult:
    """The whole validation of one pair (module docstring).

    Args:
        model: the model the map was computed for (eval mode, on its device).
        objective: its per-sample Objective.
        collector: FisherCollector with both tasks' Fisher and scored gradients.
        cells_table: the map's cells.csv (one split seed).
        metric_settings: the run's metric settings (QKOVInterferenceMetric kwargs).
        eval_a / eval_b: held-out batches (input_ids, attention_mask, labels) of A and B.
        train_b: task B's training batch for the fine-tuning arms.
    """
    signed = metric_settings.get("variant") == "signed"
    t0 = time.time()
    indexer = QKOVIndexer(model, collector.config, layers=list(collector.layers))
    params = CellParams(model, indexer)
    all_cells = distinct_cells(indexer)
    store = collector.gradient_manager
    ids_a, ids_b = collector.sample_ids(task_a, "scored"), collector.sample_ids(task_b, "scored")
    means = map_means(collector, collector.config, task_a, task_b, metric_settings, all_cells,
                      device)
    own_mean = means[f"mean_M[{metric_settings.get('variant', 'qkov')}]"]
    cells = all_cells
    if settings.max_cells is not None and settings.max_cells < len(all_cells):
        cells = stratified_cells(all_cells, own_mean, settings.max_cells, settings.seed)
    pick = [all_cells.index(c) for c in cells]
    mom_a = gradient_moments(store, task_a, ids_a, cells)
    mom_b = gradient_moments(store, task_b, ids_b, cells)
    stats = map_statistics(cells_table, cells, signed)
    logger.info("candidates and gradient moments of %d cells: %.1f s", len(cells),
                time.time() - t0)
    cell_rows, validity, curves = [], [], []
    for rule_name in settings.step_rules:
        rule = settings.rule(rule_name)
        t0 = time.time()
        cf = measure(model, objective, params, cells, rule, mom_b.mean, mom_b.sq, eval_a,
                     eval_b, settings.micro_batch, progress)
        cand = {**{k: v[pick] for k, v in means.items()}, **stats,
                **baselines(cells, mom_a, mom_b, cf.steps, settings.seed)}
        truth = cf.delta_a.mean(1)
        logger.info("counterfactuals (%s) of %d cells: %.1f s", rule_name, len(cells),
                    time.time() - t0)
        table = validity_table(cand, cf.delta_a, settings.fractions, settings.n_bootstrap,
                               settings.seed, settings.ci_level)
        validity.append(table.assign(step_rule=rule_name,
                                     first_order_rho=spearman(cf.predicted_a, truth)))
        curves.append(precision_curve(cand, truth).assign(step_rule=rule_name))
        frame = cells_table.set_index("name").loc[[c.name for c in cells]]
        cell_rows.append(pd.DataFrame({
            "step_rule": rule_name, "name": [c.name for c in cells],
            "block": [c.block for c in cells], "layer": [c.layer for c in cells],
            "head": [c.head for c in cells], "n_params": [params.size(c) for c in cells],
            "q_value": frame["q_value"].to_numpy(), "significant": frame["significant"].to_numpy(),
            **{k: v for k, v in cand.items()},
            "delta_loss_a": truth, "delta_loss_b": cf.delta_b.mean(1),
            "delta_loss_a_se": cf.delta_a.std(1, ddof=1) / math.sqrt(cf.delta_a.shape[1]),
            "predicted_delta_a": cf.predicted_a, "predicted_delta_b": cf.predicted_b,
            "step_norm": cf.step_norm, "theta_norm": cf.theta_norm}))
    arms = comparison = pd.DataFrame()
    if settings.intervention:
        arms, comparison = intervention_arms(model, objective, params, all_cells, cells_table,
                                             own_mean, train_b, eval_a, eval_b, settings,
                                             signed, progress)
    meta = {"task_a": task_a, "task_b": task_b, "n_cells": len(cells),
            "n_cells_total": len(all_cells), "n_eval_a": objective.batch_size(eval_a),
            "n_eval_b": objective.batch_size(eval_b), "n_train_b": objective.batch_size(train_b),
            "variant": metric_settings.get("variant", "qkov"), "device": str(device)}
    return ValidationResult(pd.concat(cell_rows, ignore_index=True),
                            pd.concat(validity, ignore_index=True),
                            pd.concat(curves, ignore_index=True), arms, comparison, meta)


def intervention_arms(model, objective, params: CellParams, all_cells: list[Cell],
                      cells_table: pd.DataFrame, mean_score: np.ndarray, train_b: dict,
                      eval_a: dict, eval_b: dict, settings: ValidationSettings,
                      signed: bool = False, progress: bool = True
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(arms, comparison): the fine-tuning arms over the map's ranking of ``all_cells``
    (``settings.rank_by``; ``mean_score`` [n_cells] for 'mean_score'), and top / bottom
    against random per k."""
    ranked = _ranked(all_cells, cells_table, mean_score, settings.rank_by, signed)
    t0 = time.time()
    arms = run_arms(model, objective, train_b, eval_a, eval_b, params, ranked,
                    settings.finetune, settings.fractions, settings.n_random, settings.seeds,
                    settings.micro_batch, progress, _runs_per_pass(settings, model))
    comparison = pd.concat([compare_arms(arms, v, seed=settings.seed, ci_level=settings.ci_level)
                            for v in ("top", "bottom")], ignore_index=True)
    logger.info("intervention: %d fine-tuning runs: %.1f s", len(arms), time.time() - t0)
    return arms, comparison


def verdict(result: ValidationResult,
            map_candidates=("mean_M", "effect_size", "statistic", "neg_log10_q")) -> dict:
    """Per step rule: the best map candidate (the map's scores and statistics, candidates.py)
    and the best baseline by rho, whether the map's
    best interval lies above the best baseline's point estimate, and the intervention's
    top-vs-random difference at each k. Plain numbers for summary.md and the README."""
    out = {}
    for rule, t in result.validity.groupby("step_rule"):
        t = t.set_index("candidate")
        is_map = [any(c.startswith(m) for m in map_candidates) for c in t.index]
        mp, base = t[is_map], t[[not m for m in is_map]]
        best_map, best_base = mp["rho"].idxmax(), base["rho"].idxmax()
        out[rule] = {
            "best_map": best_map, "best_map_rho": float(mp.loc[best_map, "rho"]),
            "best_map_low": float(mp.loc[best_map, "rho_cells_low"]),
            "best_map_high": float(mp.loc[best_map, "rho_cells_high"]),
            "best_baseline": best_base, "best_baseline_rho": float(base.loc[best_base, "rho"]),
            "map_beats_baselines": bool(mp.loc[best_map, "rho_cells_low"]
                                        > base.loc[best_base, "rho"]),
            "first_order_rho": float(t["first_order_rho"].iloc[0]),
            "rho": {c: float(v) for c, v in t["rho"].items()},
        }
    if not result.comparison.empty:
        top = result.comparison[result.comparison["arm"] == "top"]
        out["intervention"] = [
            {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()}
            for r in top.to_dict("records")]
    return out


