"""What effect a run could have found: the minimal detectable effect (MDE) and sample plans.

A lone conflicting cell among m is declared by Benjamini-Hochberg only if its p-value is
at most fdr_alpha / m (BH's first step), so the MDE is the Cohen's d at which a one-sided
two-sample test at level fdr_alpha / m has the stated power (80% by default); with
two-sided p-values (the default test) that p-value is reached in the conflict's direction
at a one-sided level of fdr_alpha / (2 m). With k true
cells BH's threshold is about k times larger, so for several conflicts this is
conservative. The power is that of Student's t (noncentral t, df = n_B + n_R - 2) on
normal shares; the rank test's asymptotic efficiency against it is 3/pi ~ 0.955 there (an
MDE about 2% larger) and above 1 for skewed or heavy-tailed shares (smaller MDE), which is
what scripts/calibrate_stats.py measures.
"""
from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.stats import nct
from scipy.stats import t as t_dist

DEFAULT_POWER = 0.8


def _check(n_b: int, n_r: int, level: float, power: float) -> None:
    if n_b < 2 or n_r < 2:
        raise ValueError(f"each group needs at least 2 disruptors (got {n_b}, {n_r})")
    if not 0 < level < 1 or not 0 < power < 1:
        raise ValueError(f"level and power must be in (0, 1), got {level}, {power}")


def t_power(d: float, n_b: int, n_r: int, level: float) -> float:
    """Power of the one-sided two-sample t test at ``level`` for Cohen's d (noncentral t)."""
    _check(n_b, n_r, level, 0.5)
    df = n_b + n_r - 2
    crit = t_dist.isf(level, df)
    return float(nct.sf(crit, df, d * math.sqrt(n_b * n_r / (n_b + n_r))))


def minimal_detectable_effect(n_b: int, n_r: int, n_cells: int, fdr_alpha: float,
                              power: float = DEFAULT_POWER, two_sided: bool = True) -> float:
    """Cohen's d found with probability ``power`` at level fdr_alpha / n_cells (one-sided;
    fdr_alpha / (2 n_cells) in the conflict's direction when ``two_sided``)."""
    level = fdr_alpha / (n_cells * (2 if two_sided else 1))
    _check(n_b, n_r, level, power)
    hi = 1.0
    while t_power(hi, n_b, n_r, level) < power:        # bracket the root
        hi *= 2.0
        if hi > 1e4:
            raise ValueError(f"no effect size reaches power {power} with n_b={n_b}, "
                             f"n_r={n_r} at level {level:.3g}")
    return float(brentq(lambda d: t_power(d, n_b, n_r, level) - power, 0.0, hi,
                        xtol=1e-10))


def samples_needed(effect: float, n_cells: int, fdr_alpha: float,
                   power: float = DEFAULT_POWER, ratio: float = 1.0,
                   two_sided: bool = True) -> tuple[int, int]:
    """The fewest (n_B, n_R = ceil(ratio n_B)) whose MDE is at most ``effect``."""
    if effect <= 0 or ratio <= 0:
        raise ValueError("effect and ratio must be positive")

    def ok(n_b: int) -> bool:
        return minimal_detectable_effect(n_b, max(2, math.ceil(ratio * n_b)), n_cells,
                                         fdr_alpha, power, two_sided) <= effect

    hi = 4
    while not ok(hi):
        hi *= 2
        if hi > 10 ** 7:
            raise ValueError(f"effect {effect} needs more than 10^7 samples")
    lo = max(2, hi // 2)
    while lo < hi:                                      # smallest n_b with ok(n_b)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return hi, max(2, math.ceil(ratio * hi))


def power_summary(n_b: int, n_r: int, n_cells: int, fdr_alpha: float,
                  power: float = DEFAULT_POWER, two_sided: bool = True) -> dict:
    """summary['power']: the run's MDE and how it was computed."""
    sides = 2 if two_sided else 1
    return {"mde_d": minimal_detectable_effect(n_b, n_r, n_cells, fdr_alpha, power,
                                               two_sided),
            "power": power, "level": fdr_alpha / (sides * n_cells), "n_b": n_b, "n_r": n_r,
            "n_cells": n_cells, "two_sided": bool(two_sided),
            "method": "Cohen's d at which a one-sided two-sample t test at level "
                      + ("fdr_alpha / (2 n_cells) (BH's threshold for a lone conflicting "
                         "cell, two-sided p)" if two_sided else
                         "fdr_alpha / n_cells (BH's threshold for a lone conflicting cell)")
                      + " has this power (noncentral t); see interference.stats.power"}
