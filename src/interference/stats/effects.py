"""Two-sample statistics and effect sizes, column-wise over disruption matrices.

All functions take x_b [n_b, m] and x_r [n_r, m] (rows: disruptors, columns: cells) and
return [m] arrays, float64.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def two_groups(x_b, x_r) -> tuple[np.ndarray, np.ndarray]:
    """x_b [n_b, m] and x_r [n_r, m] as float64 matrices (a vector is one column)."""
    x_b = np.asarray(x_b, dtype=np.float64)
    x_r = np.asarray(x_r, dtype=np.float64)
    if x_b.ndim == 1:
        x_b = x_b[:, None]
    if x_r.ndim == 1:
        x_r = x_r[:, None]
    if x_b.ndim != 2 or x_r.ndim != 2 or x_b.shape[1] != x_r.shape[1]:
        raise ValueError(f"x_b and x_r must be [n, m] with equal m, got {x_b.shape} and "
                         f"{x_r.shape}")
    return x_b, x_r


def mean_difference(x_b, x_r) -> np.ndarray:
    """mean(x_b) - mean(x_r) per column."""
    x_b, x_r = two_groups(x_b, x_r)
    return x_b.mean(axis=0) - x_r.mean(axis=0)


def welch_t(x_b, x_r) -> np.ndarray:
    """Welch's t per column: (mean_b - mean_r) / sqrt(var_b/n_b + var_r/n_r), ddof=1.
    0/0 (both groups constant and equal) gives 0."""
    x_b, x_r = two_groups(x_b, x_r)
    nb, nr = x_b.shape[0], x_r.shape[0]
    diff = x_b.mean(axis=0) - x_r.mean(axis=0)
    se = np.sqrt(x_b.var(axis=0, ddof=1) / nb + x_r.var(axis=0, ddof=1) / nr)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = diff / se
    return np.where((se == 0) & (diff == 0), 0.0, t)


def cohens_d(x_b, x_r) -> np.ndarray:
    """Two-sample Cohen's d per column: (mean_b - mean_r) / s_pooled with
    s_pooled^2 = ((n_b-1) var_b + (n_r-1) var_r) / (n_b + n_r - 2)."""
    x_b, x_r = two_groups(x_b, x_r)
    nb, nr = x_b.shape[0], x_r.shape[0]
    if nb + nr < 3:
        raise ValueError("Cohen's d needs at least 3 observations in total")
    diff = x_b.mean(axis=0) - x_r.mean(axis=0)
    pooled = ((nb - 1) * x_b.var(axis=0, ddof=1) + (nr - 1) * x_r.var(axis=0, ddof=1)) \
        / (nb + nr - 2)
    sp = np.sqrt(pooled)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = diff / sp
    return np.where((sp == 0) & (diff == 0), 0.0, d)


def auc(x_b, x_r) -> np.ndarray:
    """AUC = P(x_b > x_r) + P(x_b = x_r)/2 per column (Mann-Whitney U / (n_b n_r))."""
    x_b, x_r = two_groups(x_b, x_r)
    nb, nr = x_b.shape[0], x_r.shape[0]
    ranks = rankdata(np.vstack([x_b, x_r]), axis=0)  # average ranks for ties
    u = ranks[:nb].sum(axis=0) - nb * (nb + 1) / 2.0
    return u / (nb * nr)
