"""The shared name tables of the library, defined once and imported everywhere.

No dependencies beyond the standard library, so the workflow can import them at parse time.
"""
from __future__ import annotations

BLOCKS = ("Q", "K", "V", "O")
"""The four attention blocks, in canonical order (the order of every per-block output)."""

SHARED_BLOCKS = ("K", "V")
"""Blocks whose parameters a group of query heads shares under grouped-query attention."""

CORE_ROLES = ("fisher", "scored", "reference")
"""The disjoint sample roles every task has: Fisher (normaliser), scored and reference."""

ROLES = CORE_ROLES + ("control",)
"""All sample roles, in collection order: the core roles, then the control split (A')."""

# Allowed values of the settings (interference.settings validates against these)
VARIANTS = ("qkov", "signed", "symmetric", "fisher_weighted")
"""Score variants (SPEC 5); conflict is negative, i.e. the lower tail, for ``signed``."""

FISHER_SOURCES = ("pooled", "a", "b")
"""Whose Fisher normalises the score: (Î_A + Î_B)/2, Î_A or Î_B."""

AGGREGATES = ("sum", "mean")
"""How a cell's parameters are combined: summed, or averaged over the slice."""

GJ_NORMS = ("none", "l2")
"""Normalisation of the disruptor's gradient g_j before scoring."""

BACKENDS = ("auto", "torch", "triton")
"""Contraction backends of the score (auto: the fused Triton kernel on CUDA, else torch)."""

STATISTICS = ("brunner_munzel", "welch", "mean_diff")
"""Permutation test statistics: Brunner-Munzel's studentised rank statistic (default),
Welch's t (studentised; the former default) or the plain mean difference (ablation)."""

ALTERNATIVES = ("greater", "less", "two-sided")
"""What counts as extreme in a permutation test: a large T, a small T, or a large |T|."""

DISRUPTION_NORMS = ("share", "l2", "none")
"""Normalisations of a disruptor's per-cell disruption (SPEC 6)."""

CI_METHODS = ("basic", "percentile", "bc")
"""Bootstrap interval methods: basic (default), percentile (the former default), bias-corrected
percentile."""

FDR_FAMILIES = ("all", "block")
"""Benjamini-Hochberg families: all distinct cells together, or each block apart."""
