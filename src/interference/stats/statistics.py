"""QKOVStatistics: which cells of a QK-OV heatmap are real, task-specific conflicts.

SPEC section 6. For each distinct cell c (block, layer, head; K/V per kv head under GQA):

- s_jc = mean_i M_{ij,c} for every disruptor j (task B's scored samples: group B; the
  reference disruptors, held-out samples of task A or of a control task: group R);
- s~_jc its normalisation (``share`` by default, see :mod:`.disruption`);
- T_c = Welch's t of s~_jc between B and R (``mean_diff`` as an ablation);
- one shared set of permutations of the pooled disruptors gives one-sided p-values (upper
  tail; lower tail for the ``signed`` variant, whose conflicts are negative);
- Benjamini-Hochberg q-values over all distinct cells (or per block);
- Cohen's d, AUC, the null mean and sd of T*, stratified bootstrap intervals of the mean
  difference and of ``layer_head_avg``, and Benjamini-Yekutieli-adjusted intervals for the
  selected cells;
- a cell is a significant conflict when q <= fdr_alpha and d >= min_effect_size (d taken in
  the tested direction, i.e. -d for ``signed``).

The core (:meth:`QKOVStatistics.test_scores`, :meth:`QKOVStatistics.test_disruption`) works
on plain arrays; :meth:`QKOVStatistics.test_heatmap` only fetches the reference scores from
the metric that made the heatmap.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

from .bootstrap import percentile_interval, stratified_bootstrap
from .cells import BLOCKS, broadcast_to_heads, distinct_cells, gather_cells
from .disruption import DISRUPTION_NORMS, disruption, normalise
from .effects import auc as auc_fn
from .effects import cohens_d
from .fdr import (FDR_FAMILIES, bh_qvalues, default_n_permutations, min_bh_rejections,
                  resolution_message)
from .permutation import STATISTICS, permutation_test_matrix

logger = logging.getLogger("fisher.qkov")

VARIANTS = ("qkov", "signed", "symmetric", "fisher_weighted")
TEST_NAMES = {
    "welch": "two-sample permutation test of Welch's t (studentised), B/R labels "
             "exchangeable under H0",
    "mean_diff": "two-sample permutation test of the mean difference, B/R labels "
                 "exchangeable under H0",
}


class PermutationResolutionWarning(UserWarning):
    """Too few permutations (or disruptors) for Benjamini-Hochberg at this many cells."""


def alternative_for(variant: str) -> str:
    """The tail that means conflict: 'less' for the signed variant, else 'greater'."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return "less" if variant == "signed" else "greater"


def _generic_cells(m: int) -> pd.DataFrame:
    return pd.DataFrame(dict(block=["X"] * m, layer=[0] * m, head=list(range(m)),
                             kv_head=list(range(m)), kv_group=[str(k) for k in range(m)],
                             n_query_heads=[1] * m, shared=[False] * m,
                             name=[f"cell{k}" for k in range(m)]))


