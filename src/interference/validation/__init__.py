"""Counterfactual validation: does a cell the map flags matter for real interference?

cells.py           the distinct cells as parameters: read, step, freeze (bitwise)
losses.py          per-sample held-out losses, batched, and their gradient
counterfactual.py  one cell moved along B's training signal; ΔL_A(c), ΔL_B(c)
candidates.py      the map's scores and the baselines, oriented larger = more harm
validity.py        Spearman rho with bootstrap intervals, precision@k
intervention.py    fine-tuning on B with the top-k / bottom-k / random-k cells frozen
run.py             validate_map: all of the above for one pair; verdict
"""
from .cells import Cell, CellParams, distinct_cells
from .counterfactual import STEP_RULES, Counterfactuals, StepRule, measure
from .intervention import FinetuneSettings, compare_arms, finetune, matched_random, run_arms
from .run import ValidationResult, ValidationSettings, stratified_cells, validate_map, verdict
from .validity import precision_at_k, precision_curve, spearman, validity_table

__all__ = ["Cell", "CellParams", "distinct_cells", "STEP_RULES", "Counterfactuals", "StepRule",
           "measure", "FinetuneSettings", "compare_arms", "finetune", "matched_random",
           "run_arms", "ValidationResult", "ValidationSettings", "stratified_cells",
           "validate_map", "verdict", "precision_at_k", "precision_curve", "spearman",
           "validity_table"]
