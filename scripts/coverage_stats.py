"""Coverage of the bootstrap intervals of a cell's mean share difference (issue 17), used by
``scripts/calibrate_stats.py coverage``.

Score cubes M_ijc = a_ic u_jc e_ijc for m = 24 cells: a_ic ~ logN(mu_c, 1) (task-A sample i's
weight on cell c), u_jc ~ logN(nu_c, 0.5) (disruptor j's load; B has +0.4 on 4 cells),
e_ijc ~ logN(0, 0.3) (interaction). The true mean share difference is
E_B[alpha_c u_jc / sum_c' alpha_c' u_jc'] - E_R[...] with alpha_c = E a_ic (e's mean is a
common factor and cancels), computed with 400,000 disruptors per group. Each run draws
n_a task-A samples and 48 + 48 disruptors and builds every interval method from the same
stratified bootstrap draws (production stratified_bootstrap, 1000 draws); the BY-adjusted
normal interval (estimate +- z se; by_basic: centred at 2 estimate - mean of the draws, as
production does with ci_method 'basic') is checked at level 1 - 5 * 0.05 / 720 ~ 0.99965 (five
selected cells of 720) for how often it covers.
"""
from __future__ import annotations

import time

import numpy as np
from scipy.stats import norm

from interference.stats.bootstrap import CI_METHODS, bootstrap_interval, stratified_bootstrap
from interference.stats.disruption import normalise

M, N_J, LOAD = 24, 48, 0.4
N_AS = (16, 48, 64)


def _params(rng):
    mu = rng.normal(0.0, 0.5, M)
    nu = rng.normal(0.0, 0.5, M)
    nu_b = nu.copy()
    nu_b[:4] += LOAD
    return mu, nu, nu_b


def truth(mu, nu, nu_b, n: int = 400_000, seed: int = 99) -> np.ndarray:
    rng = np.random.default_rng(seed)
    alpha = np.exp(mu + 0.5)
    out = []
    for centre in (nu_b, nu):
        u = np.exp(centre + 0.5 * rng.standard_normal((n, M)))
        s = alpha * u
        out.append((s / s.sum(axis=1, keepdims=True)).mean(axis=0))
    return out[0] - out[1]


def _cube(rng, n_a, mu, centre):
    a = np.exp(mu + rng.standard_normal((n_a, M)))
    u = np.exp(centre + 0.5 * rng.standard_normal((N_J, M)))
    e = np.exp(0.3 * rng.standard_normal((n_a, N_J, M)))
    return a[:, None, :] * u[None] * e


def coverage(n_a: int, runs: int, seed: int, level: float = 0.95) -> dict:
    rng0 = np.random.default_rng([seed, 0])
    mu, nu, nu_b = _params(rng0)
    theta = truth(mu, nu, nu_b)
    hits = {m: np.zeros(M) for m in CI_METHODS}
    miss_high = {m: 0 for m in CI_METHODS}
    by_level = 1.0 - 5 * 0.05 / 720
    by_hits, by_basic_hits = np.zeros(M), np.zeros(M)
    for child in np.random.SeedSequence([seed, n_a]).spawn(runs):
        rng = np.random.default_rng(child)
        cb, cr = _cube(rng, n_a, mu, nu_b), _cube(rng, n_a, mu, nu)
        est = (normalise(cb.mean(0)).mean(0) - normalise(cr.mean(0)).mean(0))
        draws = stratified_bootstrap(cb, cr, n_bootstrap=1000, seed=rng).mean_diff
        for method in CI_METHODS:
            lo, hi = bootstrap_interval(draws, est, level, method)
            hits[method] += (lo <= theta) & (theta <= hi)
            miss_high[method] += int((theta < lo).sum())
        half = norm.ppf(0.5 + by_level / 2) * draws.std(axis=0, ddof=1)
        by_hits += (est - half <= theta) & (theta <= est + half)
        centre = 2.0 * est - draws.mean(axis=0)         # production BY with ci_method basic
        by_basic_hits += (centre - half <= theta) & (theta <= centre + half)
    rows = []
    for method in CI_METHODS:
        cov = hits[method] / runs
        rows.append(dict(kind="coverage", method=method, n_a=n_a, runs=runs, cells=M,
                         level=level, coverage=float(cov.mean()), min_cell=float(cov.min()),
                         max_cell=float(cov.max()),
                         misses_above_truth=float(miss_high[method]
                                                        / max(1, runs * M - hits[method].sum())),
                         mc_se=float(np.sqrt(level * (1 - level) / (runs * M)))))
    rows.append(dict(kind="coverage", method="by_normal", n_a=n_a, runs=runs, cells=M,
                     level=by_level, coverage=float(by_hits.mean() / runs),
                     min_cell=float(by_hits.min() / runs), max_cell=float(by_hits.max() / runs)))
    rows.append(dict(kind="coverage", method="by_basic", n_a=n_a, runs=runs, cells=M,
                     level=by_level, coverage=float(by_basic_hits.mean() / runs),
                     min_cell=float(by_basic_hits.min() / runs),
                     max_cell=float(by_basic_hits.max() / runs)))
    return rows


def cmd_coverage(args, command: str, save) -> None:
    t0 = time.perf_counter()
    rows = []
    for n_a in N_AS:
        for row in coverage(n_a, args.runs, args.seed):
            print(row, flush=True)
            rows.append(row)
    save(rows, command, time.perf_counter() - t0)
