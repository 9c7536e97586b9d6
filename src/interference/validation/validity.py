"""Predictive validity of candidate scores against measured per-cell interference.

For each candidate score s (larger = predicted to hurt A more) and the measured ΔL_A(c):

- ``rho``: Spearman's rank correlation of s and ΔL_A across cells (does the score predict the
  direction and size of the harm?); ``rho_abs``: against |ΔL_A| (does it find where A is
  sensitive at all, whatever the sign?);
- ``rho_cells_low/high``: percentile bootstrap interval over cells (resampled with
  replacement); ``rho_eval_low/high``: over task A's eval samples (the truth ΔL_A(c) is a mean
  over them, so its own noise is carried into the interval);
- ``precision@<f>``: of the top k = ceil(f · n_cells) cells by s, the share that are among the
  k cells with the largest ΔL_A (the k most harmful); a random score expects k / n_cells.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import rankdata, spearmanr


def _rho_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of x[b] and y[b] for every row b ([n_boot, n]): the Pearson correlation
    of mid-ranks, as scipy.stats.spearmanr computes it."""
    rx = rankdata(x, axis=1)
    ry = rankdata(y, axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / den, np.nan)


def spearman(x, y) -> float:
    """Spearman's rho (scipy), nan when either side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def precision_at_k(score: np.ndarray, truth: np.ndarray, k: int) -> float:
    """|top-k by score ∩ top-k by truth| / k (ties broken by position, stably)."""
    top_s = set(np.argsort(-score, kind="stable")[:k].tolist())
    top_t = set(np.argsort(-truth, kind="stable")[:k].tolist())
    return len(top_s & top_t) / k


def validity_table(candidates: dict[str, np.ndarray], delta: np.ndarray,
                   fractions=(0.05, 0.1, 0.2), n_bootstrap: int = 1000, seed: int = 0,
                   ci_level: float = 0.95) -> pd.DataFrame:
    """One row per candidate (columns in the module docstring).

    Args:
        candidates: name -> [n_cells] scores.
        delta: [n_cells, n_eval] per-eval-sample change of A's loss; ΔL_A = delta.mean(1).
    """
    delta = np.asarray(delta, float)
    truth = delta.mean(1)
    n_cells, n_eval = delta.shape
    rng = np.random.default_rng(seed)
    cell_idx = rng.integers(0, n_cells, size=(n_bootstrap, n_cells))
    eval_idx = rng.integers(0, n_eval, size=(n_bootstrap, n_eval))
    truth_eval = np.stack([delta[:, e].mean(1) for e in eval_idx])      # [n_boot, n_cells]
    lo_q, hi_q = (1 - ci_level) / 2, 1 - (1 - ci_level) / 2
    rows = []
    for name, score in candidates.items():
        s = np.asarray(score, float)
        if s.shape != (n_cells,):
            raise ValueError(f"candidate {name!r} has shape {s.shape}, expected ({n_cells},)")
        by_cells = _rho_rows(s[cell_idx], truth[cell_idx])
        by_eval = _rho_rows(np.broadcast_to(s, truth_eval.shape), truth_eval)
        row = {"candidate": name, "rho": spearman(s, truth),
               "rho_cells_low": np.nanquantile(by_cells, lo_q),
               "rho_cells_high": np.nanquantile(by_cells, hi_q),
               "rho_eval_low": np.nanquantile(by_eval, lo_q),
               "rho_eval_high": np.nanquantile(by_eval, hi_q),
               "rho_abs": spearman(s, np.abs(truth))}
        for f in fractions:
            k = max(1, math.ceil(f * n_cells))
            row[f"precision@{f:g}"] = precision_at_k(s, truth, k)
        rows.append(row)
    out = pd.DataFrame(rows)
    for f in fractions:
        out[f"precision@{f:g}_random"] = max(1, math.ceil(f * n_cells)) / n_cells
    return out


def precision_curve(candidates: dict[str, np.ndarray], truth: np.ndarray) -> pd.DataFrame:
    """precision@k for every k = 1..n_cells and candidate (long table: candidate, k, precision)."""
    truth = np.asarray(truth, float)
    order_t = np.argsort(-truth, kind="stable")
    rank_t = np.empty(len(truth), int)
    rank_t[order_t] = np.arange(len(truth))
    rows = []
    for name, score in candidates.items():
        order_s = np.argsort(-np.asarray(score, float), kind="stable")
        # a cell at position p of the score's order is a hit for every k > max(p, rank_t)
        need = np.maximum(np.arange(len(truth)), rank_t[order_s]) + 1
        hits = np.cumsum(np.bincount(need, minlength=len(truth) + 1))[1:]
        k = np.arange(1, len(truth) + 1)
        rows.append(pd.DataFrame({"candidate": name, "k": k, "precision": hits / k}))
    return pd.concat(rows, ignore_index=True)
