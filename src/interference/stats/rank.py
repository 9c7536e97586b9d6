"""Brunner-Munzel's studentised rank statistic and its permutation test (the default cell
test, chosen with scripts/calibrate_stats.py; see docs/statistics.md).

For a cell, with B's values x_B [n_B] and R's x_R [n_R], the placement of a B value is the
number of R values below it (ties count one half), and the other way round for R:

    p_hat = mean placement of B / n_R            = P(x_B > x_R) + P(x_B = x_R) / 2  (the AUC)
    W     = n_B n_R (rbar_B - rbar_R) / (N sqrt(n_B var(P_B) + n_R var(P_R)))

(N = n_B + n_R, rbar the mean pooled mid-rank of a group, var with ddof 1) - the statistic
of scipy.stats.brunnermunzel with B as its second sample, so W > 0 when B tends higher.
Null in words: a randomly chosen B disruptor is as likely to put the larger share on the
cell as a randomly chosen R disruptor (AUC = 1/2). The permutation test of W (Neubert and
Brunner, 2007) is exact when B and R are exchangeable and asymptotically exact under that
null for any spreads and shapes. The statistic permuted here is W on the normal scale of
its Satterthwaite t distribution (:func:`z_score`): the permutation null of plain W is
nearly normal while W itself has t-like tails when the smaller group is the more variable,
which broke the tails BH uses (n_B = 48 vs n_R = 144, B twice as spread: 1.8 times the
nominal rate at p = 7e-5); the z of W's t p-value carries that correction into every
relabelling. A skew remains (1.2-1.3 times nominal at p = 7e-5 there with right-skewed
shares, one-sided); the two-sided p-values that QKOVStatistics uses by default cancel it
to first order, while the Hall correction of :mod:`.edgeworth` removes it but breaks
other designs.

Why this is cheap: W depends on the data only through the ranks. When a cell has no ties,
the pooled ranks are 1..N whatever the data, so W* of a relabelling depends only on which
rank positions it calls "B": one null sample serves every tie-free cell (and the extra
columns). Cells with ties get the null of their own tie pattern (grouped by pattern).
Each cell therefore sees N uniformly random relabellings of its ranks, independent of its
data - a valid permutation p-value for every cell, though not the literal same relabelling
of the disruptors across cells (which only the GEMM path of the other statistics keeps).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata
from scipy.stats import t as t_dist

_EPS = np.finfo(np.float64).eps


def placements_stat(sum_pb, sum_pb2, sum_pr, sum_pr2, n_b: int, n_r: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(W, df) from the sums of the placements and of their squares (arrays of one shape).

    rbar_B - rbar_R = mean(P_B) - mean(P_R) + (n_B - n_R) / 2 (pooled rank = internal rank +
    placement); df is Satterthwaite's, (c_B + c_R)^2 / (c_B^2/(n_B-1) + c_R^2/(n_R-1)) with
    c = n var(P), as scipy.stats.brunnermunzel. Complete separation (both variances 0)
    keeps the sign of W through a variance floor of 1e-12."""
    n = n_b + n_r
    c_b = n_b * np.maximum((sum_pb2 - sum_pb * sum_pb / n_b) / (n_b - 1), 0.0)
    c_r = n_r * np.maximum((sum_pr2 - sum_pr * sum_pr / n_r) / (n_r - 1), 0.0)
    diff = sum_pb / n_b - sum_pr / n_r + (n_b - n_r) / 2.0
    total = np.maximum(c_b + c_r, 1e-12)
    w = n_b * n_r * diff / (n * np.sqrt(total))
    df = total * total / np.maximum(c_b * c_b / (n_b - 1) + c_r * c_r / (n_r - 1), 1e-300)
    return w, np.maximum(df, 1.0)


def z_score(w: np.ndarray, df: np.ndarray) -> np.ndarray:
    """W on the normal scale through its Student t(df) reference: sign(W) * z of the
    one-sided t tail (the statistic that is permuted; monotone in the parametric p-value).
    Tails below 1e-300 are clipped (|z| <= 37)."""
    tail = np.maximum(t_dist.sf(np.abs(w), df), 1e-300)
    return np.sign(w) * norm.isf(tail)


def _z_from_sums(sum_pb, sum_pb2, sum_pr, sum_pr2, n_b: int, n_r: int) -> np.ndarray:
    return z_score(*placements_stat(sum_pb, sum_pb2, sum_pr, sum_pr2, n_b, n_r))


