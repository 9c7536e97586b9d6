"""Two-sample permutation test over all cells at once (SPEC section 6).

The data are the disruption matrices x_b [n_b, m] (task B's scored samples) and x_r
[n_r, m] (reference disruptors). Under the null the n = n_b + n_r row labels are
exchangeable. ONE set of permutations (each a subset of n_b rows relabelled "B") is drawn
and applied to every column, so the cells of one run are tested on the same relabellings.

Per batch of permutations, a 0/1 mask matrix [batch, n] times the centred pooled matrix
[n, m] (and its square) gives every group sum and sum of squares, from which Welch's t (or
the mean difference) follows in closed form: O(N * n * m) multiply-adds in float64 GEMMs.

p-values:
- randomised (C(n, n_b) > N): p_c = (1 + #{T*_c >= T_c - tol_c}) / (1 + N);
- exact (C(n, n_b) <= N): every relabelling once, p_c = #{T*_c >= T_c - tol_c} / C(n, n_b)
  (the observed labelling is one of them);
with tol_c = tol_factor * eps * |T_c| (tol_factor = 100 as in scipy.stats.permutation_test),
mirrored for the lower tail; two-sided, |T*_c| >= |T_c| - tol_c.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations, islice
from typing import Iterator

import numpy as np

from .._tables import ALTERNATIVES, STATISTICS
from .effects import two_groups
from .rank import brunner_munzel_z, null_statistics, tie_patterns

_EPS = np.finfo(np.float64).eps


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of :func:`permutation_test_matrix` (all arrays [m], float64).

    statistic: observed T_c; pvalue: permutation p-value; null_mean / null_sd:
    mean and standard deviation of T*_c over the permutations; n_permutations: N used
    (C(n_b + n_r, n_b) when exact); exact: whether all relabellings were enumerated;
    alternative: 'greater', 'less' or 'two-sided'; statistic_name: 'brunner_munzel',
    'welch' or 'mean_diff';
    min_pvalue: the smallest p-value this N can give; constant: columns with no variation
    (T = 0, p = 1); null_top_columns [k] and null_top [k, N]: the permutation samples T* of
    the k columns with the most extreme observed T (``keep_null_top=k``; empty otherwise)."""

    statistic: np.ndarray
    pvalue: np.ndarray
    null_mean: np.ndarray
    null_sd: np.ndarray
    n_permutations: int
    exact: bool
    alternative: str
    statistic_name: str
    min_pvalue: float
    constant: np.ndarray
    null_top_columns: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    null_top: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


class _GroupStatistic:
    """T from group sums of a centred pooled matrix; the same code computes the observed
    and the permuted statistics, so the observed labelling reproduces T up to rounding.

    With S_B = sum of the "B" rows, Q_B = their sum of squares, S and Q the column totals,
    (n_B - 1) var_B = Q_B - S_B^2 / n_B and (n_R - 1) var_R = (Q - Q_B) - (S - S_B)^2 / n_R,
    so Welch's squared standard error is a quadratic in S_B plus a term linear in Q_B:

        se^2 = a Q_B + b S_B^2 + c S_B + d,
        a = 1/(n_B(n_B-1)) - 1/(n_R(n_R-1)),   b = -1/(n_B^2(n_B-1)) - 1/(n_R^2(n_R-1)),
        c = 2 S / (n_R^2(n_R-1)),              d = Q/(n_R(n_R-1)) - S^2/(n_R^2(n_R-1)).

    On centred columns no term dominates se^2 by much, so this costs little accuracy and
    about half the passes over the [batch, m] arrays; for n_B = n_R, a = 0 and Q_B (its
    GEMM included) is not needed at all.
    """

    def __init__(self, xc: np.ndarray, n_b: int, statistic: str, constant: np.ndarray,
                 sd: np.ndarray):
        nb = n_b
        nr = xc.shape[0] - n_b
        self.statistic = statistic
        self.xc = xc
        self.x2 = xc * xc
        total = xc.sum(axis=0)
        total2 = self.x2.sum(axis=0)
        self.diff_scale = 1.0 / nb + 1.0 / nr
        self.diff_shift = total / nr               # mean_B - mean_R = S_B (1/n_B + 1/n_R) - S/n_R
        self.a = 1.0 / (nb * (nb - 1)) - 1.0 / (nr * (nr - 1))
        self.b = -1.0 / (nb * nb * (nb - 1)) - 1.0 / (nr * nr * (nr - 1))
        self.c = 2.0 * total / (nr * nr * (nr - 1))
        self.d = total2 / (nr * (nr - 1)) - total * total / (nr * nr * (nr - 1))
        # floor on se^2: 1 for constant columns (their centred data are 0, so T = 0 / 1 = 0),
        # otherwise far below any real squared standard error
        self.se2_floor = np.where(constant, 1.0, (1e-12 * sd) ** 2)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """masks [b, n] 0/1 float64 with n_b ones per row -> T [b, m]."""
        sb = masks @ self.xc                        # [b, m] sums over the "B" rows
        if self.statistic == "mean_diff":
            sb *= self.diff_scale
            sb -= self.diff_shift
            return sb
        se2 = sb * self.b
        se2 += self.c
        se2 *= sb
        se2 += self.d
        if self.a != 0.0:
            qb = masks @ self.x2                    # [b, m] sums of squares over "B"
            qb *= self.a
            se2 += qb
        np.maximum(se2, self.se2_floor, out=se2)
        np.sqrt(se2, out=se2)
        sb *= self.diff_scale
        sb -= self.diff_shift
        sb /= se2
        return sb