class QKOVStatistics:
    """Permutation tests, FDR, effect sizes and bootstrap intervals for QK-OV heatmaps.

    Parameters
    ----------
    fdr_alpha : FDR level of Benjamini-Hochberg (and the alpha of the BY intervals).
    n_permutations : number N of random relabellings of the pooled disruptors; None (the
        default) means max(10^4, ceil(2 m / fdr_alpha)) for m distinct cells. When
        C(n_B + n_R, n_B) <= N all relabellings are enumerated (exact test).
    n_bootstrap : stratified bootstrap draws for the intervals (0 disables them).
    min_effect_size : Cohen's d a cell needs, besides q <= fdr_alpha, to count as a
        significant conflict.
    seed : int (or None / numpy SeedSequence) seeding permutations and bootstrap; the
        permutation and bootstrap streams are independent children of it.
    statistic : 'welch' (default) or 'mean_diff' (ablation, not studentised).
    disruption_norm : 'share' (default), 'l2' or 'none' (see :mod:`.disruption`).
    fdr_family : 'all' (all distinct cells of all blocks, default) or 'block'.
    ci_level : level of the bootstrap percentile intervals (default 0.95).
    tol_factor : p-value tolerance, T* >= T - tol_factor * eps * |T| counts as extreme.
    batch_size : permutations per GEMM batch (None: about 2^21 / m).
    progress : tqdm progress bar over permutation batches.
    kv_rtol : relative tolerance for the check that the K/V columns of a kv group agree.
    n_null_top : keep the permutation samples T* of this many top cells (``out["null_top"]``:
        columns, null [k, N], statistic, cells), for the null-distribution figure.
    """

    def __init__(self, fdr_alpha: float = 0.05, n_permutations: int | None = None,
                 n_bootstrap: int = 1000, min_effect_size: float = 0.2, *, seed=0,
                 statistic: str = "welch", disruption_norm: str = "share",
                 fdr_family: str = "all", ci_level: float = 0.95, tol_factor: float = 100.0,
                 batch_size: int | None = None, progress: bool = False,
                 kv_rtol: float = 1e-6, n_null_top: int = 0):
        if not 0 < float(fdr_alpha) < 1:
            raise ValueError(f"fdr_alpha must be in (0, 1), got {fdr_alpha}")
        if n_permutations is not None and int(n_permutations) < 1:
            raise ValueError(f"n_permutations must be >= 1 or None, got {n_permutations}")
        if int(n_bootstrap) < 0:
            raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; expected one of {STATISTICS}")
        if disruption_norm not in DISRUPTION_NORMS:
            raise ValueError(f"unknown disruption_norm {disruption_norm!r}; expected one of "
                             f"{DISRUPTION_NORMS}")
        if fdr_family not in FDR_FAMILIES:
            raise ValueError(f"unknown fdr_family {fdr_family!r}; expected one of "
                             f"{FDR_FAMILIES}")
        if not 0 < float(ci_level) < 1:
            raise ValueError(f"ci_level must be in (0, 1), got {ci_level}")
        self.fdr_alpha = float(fdr_alpha)
        self.n_permutations = None if n_permutations is None else int(n_permutations)
        self.n_bootstrap = int(n_bootstrap)
        self.min_effect_size = float(min_effect_size)
        self.seed = seed
        self.statistic = statistic
        self.disruption_norm = disruption_norm
        self.fdr_family = fdr_family
        self.ci_level = float(ci_level)
        self.tol_factor = float(tol_factor)
        self.batch_size = batch_size
        self.progress = bool(progress)
        self.kv_rtol = float(kv_rtol)
        if int(n_null_top) < 0:
            raise ValueError(f"n_null_top must be >= 0, got {n_null_top}")
        self.n_null_top = int(n_null_top)

    # ------------------------------------------------------------------ helpers
    @property
    def settings(self) -> dict[str, Any]:
        """The constructor settings, as a plain dict."""
        return dict(fdr_alpha=self.fdr_alpha, n_permutations=self.n_permutations,
                    n_bootstrap=self.n_bootstrap, min_effect_size=self.min_effect_size,
                    seed=self.seed if not isinstance(self.seed, np.random.SeedSequence)
                    else repr(self.seed),
                    statistic=self.statistic, disruption_norm=self.disruption_norm,
                    fdr_family=self.fdr_family, ci_level=self.ci_level,
                    tol_factor=self.tol_factor, batch_size=self.batch_size)

    def _streams(self) -> tuple[np.random.SeedSequence, np.random.SeedSequence, int]:
        ss = self.seed if isinstance(self.seed, np.random.SeedSequence) \
            else np.random.SeedSequence(self.seed)
        # the first two children of `ss`, derived without advancing its spawn counter, so
        # repeated calls (and repeated tests with one object) reproduce each other
        perm, boot = (np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + (k,),
                                             pool_size=ss.pool_size) for k in (0, 1))
        return perm, boot, ss.entropy

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"QKOVStatistics({args})"

    # ------------------------------------------------------- matrix-level test
    def test_disruption(self, x_b, x_r, *, cells: pd.DataFrame | None = None,
                        alternative: str = "greater", extra_b=None, extra_r=None
                        ) -> dict[str, Any]:
        """Test every column (cell) of normalised disruption matrices.

        x_b : [n_b, m] disruption of each cell by task B's disruptors.
        x_r : [n_r, m] the same for the reference disruptors.
        cells : DataFrame describing the m columns (see :func:`.cells.distinct_cells`);
            None labels them cell0..cell{m-1} of one block 'X'.
        alternative : 'greater' (conflict = B larger) or 'less'.
        extra_b, extra_r : [n_b, k] / [n_r, k] further columns tested with the same
            permutations but outside the FDR family (e.g. total disruption).

        Returns a dict with 'cells' (DataFrame, one row per cell), 'fdr_corrected'
        ({block: [significant cells]}), 'summary', 'settings' and 'extra' (statistic,
        p_value per extra column).
        """
        x_b = np.asarray(x_b, dtype=np.float64)
        x_r = np.asarray(x_r, dtype=np.float64)
        if x_b.ndim != 2 or x_r.ndim != 2 or x_b.shape[1] != x_r.shape[1]:
            raise ValueError(f"x_b and x_r must be [n, m] with the same m; got {x_b.shape} "
                             f"and {x_r.shape}")
        m = x_b.shape[1]
        if m == 0:
            raise ValueError("no cells to test")
        if cells is None:
            cells = _generic_cells(m)
        if len(cells) != m:
            raise ValueError(f"cells has {len(cells)} rows but the matrices have {m} columns")
        k = 0
        if extra_b is not None:
            extra_b = np.asarray(extra_b, dtype=np.float64).reshape(x_b.shape[0], -1)
            extra_r = np.asarray(extra_r, dtype=np.float64).reshape(x_r.shape[0], -1)
            k = extra_b.shape[1]
            all_b, all_r = np.hstack([x_b, extra_b]), np.hstack([x_r, extra_r])
        else:
            all_b, all_r = x_b, x_r

        n_perm = self.n_permutations if self.n_permutations is not None \
            else default_n_permutations(m, self.fdr_alpha)
        perm_seed, _, entropy = self._streams()
        res = permutation_test_matrix(all_b, all_r, statistic=self.statistic,
                                      alternative=alternative, n_permutations=n_perm,
                                      seed=perm_seed, batch_size=self.batch_size,
                                      tol_factor=self.tol_factor, progress=self.progress,
                                      keep_null_top=self.n_null_top + k if self.n_null_top else 0)
        warn_list: list[str] = []
        # BH can only declare a single cell when the smallest reachable p-value is at most
        # alpha / m; N >= 2m / alpha leaves a factor 2 of room (SPEC 6).
        if res.n_permutations < math.ceil(2 * m / self.fdr_alpha):
            msg = resolution_message(m, self.fdr_alpha, res.n_permutations, res.min_pvalue,
                                     res.exact)
            warnings.warn(msg, PermutationResolutionWarning, stacklevel=2)
            warn_list.append(msg)
        elif not res.exact and res.n_permutations < default_n_permutations(m, self.fdr_alpha):
            logger.info("%d permutations (< 10^4): p-values carry Monte Carlo error of up to "
                        "%.2g", res.n_permutations, 0.5 / math.sqrt(res.n_permutations))

        p = res.pvalue[:m]
        families = cells["block"].to_numpy() if self.fdr_family == "block" else None
        q = bh_qvalues(p, families)
        d = cohens_d(x_b, x_r)
        a = auc_fn(x_b, x_r)
        sign = 1.0 if alternative == "greater" else -1.0
        q_sig = q <= self.fdr_alpha
        sig = q_sig & (sign * d >= self.min_effect_size)

        table = cells.drop(columns=[c for c in ("head_positions",)
                                    if c in cells.columns]).reset_index(drop=True).copy()
        mean_b, mean_r = x_b.mean(axis=0), x_r.mean(axis=0)
        table["statistic"] = res.statistic[:m]
        table["p_value"] = p
        table["q_value"] = q
        table["effect_size"] = d
        table["auc"] = a
        table["mean_b"] = mean_b
        table["mean_r"] = mean_r
        table["mean_diff"] = mean_b - mean_r
        table["null_mean"] = res.null_mean[:m]
        table["null_sd"] = res.null_sd[:m]
        for col in ("ci_low", "ci_high", "ci_low_by", "ci_high_by"):
            table[col] = np.nan
        table["constant"] = res.constant[:m]
        table["q_significant"] = q_sig
        table["significant"] = sig

        blocks = list(dict.fromkeys(table["block"].tolist()))
        summary = {
            "test": TEST_NAMES[self.statistic],
            "statistic": self.statistic,
            "tail": "upper" if alternative == "greater" else "lower",
            "alternative": alternative,
            "n_permutations": res.n_permutations,
            "exact": res.exact,
            "seed": self.seed if isinstance(self.seed, (int, np.integer)) or self.seed is None
            else repr(self.seed),
            "seed_entropy": entropy,
            "min_pvalue": res.min_pvalue,
            "min_bh_rejections": min_bh_rejections(m, self.fdr_alpha, res.min_pvalue),
            "n_cells": m,
            "n_cells_by_block": {b: int((table["block"] == b).sum()) for b in blocks},
            "n_b": int(x_b.shape[0]),
            "n_r": int(x_r.shape[0]),
            "fdr_alpha": self.fdr_alpha,
            "fdr_family": self.fdr_family,
            "min_effect_size": self.min_effect_size,
            "warnings": warn_list,
        }
        out = {"cells": table, "summary": summary, "settings": self.settings,
               "extra": {"statistic": res.statistic[m:m + k], "p_value": res.pvalue[m:m + k],
                         "null_mean": res.null_mean[m:m + k],
                         "null_sd": res.null_sd[m:m + k]}}
        keep = [i for i, c in enumerate(res.null_top_columns) if c < m][:self.n_null_top]
        cols = res.null_top_columns[keep]
        out["null_top"] = {"columns": cols, "null": res.null_top[keep],
                           "statistic": res.statistic[cols],
                           "cells": table["name"].to_numpy()[cols].astype(str)
                           if "name" in table else np.array([f"cell{c}" for c in cols])}
        self._finish(out)
        return out

    def _finish(self, out: dict[str, Any]) -> None:
        """(Re)compute the counts and the 'fdr_corrected' lists from the table."""
        table = out["cells"]
        blocks = list(dict.fromkeys(table["block"].tolist()))
        summary = out["summary"]
        summary["n_q_significant"] = int(table["q_significant"].sum())
        summary["n_significant"] = int(table["significant"].sum())
        summary["n_q_significant_by_block"] = {
            b: int(table.loc[table["block"] == b, "q_significant"].sum()) for b in blocks}
        summary["n_significant_by_block"] = {
            b: int(table.loc[table["block"] == b, "significant"].sum()) for b in blocks}
        fields = ["block", "layer", "head", "kv_head", "kv_group", "shared", "name",
                  "statistic", "p_value", "q_value", "effect_size", "auc", "mean_b",
                  "mean_r", "mean_diff", "null_mean", "null_sd", "ci_low", "ci_high",
                  "ci_low_by", "ci_high_by"]
        fdr = {}
        for b in blocks:
            sub = table[(table["block"] == b) & table["significant"]]
            sub = sub.sort_values(["p_value", "q_value", "layer", "head"], kind="stable")
            items = []
            for row in sub[[f for f in fields if f in sub.columns]].to_dict("records"):
                row = {key: (val.item() if isinstance(val, np.generic) else val)
                       for key, val in row.items()}
                row["heads"] = [int(h) for h in str(row["kv_group"]).split(",")]
                items.append(row)
            fdr[b] = items
        out["fdr_corrected"] = fdr

    # ----------------------------------------------------- score-tensor level
    def test_scores(self, scores_b: Mapping[str, np.ndarray], scores_r: Mapping[str, np.ndarray],
                    layers: Sequence[int], heads: Sequence[int],
                    kv_head_of: Sequence[int] | None = None, variant: str = "qkov",
                    norms_b=None, norms_r=None, ids_b: Sequence | None = None,
                    ids_r: Sequence | None = None, ids_a: Sequence | None = None
                    ) -> dict[str, Any]:
        """Test all distinct cells from score tensors.

        scores_b[B] : [n_a, n_b, n_layers, n_heads] = M^B_{ij,l,h}, i over task A's scored
            samples, j over task B's scored samples (the disruptors of group B).
        scores_r[B] : [n_a, n_r, n_layers, n_heads], the same task-A samples i against the
            reference disruptors j.
        layers, heads : real layer ids and query-head ids of the last two axes.
        kv_head_of : kv head of each entry of `heads` (None: MHA).
        variant : the score variant ('signed' is tested in the lower tail).
        norms_b, norms_r : [n_b] / [n_r] L2 norms of g_j (needed for disruption_norm='l2').
        ids_b, ids_r, ids_a : dataset ids (hashable); B and R must be disjoint, and neither
            may contain a task-A scored sample (self-pairs would bias the test).

        Returns the dict of :meth:`test_disruption` with bootstrap intervals filled in,
        'layer_head_avg' ({block: {'estimate', 'ci_low', 'ci_high'}: [n_layers, n_heads]}),
        and the global B/R disruption ratio in summary['global'].
        """
        alternative = alternative_for(variant)
        blocks = [b for b in BLOCKS if b in scores_b]
        extra_keys = set(scores_b) - set(BLOCKS)
        if extra_keys:
            raise ValueError(f"unknown blocks {sorted(extra_keys)} in scores_b; expected "
                             f"keys among {BLOCKS}")
        if not blocks:
            raise ValueError("scores_b holds no block (expected keys among Q, K, V, O)")
        missing = [b for b in blocks if b not in scores_r]
        if missing:
            raise ValueError(f"scores_r lacks blocks {missing} present in scores_b")
        n_layers, n_heads = len(layers), len(heads)
        arr_b, arr_r = {}, {}
        shape_b = shape_r = None
        for b in blocks:
            sb = np.asarray(scores_b[b], dtype=np.float64)
            sr = np.asarray(scores_r[b], dtype=np.float64)
            for name, arr in (("scores_b", sb), ("scores_r", sr)):
                if arr.ndim != 4 or arr.shape[2:] != (n_layers, n_heads):
                    raise ValueError(
                        f"{name}[{b!r}] has shape {arr.shape}; expected [n_a, n_j, "
                        f"{n_layers}, {n_heads}] for {n_layers} layers and {n_heads} heads")
                if not np.all(np.isfinite(arr)):
                    raise ValueError(f"{name}[{b!r}] contains NaN or infinite values "
                                     "(missing data is an error)")
            if shape_b is None:
                shape_b, shape_r = sb.shape, sr.shape
            if sb.shape != shape_b or sr.shape != shape_r:
                raise ValueError(f"block {b}: shapes {sb.shape} / {sr.shape} differ from "
                                 f"{shape_b} / {shape_r} of the first block")
            arr_b[b], arr_r[b] = sb, sr
        n_a, n_b = shape_b[:2]
        n_r = shape_r[1]
        if shape_r[0] != n_a:
            raise ValueError(f"scores_b has {n_a} task-A samples but scores_r has "
                             f"{shape_r[0]}; the reference must be scored against the same "
                             "task-A samples")
        if n_a < 1:
            raise ValueError("no task-A samples")
        _check_ids(ids_b, n_b, "ids_b")
        _check_ids(ids_r, n_r, "ids_r")
        _check_ids(ids_a, n_a, "ids_a")
        _check_disjoint({"task B disruptors (ids_b)": ids_b,
                         "reference disruptors (ids_r)": ids_r,
                         "task-A scored samples (ids_a)": ids_a})

        cells = distinct_cells(layers, heads, kv_head_of, blocks)
        cube_b = gather_cells(arr_b, cells, rtol=self.kv_rtol, what="scores_b")
        cube_r = gather_cells(arr_r, cells, rtol=self.kv_rtol, what="scores_r")
        s_b, s_r = disruption(cube_b), disruption(cube_r)
        x_b = normalise(s_b, self.disruption_norm, norms_b, ids_b)
        x_r = normalise(s_r, self.disruption_norm, norms_r, ids_r)
        tot_b, tot_r = s_b.sum(axis=1), s_r.sum(axis=1)

        out = self.test_disruption(x_b, x_r, cells=cells, alternative=alternative,
                                   extra_b=tot_b[:, None], extra_r=tot_r[:, None])
        table = out["cells"]
        summary = out["summary"]
        summary["n_a"] = int(n_a)
        summary["variant"] = variant
        summary["disruption_norm"] = self.disruption_norm
        summary["blocks"] = blocks
        mean_tot_b, mean_tot_r = float(tot_b.mean()), float(tot_r.mean())
        summary["global"] = {
            "ratio": mean_tot_b / mean_tot_r if mean_tot_r != 0 else float("nan"),
            "mean_total_b": mean_tot_b,
            "mean_total_r": mean_tot_r,
            "statistic": float(out["extra"]["statistic"][0]),
            "p_value": float(out["extra"]["p_value"][0]),
            "description": "mean over disruptors of the raw total disruption sum_c s_jc, "
                           "B / R; p-value from the same permutations and statistic, "
                           f"{'upper' if alternative == 'greater' else 'lower'} tail",
        }
        del out["extra"]

        avg_est = {b: arr_b[b].mean(axis=(0, 1)) for b in blocks}
        lha = {b: {"estimate": avg_est[b],
                   "ci_low": np.full((n_layers, n_heads), np.nan),
                   "ci_high": np.full((n_layers, n_heads), np.nan)} for b in blocks}
        summary["ci_level"] = self.ci_level
        if self.n_bootstrap > 0:
            _, boot_seed, _ = self._streams()
            draws = stratified_bootstrap(cube_b, cube_r, n_bootstrap=self.n_bootstrap,
                                         disruption_norm=self.disruption_norm,
                                         norms_b=norms_b, norms_r=norms_r, seed=boot_seed)
            lo, hi = percentile_interval(draws.mean_diff, self.ci_level)
            table["ci_low"], table["ci_high"] = lo, hi
            alo, ahi = percentile_interval(draws.avg_b, self.ci_level)
            for b in blocks:
                lha[b]["ci_low"] = broadcast_to_heads(alo, cells, b, n_layers, n_heads)
                lha[b]["ci_high"] = broadcast_to_heads(ahi, cells, b, n_layers, n_heads)
            self._by_intervals(table, draws.mean_diff, summary)
        summary["n_bootstrap"] = self.n_bootstrap
        out["layer_head_avg"] = lha
        self._finish(out)
        logger.info("QK-OV statistics: %d distinct cells, %d with q <= %.3g, %d also with "
                    "d >= %.3g (N=%d %s permutations)", summary["n_cells"],
                    summary["n_q_significant"], self.fdr_alpha, summary["n_significant"],
                    self.min_effect_size, summary["n_permutations"],
                    "exact" if summary["exact"] else "random")
        return out

    def _by_intervals(self, table: pd.DataFrame, draws: np.ndarray, summary: dict) -> None:
        """Benjamini-Yekutieli FCR-adjusted intervals for the selected (significant) cells:
        level 1 - R alpha / m per FDR family (R selected of m cells). At such levels the
        percentile tails would need ~10^5-10^6 draws, so these intervals are normal ones,
        estimate +- z_{1 - R alpha / (2m)} x bootstrap standard error."""
        fam = table["block"].to_numpy() if self.fdr_family == "block" \
            else np.zeros(len(table), dtype=int)
        levels = {}
        for f in dict.fromkeys(fam.tolist()):
            idx = np.flatnonzero(fam == f)
            sel = idx[table["significant"].to_numpy()[idx]]
            if sel.size == 0:
                continue
            level = 1.0 - sel.size * self.fdr_alpha / idx.size
            levels[str(f) if self.fdr_family == "block" else "all"] = level
            z = float(norm.ppf(1.0 - (1.0 - level) / 2.0))
            se = draws[:, sel].std(axis=0, ddof=1)
            est = table["mean_diff"].to_numpy()[sel]
            table.loc[sel, "ci_low_by"] = est - z * se
            table.loc[sel, "ci_high_by"] = est + z * se
        summary["by_levels"] = levels
        summary["by_method"] = ("normal interval, mean difference +- z x bootstrap standard "
                                "error, at level 1 - R*fdr_alpha/m per FDR family")

    # --------------------------------------------------------- seed's API
    def test_heatmap(self, heatmap: Mapping[str, Any], contribs, grads, fisher, *,
                     reference: str | None = None) -> dict[str, Any]:
        """Test a heatmap from ``QKOVInterferenceMetric.compute_heatmap``.

        heatmap : {'Q','K','V','O': {'scores': [n_a, n_b, L, H], ...}, 'meta': {...}}.
        contribs, grads, fisher : the collector's ``contribution_cache``,
            ``gradient_manager`` and Fisher; each must come from the FisherCollector that
            made the heatmap (checked through their ``collector`` backlinks), else
            ValueError.
        reference : None or 'within_task' (default): task A's 'reference' samples; a task
            name: that control task's 'reference' samples.

        Returns the results of :meth:`test_scores`, plus task names in the summary.
        """
        if not isinstance(heatmap, Mapping) or "meta" not in heatmap:
            raise ValueError("heatmap must be the dict returned by compute_heatmap, with a "
                             "'meta' entry")
        meta = heatmap["meta"]
        metric = meta.get("metric")
        if metric is None:
            raise ValueError("heatmap['meta'] has no 'metric'; cannot score the reference "
                             "disruptors")
        collector = getattr(metric, "fisher_collector", None)
        if collector is None:
            raise ValueError("the heatmap's metric has no fisher_collector")
        token = meta.get("collector_token")
        if getattr(collector, "token", None) != token:
            raise ValueError("the heatmap's collector_token does not match the metric's "
                             "FisherCollector: the heatmap was not made by this collector")
        for name, obj in (("contribs", contribs), ("grads", grads), ("fisher", fisher)):
            if getattr(obj, "collector", None) is not collector:
                raise ValueError(
                    f"{name} does not come from the FisherCollector that made this heatmap "
                    f"(collector_token {token!r}); pass that collector's "
                    "contribution_cache, gradient_manager and Fisher")

        task_a, task_b = meta["task_a"], meta["task_b"]
        if reference is None or reference == "within_task":
            task_r = task_a
        elif isinstance(reference, str):
            task_r = reference
        else:
            raise ValueError("reference must be None, 'within_task' or a task name, got "
                             f"{reference!r}")
        try:
            ids_r = list(collector.sample_ids(task_r, "reference"))
        except KeyError:
            ids_r = []
        if not ids_r:
            raise ValueError(
                f"no reference samples of task {task_r!r} were collected. Collect held-out "
                f"samples (disjoint from its fisher and scored samples) with "
                f"collector.collect_fisher(model, batch, task={task_r!r}, role='reference') "
                "before calling test_heatmap")
        layers, heads = list(meta["layers"]), list(meta["heads"])
        kv_head_of = meta.get("kv_head_of")
        variant = meta.get("variant", "qkov")
        ids_a, ids_b = list(meta["sample_ids_a"]), list(meta["sample_ids_b"])
        blocks = [b for b in BLOCKS if b in heatmap]
        missing = [b for b in blocks if "scores" not in heatmap[b]]
        if not blocks or missing:
            raise ValueError(f"heatmap lacks per-sample scores for blocks "
                             f"{missing or list(BLOCKS)}")
        scores_b = {b: heatmap[b]["scores"] for b in blocks}
        # score R with the heatmap's own Fisher normaliser (e.g. pooled A+B): the metric's
        # default for (task_a, task_r) would be A's alone when task_r == task_a
        kwargs = {}
        fisher_tasks = meta.get("fisher_tasks")
        if fisher_tasks is not None:
            kwargs["fisher_tasks"] = tuple(fisher_tasks)
        pair = metric.pair_scores(task_a, ids_a, task_r, ids_r, layers, heads, **kwargs)
        missing = [b for b in blocks if b not in pair]
        if missing:
            raise ValueError(f"metric.pair_scores returned no reference scores for blocks "
                             f"{missing}")
        scores_r = {b: pair[b] for b in blocks}

        norms_b = norms_r = None
        note = None
        if self.disruption_norm == "l2":
            if getattr(metric, "gj_norm", "none") == "l2":
                norms_b, norms_r = np.ones(len(ids_b)), np.ones(len(ids_r))
                note = "scores already use L2-normalised g_j (metric gj_norm='l2')"
            else:
                norms_b = np.asarray(grads.grad_norms(task_b, ids_b), dtype=np.float64)
                norms_r = np.asarray(grads.grad_norms(task_r, ids_r), dtype=np.float64)

        out = self.test_scores(scores_b, scores_r, layers, heads, kv_head_of, variant=variant,
                               norms_b=norms_b, norms_r=norms_r,
                               ids_b=[(task_b, i) for i in ids_b],
                               ids_r=[(task_r, i) for i in ids_r],
                               ids_a=[(task_a, i) for i in ids_a])
        for b in blocks:
            given = heatmap[b].get("layer_head_avg")
            if given is not None and not np.allclose(np.asarray(given, dtype=np.float64),
                                                     out["layer_head_avg"][b]["estimate"],
                                                     rtol=1e-5, atol=0.0):
                warnings.warn(f"heatmap[{b!r}]['layer_head_avg'] differs from the mean of its "
                              "scores; the statistics use the scores", stacklevel=2)
        summary = out["summary"]
        summary.update(task_a=task_a, task_b=task_b, reference_task=task_r,
                       reference="within_task" if task_r == task_a else f"control:{task_r}",
                       n_reference=len(ids_r), collector_token=token,
                       fisher_tasks=list(fisher_tasks) if fisher_tasks is not None else None)
        if note:
            summary["note"] = note
        out["settings"] = dict(out["settings"], variant=variant, reference=summary["reference"])
        return out