def brunner_munzel(x_b, x_r) -> tuple[np.ndarray, np.ndarray]:
    """(W, df) per column of x_b [n_b, m] vs x_r [n_r, m] (mid-ranks for ties) -> [m], [m]."""
    x_b = np.asarray(x_b, dtype=np.float64)
    x_r = np.asarray(x_r, dtype=np.float64)
    n_b, n_r = x_b.shape[0], x_r.shape[0]
    pooled = rankdata(np.vstack([x_b, x_r]), axis=0)
    p_b = pooled[:n_b] - rankdata(x_b, axis=0)           # placements of B among R
    p_r = pooled[n_b:] - rankdata(x_r, axis=0)
    return placements_stat(p_b.sum(0), (p_b ** 2).sum(0), p_r.sum(0), (p_r ** 2).sum(0),
                           n_b, n_r)


def brunner_munzel_z(x_b, x_r) -> np.ndarray:
    """The permuted statistic per column: W of :func:`brunner_munzel` on the normal scale
    (:func:`z_score`) -> [m]."""
    return z_score(*brunner_munzel(x_b, x_r))


def tie_pattern(column: np.ndarray) -> tuple[int, ...]:
    """Sizes of the groups of equal values of a column, in sorted order ((1,)*N: no ties)."""
    _, counts = np.unique(column, return_counts=True)
    return tuple(int(c) for c in counts)


def tie_patterns(x: np.ndarray) -> list[tuple[int, ...]]:
    """:func:`tie_pattern` of every column of x [n, m] (tie-free columns found at once)."""
    s = np.sort(x, axis=0)
    has_ties = np.any(s[1:] == s[:-1], axis=0)
    free = (1,) * x.shape[0]
    return [tie_pattern(x[:, c]) if has_ties[c] else free for c in range(x.shape[1])]


def _null_no_ties(masks: np.ndarray, n_b: int) -> np.ndarray:
    """:func:`null_statistics` without ties: the k-th "B" in rank order has internal rank k,
    so the placement of a B at rank position t is t - c_t and that of an R is c_t, with c_t
    the number of B at positions <= t. [b, N] -> [b]."""
    n = masks.shape[1]
    pos = np.arange(1.0, n + 1.0)
    c = np.cumsum(masks, axis=1)
    pos_c = c * pos                                    # [b, N]
    ks = np.arange(1.0, n_b + 1.0)
    sum_c_b, sum_c2_b = ks.sum(), (ks * ks).sum()      # sum over B of c_t and c_t^2
    rank_b = masks @ pos
    sum_pb = rank_b - sum_c_b
    sum_pb2 = masks @ (pos * pos) - 2.0 * np.einsum("bn,bn->b", masks, pos_c) + sum_c2_b
    sum_c = c.sum(axis=1)
    sum_c2 = np.einsum("bn,bn->b", c, c)
    return _z_from_sums(sum_pb, sum_pb2, sum_c - sum_c_b, sum_c2 - sum_c2_b, n_b, n - n_b)


def null_statistics(masks_sorted: np.ndarray, sizes: tuple[int, ...], n_b: int) -> np.ndarray:
    """W* of relabellings of a column whose sorted values form tie groups of ``sizes``.

    masks_sorted : [b, N] 0/1, 1 = "B", in the column's sorted order (any random subsets:
        sorted order is immaterial for uniformly random relabellings).
    Returns [b] float64: the z-scores (:func:`z_score`) of W*.
    """
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    n = int(sizes_arr.sum())
    n_r = n - n_b
    if len(sizes) == n:
        return _null_no_ties(masks_sorted, n_b)
    else:
        starts = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.intp)
        in_b = np.add.reduceat(masks_sorted, starts, axis=1)   # [b, G] B count per group
    in_r = sizes_arr - in_b
    below = np.concatenate([[0.0], np.cumsum(sizes_arr)[:-1]])  # values below the group
    b_below = np.cumsum(in_b, axis=1) - in_b
    r_below = below - b_below
    mid = below + (sizes_arr + 1.0) / 2.0                  # pooled mid-rank of the group
    pl_b = mid - (b_below + (in_b + 1.0) / 2.0)            # placement of each B in the group
    pl_r = mid - (r_below + (in_r + 1.0) / 2.0)
    return _z_from_sums((in_b * pl_b).sum(1), (in_b * pl_b * pl_b).sum(1),
                        (in_r * pl_r).sum(1), (in_r * pl_r * pl_r).sum(1), n_b, n_r)