def _random_masks(rng: np.random.Generator, b: int, n: int, n_b: int) -> np.ndarray:
    """b uniformly random subsets of size n_b of range(n), as 0/1 rows. Uses rng.random
    row by row, so the stream does not depend on how permutations are batched."""
    u = rng.random((b, n))
    kth = np.partition(u, n_b - 1, axis=1)[:, n_b - 1:n_b]
    return (u <= kth).astype(np.float64)


def _exact_masks(n: int, n_b: int, batch: int) -> Iterator[np.ndarray]:
    it = combinations(range(n), n_b)
    while True:
        chunk = list(islice(it, batch))
        if not chunk:
            return
        idx = np.asarray(chunk, dtype=np.intp)
        masks = np.zeros((len(chunk), n), dtype=np.float64)
        masks[np.arange(len(chunk))[:, None], idx] = 1.0
        yield masks


def default_batch_size(m: int) -> int:
    """Permutations per batch: about 2^21 entries per [batch, m] work array."""
    return int(np.clip(2 ** 21 // max(m, 1), 16, 16384))


def permutation_test_matrix(x_b, x_r, *, statistic: str = "welch",
                            alternative: str = "greater", n_permutations: int = 10_000,
                            seed=0, batch_size: int | None = None,
                            tol_factor: float = 100.0, progress: bool = False,
                            keep_null_top: int = 0, top_by: str | None = None
                            ) -> PermutationResult:
    """Column-wise two-sample permutation test with one shared set of permutations.

    Parameters
    ----------
    x_b : [n_b, m] values of the "B" group (rows: disruptors, columns: cells).
    x_r : [n_r, m] values of the reference group.
    statistic : 'brunner_munzel' (Brunner-Munzel's rank statistic on the normal scale, see
        :mod:`.rank`), 'welch' (Welch's t, studentised) or 'mean_diff' (mean_B - mean_R).
    alternative : 'greater' (large T is evidence), 'less' (small T is evidence) or
        'two-sided' (large |T|: p = share of relabellings with |T*| >= |T|).
    n_permutations : N random relabellings; if C(n_b + n_r, n_b) <= N, all relabellings
        are enumerated instead (exact test).
    seed : int, None, SeedSequence or Generator for numpy.random.default_rng.
    batch_size : permutations per GEMM batch (default: about 2^21 / m).
    tol_factor : tolerance multiplier, tol_c = tol_factor * eps * |T_c|.
    progress : show a tqdm progress bar over batches.
    keep_null_top : keep the permutation samples T* of this many columns, those with the
        most extreme observed T in the direction of ``top_by`` (constant ones last),
        for the null-distribution figure; [k, N] float64.
    top_by : 'greater', 'less' or 'two-sided'; None: ``alternative``.
    """
    x, n_b, n_permutations = _check_groups(x_b, x_r, statistic, alternative, n_permutations)
    top_by = alternative if top_by is None else top_by
    if top_by not in ALTERNATIVES:
        raise ValueError(f"unknown top_by {top_by!r}; expected one of {ALTERNATIVES}")
    n, m = x.shape
    n_all = math.comb(n, n_b)
    exact = n_all <= n_permutations
    n_used = n_all if exact else n_permutations
    batch_size = default_batch_size(m) if batch_size is None else max(1, int(batch_size))
    batches = _mask_batches(n, n_b, n_used, exact, batch_size, seed)
    bar = _progress_bar(progress, n_used)
    if statistic == "brunner_munzel":
        t_obs, constant, scan = _rank_scan(x, n_b, batches, alternative, tol_factor,
                                           keep_null_top, top_by, bar)
        return _assemble(scan, t_obs, n_used, exact, alternative, statistic, constant,
                         scan.top_cols)
    xc = x - x.mean(axis=0)
    sd = xc.std(axis=0, ddof=1)
    scale = np.abs(x).max(axis=0)
    constant = sd <= 1e-13 * scale
    xc[:, constant] = 0.0
    stat = _GroupStatistic(xc, n_b, statistic, constant, sd)

    observed_mask = np.zeros((1, n))
    observed_mask[0, :n_b] = 1.0
    t_obs = stat(observed_mask)[0]
    top_cols = _top_columns(t_obs, constant, top_by, keep_null_top)
    scan = _scan_null(stat, batches, t_obs, alternative, tol_factor, top_cols, bar)
    return _assemble(scan, t_obs, n_used, exact, alternative, statistic, constant, top_cols)


def extremeness(t: np.ndarray, alternative: str) -> np.ndarray:
    """T, -T or |T|: larger is more extreme under ``alternative``."""
    if alternative == "two-sided":
        return np.abs(t)
    return t if alternative == "greater" else -t


def _threshold(u_obs: np.ndarray, tol_factor: float) -> np.ndarray:
    """Extremeness at which a relabelling counts: u - tol_factor * eps * |u|."""
    return u_obs - tol_factor * _EPS * np.abs(u_obs)


def _top_columns(t_obs: np.ndarray, constant: np.ndarray, alternative: str, k: int
                 ) -> np.ndarray:
    """The k columns with the most extreme observed T under ``alternative``, constant last."""
    k_top = min(max(int(k), 0), t_obs.shape[0])
    return np.lexsort((-extremeness(t_obs, alternative), constant))[:k_top]


def _check_groups(x_b, x_r, statistic: str, alternative: str, n_permutations
                  ) -> tuple[np.ndarray, int, int]:
    """(pooled [n_b + n_r, m] float64 with B first, n_b, N) after checking the inputs."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; expected one of {STATISTICS}")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"unknown alternative {alternative!r}; expected one of "
                         f"{ALTERNATIVES}")
    x_b, x_r = two_groups(x_b, x_r)
    n_b, n_r = x_b.shape[0], x_r.shape[0]
    if n_b < 2 or n_r < 2:
        raise ValueError(f"each group needs at least 2 disruptors (got n_b={n_b}, "
                         f"n_r={n_r})")
    if int(n_permutations) < 1:
        raise ValueError("n_permutations must be >= 1")
    x = np.vstack([x_b, x_r])
    if not np.all(np.isfinite(x)):
        raise ValueError("disruption matrices contain NaN or infinite values")
    return x, n_b, int(n_permutations)


def _mask_batches(n: int, n_b: int, n_used: int, exact: bool, batch_size: int,
                  seed) -> Iterator[np.ndarray]:
    """The relabellings as batches of 0/1 masks [b, n]: all of them when ``exact``, else
    ``n_used`` random ones from ``seed``."""
    if exact:
        yield from _exact_masks(n, n_b, batch_size)
        return
    rng = np.random.default_rng(seed)
    left = n_used
    while left > 0:
        b = min(batch_size, left)
        left -= b
        yield _random_masks(rng, b, n, n_b)


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, unit="perm", desc="permutations")
    except ImportError:  # pragma: no cover - tqdm is optional
        return None


@dataclass(frozen=True)
class _NullScan:
    """What one pass over the permutations accumulates, per column [m]: the count of T* at
    least as extreme as T, the sums of (T* - T) and of its square, the kept T* of the
    top columns ([k, N]) and which columns those are ([k])."""

    count: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    null_top: np.ndarray
    top_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _rank_scan(x: np.ndarray, n_b: int, batches, alternative: str, tol_factor: float,
               keep_null_top: int, top_by: str, bar
               ) -> tuple[np.ndarray, np.ndarray, _NullScan]:
    """(T [m], constant [m], scan) of the Brunner-Munzel z statistic (:mod:`.rank`): one
    null per tie pattern of the pooled columns (one for all tie-free columns), p-value
    counts by binary search in each batch's sorted null."""
    n, m = x.shape
    t_obs = brunner_munzel_z(x[:n_b], x[n_b:])
    patterns = tie_patterns(x)
    groups: dict[tuple[int, ...], list[int]] = {}
    for c, pat in enumerate(patterns):
        groups.setdefault(pat, []).append(c)
    constant = np.zeros(m, dtype=bool)
    constant[[c for pat, cols in groups.items() if len(pat) == 1 for c in cols]] = True
    t_obs[constant] = 0.0
    threshold = _threshold(extremeness(t_obs, alternative), tol_factor)
    top_cols = _top_columns(t_obs, constant, top_by, keep_null_top)
    index = {pat: np.asarray(cols, dtype=np.intp) for pat, cols in groups.items()}
    count, s1, s2 = np.zeros(m, dtype=np.int64), np.zeros(m), np.zeros(m)
    kept: list[np.ndarray] = []
    total = 0
    for masks in batches:
        total += masks.shape[0]
        nulls = {}
        for pat, cols in index.items():
            null = null_statistics(masks, pat, n_b)             # [b]
            nulls[pat] = null
            u_sorted = np.sort(extremeness(null, alternative))
            count[cols] += u_sorted.size - np.searchsorted(u_sorted, threshold[cols], "left")
            s1[cols] += null.sum()
            s2[cols] += (null * null).sum()
        if top_cols.size:
            kept.append(np.stack([nulls[patterns[c]] for c in top_cols]))
        if bar is not None:
            bar.update(masks.shape[0])
    if bar is not None:
        bar.close()
    # raw sums of T* and T*^2 -> sums of (T* - T) and of its square (as _assemble expects)
    null_top = np.concatenate(kept, axis=1) if kept else np.zeros((top_cols.size, 0))
    scan = _NullScan(count=count, s1=s1 - total * t_obs,
                     s2=s2 - 2.0 * t_obs * s1 + total * t_obs * t_obs, null_top=null_top,
                     top_cols=top_cols)
    return t_obs, constant, scan


def _scan_null(stat: _GroupStatistic, batches, t_obs: np.ndarray, alternative: str,
               tol_factor: float, top_cols: np.ndarray, bar) -> _NullScan:
    threshold = _threshold(extremeness(t_obs, alternative), tol_factor)
    m, k_top = t_obs.shape[0], top_cols.shape[0]
    kept: list[np.ndarray] = []
    count = np.zeros(m, dtype=np.int64)
    shift = t_obs                         # shifted sums for a stable null variance
    s1 = np.zeros(m)
    s2 = np.zeros(m)
    for masks in batches:
        t = stat(masks)
        if k_top:
            kept.append(t[:, top_cols].T.copy())
        count += np.count_nonzero(extremeness(t, alternative) >= threshold, axis=0)
        t -= shift
        s1 += t.sum(axis=0)
        t *= t
        s2 += t.sum(axis=0)
        if bar is not None:
            bar.update(masks.shape[0])
    if bar is not None:
        bar.close()
    null_top = np.concatenate(kept, axis=1) if kept else np.zeros((k_top, 0))
    return _NullScan(count=count, s1=s1, s2=s2, null_top=null_top)


def _assemble(scan: _NullScan, t_obs: np.ndarray, n_used: int, exact: bool, alternative: str,
              statistic: str, constant: np.ndarray, top_cols: np.ndarray) -> PermutationResult:
    if exact:
        pvalue = scan.count / n_used
        min_p = 1.0 / n_used
    else:
        pvalue = (1.0 + scan.count) / (1.0 + n_used)
        min_p = 1.0 / (1.0 + n_used)
    mean_dev = scan.s1 / n_used
    null_mean = t_obs + mean_dev
    null_var = (np.maximum(scan.s2 / n_used - mean_dev ** 2, 0.0)
                * (n_used / max(n_used - 1, 1)))
    return PermutationResult(statistic=t_obs, pvalue=pvalue, null_mean=null_mean,
                             null_sd=np.sqrt(null_var), n_permutations=int(n_used),
                             exact=bool(exact), alternative=alternative,
                             statistic_name=statistic, min_pvalue=float(min_p),
                             constant=constant, null_top_columns=top_cols.astype(np.int64),
                             null_top=scan.null_top)
