"""Typed, frozen settings of the score and the statistics, validated once on construction.

The allowed values live in :mod:`interference._tables`; the metric
(:class:`~interference.scores.QKOVInterferenceMetric`) and the statistics
(:class:`~interference.stats.QKOVStatistics`) take these fields as keyword arguments and
hold them as one of these objects. No dependency beyond numpy, so the workflow can import
them cheaply.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._tables import (AGGREGATES, CI_METHODS, DISRUPTION_NORMS, FDR_FAMILIES, FISHER_SOURCES, GJ_NORMS,
                      STATISTICS, VARIANTS)


def param_value(v) -> str:
    """A setting as a string (an MLflow param, a table cell): strings as they are, else JSON."""
    return v if isinstance(v, str) else json.dumps(v)


def choice(name: str, value, allowed: tuple) -> Any:
    """``value`` if it is one of ``allowed``, else ValueError naming the setting."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _coerce(obj, casts: dict) -> None:
    for name, cast in casts.items():
        value = getattr(obj, name)
        object.__setattr__(obj, name, None if value is None and cast is not bool else cast(value))


@dataclass(frozen=True)
class MetricSettings:
    """What the QK-OV score M^B_{ij,l,h} computes (SPEC 5); saved as a heatmap's
    ``meta['settings']`` (:meth:`to_dict`, in field order)."""

    epsilon: float = 1e-10
    """Floor ε of the Fisher: the denominator is max(Î, ε) + λ."""
    ridge_lambda: float = 1e-8
    """Absolute ridge λ_abs."""
    ridge_lambda_rel: float = 0.0
    """Relative ridge: λ = max(λ_abs, ridge_lambda_rel · median Î over the (layer, block))."""
    fisher_source: str = "pooled"
    """Whose Fisher normalises: 'pooled' ((Î_A + Î_B)/2), 'a' or 'b' (FISHER_SOURCES)."""
    aggregate: str = "sum"
    """'sum' over a cell's parameters, or 'mean' (divided by the slice size) (AGGREGATES)."""
    variant: str = "qkov"
    """'qkov' | 'signed' | 'symmetric' | 'fisher_weighted' (VARIANTS, SPEC 5)."""
    gj_norm: str = "none"
    """'none', or 'l2': g_j divided by its L2 norm over all attention parameters (GJ_NORMS)."""

    def __post_init__(self):
        _coerce(self, {"epsilon": float, "ridge_lambda": float, "ridge_lambda_rel": float})
        choice("fisher_source", self.fisher_source, FISHER_SOURCES)
        choice("aggregate", self.aggregate, AGGREGATES)
        choice("variant", self.variant, VARIANTS)
        choice("gj_norm", self.gj_norm, GJ_NORMS)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict, in field order."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StatisticsSettings:
    """How QKOVStatistics tests the cells of a heatmap (SPEC 6)."""

    fdr_alpha: float = 0.05
    """FDR level of Benjamini-Hochberg (and the alpha of the BY intervals), in (0, 1)."""
    n_permutations: int | None = None
    """Random relabellings N of the pooled disruptors; None: max(10^4, ceil(2 m / fdr_alpha))
    for m distinct cells. When C(n_B + n_R, n_B) <= N all relabellings are enumerated."""
    n_bootstrap: int = 1000
    """Stratified bootstrap draws for the intervals (0 disables them)."""
    min_effect_size: float = 0.2
    """Cohen's d a cell needs, besides q <= fdr_alpha, to count as a significant conflict."""
    seed: Any = 0
    """int, None or numpy SeedSequence seeding permutations and bootstrap (independent
    children of it)."""
    statistic: str = "brunner_munzel"
    """'brunner_munzel' (studentised ranks, default), 'welch' (studentised means, the former
    default) or 'mean_diff' (ablation) (STATISTICS; docs/statistics.md says why)."""
    two_sided: bool = True
    """Two-sided p-values (|T*| >= |T|) go into BH and a cell is claimed only in the conflict
    direction (default; the rank test's one-sided tail is off by its skew at BH's
    thresholds, docs/statistics.md); False: one-sided p-values (the former default)."""
    disruption_norm: str = "share"
    """'share', 'l2' or 'none' (DISRUPTION_NORMS, see interference.stats.disruption)."""
    fdr_family: str = "all"
    """'all' distinct cells of all blocks together, or each 'block' apart (FDR_FAMILIES)."""
    ci_level: float = 0.95
    """Level of the bootstrap intervals, in (0, 1)."""
    ci_method: str = "basic"
    """Bootstrap interval: 'basic' (default: the coverage the harness measured), 'percentile'
    (the former default) or 'bc' (CI_METHODS, interference.stats.bootstrap)."""
    tol_factor: float = 100.0
    """p-value tolerance: T* >= T - tol_factor * eps * |T| counts as extreme."""
    batch_size: int | None = None
    """Permutations per GEMM batch (None: about 2^21 / m)."""
    progress: bool = False
    """Show a tqdm progress bar over permutation batches."""
    kv_rtol: float = 1e-6
    """Relative tolerance of the check that the K/V columns of a kv group agree."""
    n_null_top: int = 0
    """Keep the permutation samples T* of this many top cells (for the null figure)."""

    def __post_init__(self):
        if not 0 < float(self.fdr_alpha) < 1:
            raise ValueError(f"fdr_alpha must be in (0, 1), got {self.fdr_alpha}")
        if self.n_permutations is not None and int(self.n_permutations) < 1:
            raise ValueError(f"n_permutations must be >= 1 or None, got {self.n_permutations}")
        if int(self.n_bootstrap) < 0:
            raise ValueError(f"n_bootstrap must be >= 0, got {self.n_bootstrap}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {self.statistic!r}; expected one of "
                             f"{STATISTICS}")
        if self.disruption_norm not in DISRUPTION_NORMS:
            raise ValueError(f"unknown disruption_norm {self.disruption_norm!r}; expected one "
                             f"of {DISRUPTION_NORMS}")
        if self.fdr_family not in FDR_FAMILIES:
            raise ValueError(f"unknown fdr_family {self.fdr_family!r}; expected one of "
                             f"{FDR_FAMILIES}")
        if self.ci_method not in CI_METHODS:
            raise ValueError(f"unknown ci_method {self.ci_method!r}; expected one of "
                             f"{CI_METHODS}")
        if not 0 < float(self.ci_level) < 1:
            raise ValueError(f"ci_level must be in (0, 1), got {self.ci_level}")
        if int(self.n_null_top) < 0:
            raise ValueError(f"n_null_top must be >= 0, got {self.n_null_top}")
        _coerce(self, {"fdr_alpha": float, "n_permutations": int, "n_bootstrap": int,
                       "min_effect_size": float, "ci_level": float, "tol_factor": float,
                       "progress": bool, "kv_rtol": float, "n_null_top": int})

    def to_dict(self) -> dict[str, Any]:
        """The settings a result reports (stats.json 'settings'): the test's settings,
        without the display and tolerance knobs; a SeedSequence seed as its repr."""
        return dict(fdr_alpha=self.fdr_alpha, n_permutations=self.n_permutations,
                    n_bootstrap=self.n_bootstrap, min_effect_size=self.min_effect_size,
                    seed=self.seed if not isinstance(self.seed, np.random.SeedSequence)
                    else repr(self.seed),
                    statistic=self.statistic, disruption_norm=self.disruption_norm,
                    fdr_family=self.fdr_family, ci_level=self.ci_level,
                    ci_method=self.ci_method, tol_factor=self.tol_factor, batch_size=self.batch_size)