def _check_ids(ids, n: int, name: str) -> None:
    if ids is not None and len(ids) != n:
        raise ValueError(f"{name} has {len(ids)} ids but the scores have {n} samples")


def _check_disjoint(groups: Mapping[str, Sequence | None]) -> None:
    items = [(k, set(v)) for k, v in groups.items() if v is not None]
    for a in range(len(items)):
        for b in range(a + 1, len(items)):
            both = items[a][1] & items[b][1]
            if both:
                example = sorted(map(repr, both))[:3]
                raise ValueError(f"{items[a][0]} and {items[b][0]} share {len(both)} sample "
                                 f"id(s), e.g. {', '.join(example)}; they must be disjoint")


def test_scores(scores_b, scores_r, layers, heads, kv_head_of=None, variant: str = "qkov",
                norms_b=None, norms_r=None, ids_b=None, ids_r=None, ids_a=None, *,
                stats: QKOVStatistics | None = None, **settings) -> dict[str, Any]:
    """Functional form of :meth:`QKOVStatistics.test_scores`; `settings` are the
    constructor's keyword arguments (ignored when `stats` is given)."""
    stats = stats if stats is not None else QKOVStatistics(**settings)
    return stats.test_scores(scores_b, scores_r, layers, heads, kv_head_of, variant=variant,
                             norms_b=norms_b, norms_r=norms_r, ids_b=ids_b, ids_r=ids_r,
                             ids_a=ids_a)


test_scores.__test__ = False  # not a pytest test
