"""Benjamini-Hochberg over distinct cells, and what a permutation count allows.

q-values come from statsmodels.stats.multitest.multipletests(method='fdr_bh'), per family
(all distinct cells of all blocks, or each block alone), clipped to 1.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from statsmodels.stats.multitest import multipletests

from .._tables import FDR_FAMILIES


def bh_qvalues(pvalues, families: Sequence | None = None) -> np.ndarray:
    """BH-adjusted p-values (q-values) per family, clipped to [0, 1].

    families: one label per p-value (e.g. the block of each cell); None = one family.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError("pvalues must be one-dimensional")
    if np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("p-values must be finite and in [0, 1]")
    q = np.empty_like(p)
    if p.size == 0:
        return q
    labels = np.zeros(p.size, dtype=int) if families is None else np.asarray(families)
    if labels.shape != p.shape:
        raise ValueError("families must have one label per p-value")
    for label in dict.fromkeys(labels.tolist()):
        idx = np.flatnonzero(labels == label)
        q[idx] = multipletests(p[idx], method="fdr_bh")[1]
    return np.clip(q, 0.0, 1.0)


def default_n_permutations(m: int, fdr_alpha: float) -> int:
    """SPEC default N = max(10^4, ceil(2 m / fdr_alpha)) for m distinct cells."""
    return int(max(10 ** 4, math.ceil(2 * m / fdr_alpha)))


def min_bh_rejections(m: int, fdr_alpha: float, min_pvalue: float) -> int:
    """Fewest cells BH can declare when the smallest reachable p-value is `min_pvalue`:
    k cells with p = min_pvalue are rejected iff min_pvalue <= k * alpha / m, so
    k >= m * min_pvalue / alpha (= ceil(m / (alpha (N + 1))) for a randomised test)."""
    return int(max(1, math.ceil(m * min_pvalue / fdr_alpha - 1e-12)))


def resolution_message(m: int, fdr_alpha: float, n_permutations: int, min_pvalue: float,
                       exact: bool) -> str:
    """The warning text for a permutation count too small for BH at this m."""
    k = min_bh_rejections(m, fdr_alpha, min_pvalue)
    kind = "all relabellings (exact test)" if exact else "permutations"
    msg = (f"{n_permutations} {kind} for {m} distinct cells: the smallest reachable p-value "
           f"is {min_pvalue:.3g}, ")
    if k > 1:
        msg += (f"so Benjamini-Hochberg at fdr_alpha={fdr_alpha} cannot reject fewer than {k} "
                "cells (a conflict confined to fewer cells can never be declared)")
    else:
        msg += (f"more than half the Benjamini-Hochberg threshold for a single cell "
                f"(fdr_alpha/m = {fdr_alpha / m:.3g}): BH cannot reject fewer than 1 cell, "
                "but a lone conflict is declared only if almost no permuted statistic "
                "reaches it")
    if not exact:
        msg += (f"; use n_permutations >= {default_n_permutations(m, fdr_alpha)} "
                "(max(10^4, ceil(2m/fdr_alpha)))")
    else:
        msg += "; more disruptors (samples) are needed for finer p-values"
    return msg
