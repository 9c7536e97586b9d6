"""Brunner-Munzel's W with Hall's (1992) skewness correction: a CANDIDATE cell test that the
calibration harness evaluated against the default (issue 17) and rejected; not selectable
in QKOVStatistics. Kept so that the numbers in docs/statistics.md can be reproduced
(``scripts/calibrate_stats.py grid --test bm_edgeworth``). Tie-free columns only.

Notation (B: n values X, R: m values Y; h(x, y) = 1(y < x)): p_hat = mean h over the n m
pairs, with Hoeffding parts g1(x) = G(x) - p, g2(y) = 1 - F(y) - p and the degenerate
rest psi (F, G: the cdfs of B and R). The placements A_i = G_hat(X_i) and c_j =
1 - F_hat(Y_j) estimate them; W = (p_hat - 1/2) / sqrt(V), V = var(A)/n + var(c)/m. To
order n^-1/2 (derivation in docs/statistics.md),

    kappa3(p_hat)  = mu1/n^2 + mu2/m^2 + 6 lam/(n m),
    Cov(p_hat, V)  = mu1/n^2 + mu2/m^2 + 4 lam/(n m),
    mu1 = E g1^3,  mu2 = E g2^3,  lam = E[g1(X) g2(Y) h(X, Y)],

so with K_D = kappa3 / V^1.5 and K_V = Cov / V^1.5, E W = -K_V / 2, kappa3(W) = K_D - 3 K_V
and P(W <= x) = Phi(x) + q(x) phi(x), q(x) = K_V/2 - (K_D - 3 K_V)(x^2 - 1)/6. Hall's
monotone inverse, with a = -(K_D - 3 K_V)/6 and b = K_V/2 + (K_D - 3 K_V)/6,

    W_H = W + a W^2 + a^2 W^3 / 3 + b,

is then put on the normal scale through Satterthwaite's t as the default statistic is
(rank.z_score), and permuted: every relabelling gets its own estimates of K_D and K_V.
"""
from __future__ import annotations

import numpy as np

from .rank import z_score


def skewness_terms(masks_sorted: np.ndarray, n_b: int) -> tuple[np.ndarray, ...]:
    """(W, df, K_D, K_V), each [b], of b labellings of tie-free pooled data.

    masks_sorted : [b, N] 0/1, 1 = "B", in the pooled column's increasing order.
    """
    masks = np.asarray(masks_sorted, dtype=np.float64)
    n, m = n_b, masks.shape[1] - n_b
    pos = np.arange(1.0, masks.shape[1] + 1.0)
    c_le = np.cumsum(masks, axis=1)                    # number of B at positions <= t
    is_r = 1.0 - masks
    a = (pos - c_le) / m                               # a B at t: R values below it / m
    c = 1.0 - c_le / n                                 # an R at t: B values above it / n
    a_bar = (masks * a).sum(1) / n
    c_bar = (is_r * c).sum(1) / m
    da = (a - a_bar[:, None]) * masks
    dc = (c - c_bar[:, None]) * is_r
    v_a, v_c = (da * da).sum(1) / (n - 1), (dc * dc).sum(1) / (m - 1)
    mu1, mu2 = (da ** 3).sum(1) / n, (dc ** 3).sum(1) / m
    lam = (da * np.cumsum(dc, axis=1)).sum(1) / (n * m)  # R below each B: h = 1
    var = np.maximum(v_a / n + v_c / m, 1e-24)
    w = (a_bar - 0.5) / np.sqrt(var)
    df = var * var / np.maximum((v_a / n) ** 2 / (n - 1) + (v_c / m) ** 2 / (m - 1), 1e-300)
    common = mu1 / n ** 2 + mu2 / m ** 2
    k_d = (common + 6.0 * lam / (n * m)) / var ** 1.5
    k_v = (common + 4.0 * lam / (n * m)) / var ** 1.5
    return w, np.maximum(df, 1.0), k_d, k_v


def hall_z(masks_sorted: np.ndarray, n_b: int) -> np.ndarray:
    """The candidate's permuted statistic [b]: Hall-corrected W on the normal scale."""
    w, df, k_d, k_v = skewness_terms(masks_sorted, n_b)
    a = -(k_d - 3.0 * k_v) / 6.0
    b = k_v / 2.0 - a
    return z_score(w + a * w * w + a * a * w ** 3 / 3.0 + b, df)


def sorted_labels(x_b, x_r) -> np.ndarray:
    """[m, N] 0/1 labellings (1 = B) of each column of the pooled data in increasing
    order; x_b [n_b, m], x_r [n_r, m], tie-free columns."""
    x = np.vstack([np.asarray(x_b, dtype=np.float64), np.asarray(x_r, dtype=np.float64)])
    if np.any(np.diff(np.sort(x, axis=0), axis=0) == 0):
        raise ValueError("the Edgeworth candidate handles tie-free columns only")
    return (np.argsort(x, axis=0, kind="stable") < np.shape(x_b)[0]).astype(np.float64).T


def edgeworth_z(x_b, x_r) -> np.ndarray:
    """The candidate statistic of the observed data, per column -> [m]."""
    return hall_z(sorted_labels(x_b, x_r), np.shape(x_b)[0])
