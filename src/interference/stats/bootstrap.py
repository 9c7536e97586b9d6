"""Stratified two-way bootstrap (SPEC section 6).

One draw resamples task A's scored samples i (shared by both groups), task B's disruptors
within B and the reference disruptors within R, all with replacement:

    s*_jc   = mean over resampled i of M_{ij,c}
    s~*_jc  = the normalisation of s*_jc (shares are recomputed per draw)
    diff*_c = mean over resampled B of s~*_jc - mean over resampled R of s~*_jc
    avg*_c  = mean over resampled B of s*_jc  (the bootstrap of layer_head_avg)

Resampling is done with multinomial count weights, so each batch of draws is two GEMMs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from .._tables import CI_METHODS
from .disruption import disruptor_scale


@dataclass(frozen=True)
class BootstrapDraws:
    """mean_diff: [n_bootstrap, m] draws of the mean difference of normalised disruption;
    avg_b: [n_bootstrap, m] draws of the mean raw score of task B (layer_head_avg)."""

    mean_diff: np.ndarray
    avg_b: np.ndarray


def bootstrap_weights(rng: np.random.Generator, n: int, n_bootstrap: int) -> np.ndarray:
    """[n_bootstrap, n] count weights of n items resampled with replacement, divided by n
    (each row sums to 1): the weighted mean of a row is the mean of a resample."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(np.float64) / n


# elements of one [draws, n_b + n_r, m] float64 batch (128 MB): about a quarter GB of
# intermediates per batch; a large batch reads the cubes fewer times (memory-bound GEMMs)
BATCH_ELEMENTS = 2 ** 24


def stratified_bootstrap(cube_b: np.ndarray, cube_r: np.ndarray, *, n_bootstrap: int,
                         disruption_norm: str = "share", norms_b=None, norms_r=None,
                         seed=0, batch_size: int | None = None) -> BootstrapDraws:
    """Draws of the per-cell mean difference and of task B's mean score.

    cube_b: [n_a, n_b, m] scores M of task A samples i x task B disruptors j per cell.
    cube_r: [n_a, n_r, m] the same for the reference disruptors.
    The resamples are drawn first, all of i, then all of B, then all of R, so the draws
    do not depend on ``batch_size`` (draws per GEMM batch; None: about
    ``BATCH_ELEMENTS / ((n_b + n_r) m)``).
    """
    cube_b = np.asarray(cube_b, dtype=np.float64)
    cube_r = np.asarray(cube_r, dtype=np.float64)
    n_a, n_b, m = cube_b.shape
    n_r = cube_r.shape[1]
    if cube_r.shape[0] != n_a or cube_r.shape[2] != m:
        raise ValueError(f"cube shapes differ: {cube_b.shape} vs {cube_r.shape}")
    rng = np.random.default_rng(seed)
    w_i = bootstrap_weights(rng, n_a, n_bootstrap)           # [n_bootstrap, n_a]
    w_b = bootstrap_weights(rng, n_b, n_bootstrap)           # [n_bootstrap, n_b]
    w_r = bootstrap_weights(rng, n_r, n_bootstrap)           # [n_bootstrap, n_r]
    flat_b = cube_b.reshape(n_a, n_b * m)
    flat_r = cube_r.reshape(n_a, n_r * m)
    if batch_size is None:
        batch_size = int(np.clip(BATCH_ELEMENTS // max((n_b + n_r) * m, 1), 1, 1024))
    diff = np.empty((n_bootstrap, m))
    avg = np.empty((n_bootstrap, m))
    for lo in range(0, n_bootstrap, batch_size):
        d = slice(lo, min(lo + batch_size, n_bootstrap))
        b = d.stop - d.start
        s_b = (w_i[d] @ flat_b).reshape(b, n_b, m)           # [b, n_b, m]
        s_r = (w_i[d] @ flat_r).reshape(b, n_r, m)
        # the normalisation scales each disruptor's row: B's weighted means of the
        # normalised and of the raw rows come from one pass over its rows
        scale_b = disruptor_scale(s_b, disruption_norm, norms_b)          # [b, n_b]
        scale_r = disruptor_scale(s_r, disruption_norm, norms_r)
        means_b = np.matmul(np.stack([w_b[d] * scale_b, w_b[d]], axis=1), s_b)   # [b, 2, m]
        mean_r = np.matmul((w_r[d] * scale_r)[:, None, :], s_r)[:, 0]
        diff[d] = means_b[:, 0] - mean_r
        avg[d] = means_b[:, 1]
    return BootstrapDraws(mean_diff=diff, avg_b=avg)


def percentile_interval(draws: np.ndarray, level) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column at `level` (scalar or [m] array of levels)."""
    draws = np.asarray(draws, dtype=np.float64)
    level = np.broadcast_to(np.asarray(level, dtype=np.float64), draws.shape[1:])
    lo = np.empty(draws.shape[1:])
    hi = np.empty(draws.shape[1:])
    for lev in np.unique(level):
        idx = level == lev
        a = (1.0 - lev) / 2.0
        q = np.quantile(draws[:, idx], [a, 1.0 - a], axis=0)
        lo[idx], hi[idx] = q[0], q[1]
    return lo, hi


def bootstrap_interval(draws: np.ndarray, estimate: np.ndarray, level,
                       method: str = "basic") -> tuple[np.ndarray, np.ndarray]:
    """Interval per column from bootstrap draws [n_draws, m] of an estimate [m].

    - ``percentile``: the (1-level)/2 and (1+level)/2 quantiles of the draws;
    - ``basic``: 2 estimate - those quantiles, swapped (reverses the bootstrap's bias);
    - ``bc``: bias-corrected percentile (Efron 1981): with z0 = Phi^-1(share of draws below
      the estimate, ties half), the quantiles at Phi(2 z0 +- z_{(1+level)/2}). The share
      is clipped to [1/(2n), 1 - 1/(2n)] so z0 stays finite.
    ``level``: scalar or [m].
    """
    draws = np.asarray(draws, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    if method == "percentile":
        return percentile_interval(draws, level)
    if method == "basic":
        lo, hi = percentile_interval(draws, level)
        return 2.0 * estimate - hi, 2.0 * estimate - lo
    if method != "bc":
        raise ValueError(f"unknown interval method {method!r}; expected one of {CI_METHODS}")
    n = draws.shape[0]
    below = ((draws < estimate).sum(axis=0) + 0.5 * (draws == estimate).sum(axis=0)) / n
    z0 = norm.ppf(np.clip(below, 0.5 / n, 1.0 - 0.5 / n))
    z = norm.ppf((1.0 + np.broadcast_to(np.asarray(level, dtype=np.float64), z0.shape)) / 2)
    lo_q, hi_q = norm.cdf(2.0 * z0 - z), norm.cdf(2.0 * z0 + z)
    lo, hi = np.empty(z0.shape), np.empty(z0.shape)
    for c in range(z0.shape[0]):
        lo[c], hi[c] = np.quantile(draws[:, c], [lo_q[c], hi_q[c]])
    return lo, hi
