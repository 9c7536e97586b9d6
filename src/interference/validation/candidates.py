"""Candidate per-cell scores whose power to predict real interference is measured.

Every candidate is oriented so that LARGER means "predicted to hurt task A more":

- ``mean_M[<variant>]``: the map's mean score over all (i, j) pairs for each metric variant
  (SPEC 5), from the mean operands (``QKOVInterferenceMetric.layer_head_average``);
  ``signed`` is negated (its conflicts are negative).
- ``effect_size``, ``statistic``, ``neg_log10_q``: the statistics of the run's own map
  (cells.csv: Cohen's d, the test's statistic T, -log10 q), the numbers that decide
  significance; -log10 q takes the sign of T's direction (a two-sided q says how
  significant a cell is, T which way: a cell significant the other way scores low).
- Baselines a sceptical reviewer would propose:
  ``grad_share`` — B's raw gradient share on the cell, mean_j Σ_{k∈c}|g_jk| / Σ_k |g_jk|
  (no Fisher, no task A); ``overlap`` — Σ_{k∈c} |ḡ_A,k| |ḡ_B,k| (Fisher-free overlap of the
  mean gradients); ``first_order`` — <ḡ_A, Δθ_c>, the first-order change of A's loss under
  the step rule's own step, from task A's scored (training-side) samples; ``random``.

All gradient means come from the scored samples in the gradient stores (never the
held-out ``eval`` samples, which only measure the truth).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .._tables import VARIANTS
from ..scores.metric import QKOVInterferenceMetric
from .cells import KV_BLOCKS, Cell


@dataclass
class GradientMoments:
    """Per cell, over one task's scored samples: mean gradient ḡ [size], mean squared
    gradient [size], and the mean over samples of the cell's share of |g|_1."""

    mean: dict[Cell, torch.Tensor]
    sq: dict[Cell, torch.Tensor]
    l1_share: dict[Cell, float]


def gradient_moments(store, task: str, ids: list[str], cells: list[Cell]) -> GradientMoments:
    """Moments of task ``task``'s gradients (samples ``ids``) on every cell, read from a
    GradientStore one (layer, block) at a time."""
    by_lb: dict[tuple[int, str], list[Cell]] = {}
    for c in cells:
        by_lb.setdefault((c.layer, c.block), []).append(c)
    total = torch.zeros(len(ids), dtype=torch.float64)
    per_head_l1: dict[Cell, torch.Tensor] = {}
    mean, sq = {}, {}
    for (layer, block) in store.entries:
        rows = store.block(task, ids, layer, block).double()      # [n, n_heads, size]
        total += rows.abs().sum(dim=(1, 2)).cpu()
        for c in by_lb.get((layer, block), []):
            g = rows[:, c.head]
            mean[c] = g.mean(0).float().cpu()
            sq[c] = (g * g).mean(0).float().cpu()
            per_head_l1[c] = g.abs().sum(1).cpu()
    safe = torch.where(total > 0, total, torch.ones_like(total))
    share = {c: float((v / safe).mean()) for c, v in per_head_l1.items()}
    return GradientMoments(mean, sq, share)


def map_means(collector, config, task_a: str, task_b: str, metric_settings: dict,
              cells: list[Cell], device: str | None = None) -> dict[str, np.ndarray]:
    """'mean_M[<variant>]' -> [n_cells] mean score of every metric variant (signed negated),
    with the run's other metric settings."""
    out = {}
    settings = {k: v for k, v in metric_settings.items() if k != "variant"}
    for variant in VARIANTS:
        metric = QKOVInterferenceMetric(config, collector, device=device, variant=variant,
                                        **settings)
        lha = metric.layer_head_average(task_a, task_b)
        layers = list(collector.layers)
        vals = []
        for c in cells:
            col = c.head * config.group_size if c.block in KV_BLOCKS else c.head
            vals.append(float(lha[c.block][layers.index(c.layer), col]))
        sign = -1.0 if variant == "signed" else 1.0
        out[f"mean_M[{variant}]"] = sign * np.asarray(vals)
    return out


def map_statistics(cells_table: pd.DataFrame, cells: list[Cell], signed: bool
                   ) -> dict[str, np.ndarray]:
    """'effect_size', 'statistic', 'neg_log10_q' -> [n_cells] from the run's cells.csv,
    oriented so that larger means more conflict (-log10 q times the sign of T in the
    conflict's direction: 0 where T is)."""
    table = cells_table.set_index("name")
    missing = [c.name for c in cells if c.name not in table.index]
    if missing:
        raise ValueError(f"cells.csv lacks {len(missing)} cells of the model, e.g. "
                         f"{missing[:3]}: it belongs to another model or layer selection")
    rows = table.loc[[c.name for c in cells]]
    sign = -1.0 if signed else 1.0
    q = rows["q_value"].to_numpy(float)
    toward = sign * rows["statistic"].to_numpy(float)
    return {"effect_size": sign * rows["effect_size"].to_numpy(float),
            "statistic": toward,
            "neg_log10_q": np.sign(toward) * -np.log10(np.clip(q, 1e-300, 1.0))}


def baselines(cells: list[Cell], a: GradientMoments, b: GradientMoments,
              steps: dict[Cell, torch.Tensor], seed: int) -> dict[str, np.ndarray]:
    """The sceptical reviewer's baselines (module docstring), [n_cells] each."""
    rng = np.random.default_rng(seed)
    return {
        "grad_share": np.array([b.l1_share[c] for c in cells]),
        "overlap": np.array([float((a.mean[c].abs() * b.mean[c].abs()).double().sum())
                             for c in cells]),
        "first_order": np.array([float(torch.dot(a.mean[c].double(),
                                                 steps[c].double().cpu())) for c in cells]),
        "random": rng.random(len(cells)),
    }
