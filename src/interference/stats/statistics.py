"""QKOVStatistics: which cells of a QK-OV heatmap are real, task-specific conflicts.

SPEC section 6. For each distinct cell c (block, layer, head; K/V per kv head under GQA):

- s_jc = mean_i M_{ij,c} for every disruptor j (task B's scored samples: group B; the
  reference disruptors, held-out samples of task A or of a control task: group R);
- s~_jc its normalisation (``share`` by default, see :mod:`.disruption`);
- T_c = Welch's t of s~_jc between B and R (``mean_diff`` as an ablation);
- one shared set of permutations of the pooled disruptors gives two-sided p-values
  (|T*| >= |T|; one-sided with ``two_sided=False``);
- Benjamini-Hochberg q-values over all distinct cells (or per block); a cell is claimed
  (``q_significant``) when q <= fdr_alpha and T points the conflict's way (T > 0; T < 0 for
  the ``signed`` variant, whose conflicts are negative); the other way's are counted apart;
- Cohen's d, AUC, the null mean and sd of T*, stratified bootstrap intervals of the mean
  difference and of ``layer_head_avg``, and Benjamini-Yekutieli-adjusted intervals for the
  selected cells;
- a cell is a significant conflict when q <= fdr_alpha and d >= min_effect_size (d taken in
  the tested direction, i.e. -d for ``signed``).

The core (:meth:`QKOVStatistics.test_scores`, :meth:`QKOVStatistics.test_disruption`) works
on plain arrays; :meth:`QKOVStatistics.test_heatmap` only scores the reference disruptors with the
metric that made the heatmap (passed as ``scorer``, or rebuilt from the settings in the
heatmap's meta). Each test is validate (:mod:`.checks`) -> compute -> assemble
(:mod:`.assemble`).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .._tables import VARIANTS
from ..settings import StatisticsSettings
from . import assemble
from .bootstrap import bootstrap_interval, stratified_bootstrap
from .cells import broadcast_to_heads, distinct_cells, gather_cells
from .checks import (check_disjoint, check_disruption, check_ids, check_scores,
                     heatmap_blocks, heatmap_collector, reference_samples)
from .disruption import disruption, normalise
from .effects import auc as auc_fn
from .effects import cohens_d
from .fdr import bh_qvalues, default_n_permutations, min_bh_rejections, resolution_message
from .permutation import PermutationResult, permutation_test_matrix
from .power import power_summary

logger = logging.getLogger("fisher.qkov")
TEST_NAMES = assemble.TEST_NAMES


class PermutationResolutionWarning(UserWarning):
    """Too few permutations (or disruptors) for Benjamini-Hochberg at this many cells."""


class FisherOverlapWarning(UserWarning):
    """Task B's scored samples also entered the Fisher normaliser (the seed's role='all'):
    B and the reference disruptors are then not exchangeable and p-values are optimistic."""


def alternative_for(variant: str) -> str:
    """The tail that means conflict: 'less' for the signed variant, else 'greater'."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return "less" if variant == "signed" else "greater"


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
    statistic : 'brunner_munzel' (default, studentised ranks), 'welch' (studentised means,
        the former default) or 'mean_diff' (ablation, not studentised).
    two_sided : two-sided p-values into BH, cells claimed only in the conflict direction
        (default); False: one-sided p-values (the former default).
    disruption_norm : 'share' (default), 'l2' or 'none' (see :mod:`.disruption`).
    fdr_family : 'all' (all distinct cells of all blocks, default) or 'block'.
    ci_level : level of the bootstrap intervals (default 0.95).
    ci_method : 'basic' (default), 'percentile' (the former default) or 'bc'; see
        :func:`.bootstrap.bootstrap_interval` and docs/statistics.md for the coverage.
    tol_factor : p-value tolerance, T* >= T - tol_factor * eps * |T| counts as extreme.
    batch_size : permutations per GEMM batch (None: about 2^21 / m).
    progress : tqdm progress bar over permutation batches.
    kv_rtol : relative tolerance for the check that the K/V columns of a kv group agree.
    n_null_top : keep the permutation samples T* of this many top cells (``out["null_top"]``:
        columns, null [k, N], statistic, cells), for the null-distribution figure.
    """

    def __init__(self, fdr_alpha: float = 0.05, n_permutations: int | None = None,
                 n_bootstrap: int = 1000, min_effect_size: float = 0.2, *, seed=0,
                 statistic: str = "brunner_munzel", two_sided: bool = True,
                 disruption_norm: str = "share",
                 fdr_family: str = "all", ci_level: float = 0.95, ci_method: str = "basic",
                 tol_factor: float = 100.0,
                 batch_size: int | None = None, progress: bool = False,
                 kv_rtol: float = 1e-6, n_null_top: int = 0):
        self.options = StatisticsSettings(
            fdr_alpha=fdr_alpha, n_permutations=n_permutations, n_bootstrap=n_bootstrap,
            min_effect_size=min_effect_size, seed=seed, statistic=statistic,
            two_sided=two_sided, disruption_norm=disruption_norm, fdr_family=fdr_family,
            ci_level=ci_level,
            ci_method=ci_method, tol_factor=tol_factor, batch_size=batch_size,
            progress=progress, kv_rtol=kv_rtol, n_null_top=n_null_top)

    # the settings, read-only (self.options: a frozen StatisticsSettings)
    fdr_alpha = property(lambda self: self.options.fdr_alpha)
    n_permutations = property(lambda self: self.options.n_permutations)
    n_bootstrap = property(lambda self: self.options.n_bootstrap)
    min_effect_size = property(lambda self: self.options.min_effect_size)
    seed = property(lambda self: self.options.seed)
    statistic = property(lambda self: self.options.statistic)
    two_sided = property(lambda self: self.options.two_sided)
    disruption_norm = property(lambda self: self.options.disruption_norm)
    fdr_family = property(lambda self: self.options.fdr_family)
    ci_level = property(lambda self: self.options.ci_level)
    ci_method = property(lambda self: self.options.ci_method)
    tol_factor = property(lambda self: self.options.tol_factor)
    batch_size = property(lambda self: self.options.batch_size)
    progress = property(lambda self: self.options.progress)
    kv_rtol = property(lambda self: self.options.kv_rtol)
    n_null_top = property(lambda self: self.options.n_null_top)

    @classmethod
    def from_settings(cls, settings: StatisticsSettings) -> "QKOVStatistics":
        """A QKOVStatistics with these (already validated) settings."""
        self = cls.__new__(cls)
        self.options = settings
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def settings(self) -> dict[str, Any]:
        """The constructor settings, as a plain dict."""
        return self.options.to_dict()

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
        inp = check_disruption(x_b, x_r, cells, extra_b, extra_r)
        x_b, x_r = inp.x_b, inp.x_r
        m = x_b.shape[1]
        res, warn_list = self._permute(inp, alternative)
        families = inp.cells["block"].to_numpy() if self.fdr_family == "block" else None
        q = bh_qvalues(res.pvalue[:m], families)
        d = cohens_d(x_b, x_r)
        sign = 1.0 if alternative == "greater" else -1.0
        rejected = q <= self.fdr_alpha
        t_sign = sign * res.statistic[:m]
        q_sig = rejected & (t_sign > 0)
        sig = q_sig & (sign * d >= self.min_effect_size)
        table = assemble.cells_table(inp.cells, x_b, x_r, res, q, d, auc_fn(x_b, x_r), q_sig,
                                     sig)
        summary = self._summary(table, res, x_b, x_r, alternative, warn_list)
        summary["n_q_opposite"] = int((rejected & (t_sign < 0)).sum())
        out = {"cells": table, "settings": self.settings, "summary": summary,
               "extra": assemble.extra_columns(res, m, inp.k),
               "null_top": assemble.null_top(res, table, m, self.n_null_top)}
        out = {k: out[k] for k in ("cells", "summary", "settings", "extra", "null_top")}
        assemble.finish(out)
        return out

    def _tested(self, alternative: str) -> str:
        """What the p-values test: 'two-sided', or the conflict's tail ``alternative``."""
        return "two-sided" if self.two_sided else alternative

    def _permute(self, inp, alternative: str) -> tuple[PermutationResult, list[str]]:
        """One shared set of permutations over the cells and the extra columns, and the
        warning when N is too small for Benjamini-Hochberg at m cells."""
        m = inp.x_b.shape[1]
        n_perm = self.n_permutations if self.n_permutations is not None \
            else default_n_permutations(m, self.fdr_alpha)
        perm_seed, _, _ = self._streams()
        res = permutation_test_matrix(
            inp.all_b, inp.all_r, statistic=self.statistic,
            alternative=self._tested(alternative),
            n_permutations=n_perm, seed=perm_seed, batch_size=self.batch_size,
            tol_factor=self.tol_factor, progress=self.progress,
            keep_null_top=self.n_null_top + inp.k if self.n_null_top else 0,
            top_by=alternative)
        warn_list: list[str] = []
        # BH can only declare a single cell when the smallest reachable p-value is at most
        # alpha / m; N >= 2m / alpha leaves a factor 2 of room (SPEC 6).
        if res.n_permutations < math.ceil(2 * m / self.fdr_alpha):
            msg = resolution_message(m, self.fdr_alpha, res.n_permutations, res.min_pvalue,
                                     res.exact)
            warnings.warn(msg, PermutationResolutionWarning, stacklevel=3)
            warn_list.append(msg)
        elif not res.exact and res.n_permutations < default_n_permutations(m, self.fdr_alpha):
            logger.info("%d permutations (< 10^4): p-values carry Monte Carlo error of up to "
                        "%.2g", res.n_permutations, 0.5 / math.sqrt(res.n_permutations))
        return res, warn_list

    def _summary(self, table: pd.DataFrame, res: PermutationResult, x_b: np.ndarray,
                 x_r: np.ndarray, alternative: str, warn_list: list[str]) -> dict[str, Any]:
        m = x_b.shape[1]
        blocks = list(dict.fromkeys(table["block"].tolist()))
        return {
            "test": TEST_NAMES[self.statistic],
            "statistic": self.statistic,
            "tail": "upper" if alternative == "greater" else "lower",
            "alternative": alternative,
            "two_sided": bool(self.two_sided),
            "n_permutations": res.n_permutations,
            "exact": res.exact,
            "seed": self.seed if isinstance(self.seed, (int, np.integer)) or self.seed is None
            else repr(self.seed),
            "seed_entropy": self._streams()[2],
            "min_pvalue": res.min_pvalue,
            "min_bh_rejections": min_bh_rejections(m, self.fdr_alpha, res.min_pvalue),
            "n_cells": m,
            "n_cells_by_block": {b: int((table["block"] == b).sum()) for b in blocks},
            "n_b": int(x_b.shape[0]),
            "n_r": int(x_r.shape[0]),
            "fdr_alpha": self.fdr_alpha,
            "fdr_family": self.fdr_family,
            "min_effect_size": self.min_effect_size,
            "power": power_summary(int(x_b.shape[0]), int(x_r.shape[0]), m, self.fdr_alpha,
                                   two_sided=self.two_sided),
            "warnings": warn_list,
        }

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
        variant : the score variant ('signed' conflicts are in the lower tail).
        norms_b, norms_r : [n_b] / [n_r] L2 norms of g_j (needed for disruption_norm='l2').
        ids_b, ids_r, ids_a : dataset ids (hashable); B and R must be disjoint, and neither
            may contain a task-A scored sample (self-pairs would bias the test).

        Returns the dict of :meth:`test_disruption` with bootstrap intervals filled in,
        'layer_head_avg' ({block: {'estimate', 'ci_low', 'ci_high'}: [n_layers, n_heads]}),
        and the global B/R disruption ratio in summary['global'].
        """
        alternative = alternative_for(variant)
        arrays = check_scores(scores_b, scores_r, len(layers), len(heads))
        check_ids(ids_b, arrays.n_b, "ids_b")
        check_ids(ids_r, arrays.n_r, "ids_r")
        check_ids(ids_a, arrays.n_a, "ids_a")
        check_disjoint({"task B disruptors (ids_b)": ids_b,
                        "reference disruptors (ids_r)": ids_r,
                        "task-A scored samples (ids_a)": ids_a})

        cells = distinct_cells(layers, heads, kv_head_of, arrays.blocks)
        cube_b = gather_cells(arrays.b, cells, rtol=self.kv_rtol, what="scores_b")
        cube_r = gather_cells(arrays.r, cells, rtol=self.kv_rtol, what="scores_r")
        s_b, s_r = disruption(cube_b), disruption(cube_r)
        x_b = normalise(s_b, self.disruption_norm, norms_b, ids_b)
        x_r = normalise(s_r, self.disruption_norm, norms_r, ids_r)
        tot_b, tot_r = s_b.sum(axis=1), s_r.sum(axis=1)

        out = self.test_disruption(x_b, x_r, cells=cells, alternative=alternative,
                                   extra_b=tot_b[:, None], extra_r=tot_r[:, None])
        summary = out["summary"]
        summary["n_a"] = arrays.n_a
        summary["variant"] = variant
        summary["disruption_norm"] = self.disruption_norm
        summary["blocks"] = arrays.blocks
        summary["global"] = assemble.global_ratio(tot_b, tot_r, out.pop("extra"),
                                                   self._tested(alternative))
        out["layer_head_avg"] = self._intervals(out, arrays, cells, cube_b, cube_r, norms_b,
                                                norms_r, len(layers), len(heads))
        assemble.finish(out)
        logger.info("QK-OV statistics: %d distinct cells, %d with q <= %.3g, %d also with "
                    "d >= %.3g (N=%d %s permutations)", summary["n_cells"],
                    summary["n_q_significant"], self.fdr_alpha, summary["n_significant"],
                    self.min_effect_size, summary["n_permutations"],
                    "exact" if summary["exact"] else "random")
        return out

    def _intervals(self, out: dict[str, Any], arrays, cells: pd.DataFrame, cube_b, cube_r,
                   norms_b, norms_r, n_layers: int, n_heads: int) -> dict[str, dict]:
        """Stratified bootstrap intervals of each cell's mean difference (into the table)
        and of ``layer_head_avg`` (returned, per block), and the BY intervals."""
        table, summary = out["cells"], out["summary"]
        lha = {b: {"estimate": arrays.b[b].mean(axis=(0, 1)),
                   "ci_low": np.full((n_layers, n_heads), np.nan),
                   "ci_high": np.full((n_layers, n_heads), np.nan)} for b in arrays.blocks}
        summary["ci_level"] = self.ci_level
        summary["ci_method"] = self.ci_method
        if self.n_bootstrap > 0:
            _, boot_seed, _ = self._streams()
            draws = stratified_bootstrap(cube_b, cube_r, n_bootstrap=self.n_bootstrap,
                                         disruption_norm=self.disruption_norm,
                                         norms_b=norms_b, norms_r=norms_r, seed=boot_seed)
            lo, hi = bootstrap_interval(draws.mean_diff, table["mean_diff"].to_numpy(),
                                        self.ci_level, self.ci_method)
            table["ci_low"], table["ci_high"] = lo, hi
            alo, ahi = bootstrap_interval(draws.avg_b, cube_b.mean(axis=(0, 1)),
                                          self.ci_level, self.ci_method)
            for b in arrays.blocks:
                lha[b]["ci_low"] = broadcast_to_heads(alo, cells, b, n_layers, n_heads)
                lha[b]["ci_high"] = broadcast_to_heads(ahi, cells, b, n_layers, n_heads)
            assemble.by_intervals(table, draws.mean_diff, summary, self.fdr_alpha,
                                  self.fdr_family, self.ci_method)
        summary["n_bootstrap"] = self.n_bootstrap
        return lha

    # --------------------------------------------------------- seed's API
    def test_heatmap(self, heatmap: Mapping[str, Any], contribs, grads, fisher, *,
                     reference: str | None = None, scorer=None,
                     allow_fisher_overlap: bool | None = None) -> dict[str, Any]:
        """Test a heatmap from ``QKOVInterferenceMetric.compute_heatmap``.

        heatmap : {'Q','K','V','O': {'scores': [n_a, n_b, L, H], ...}, 'meta': {...}}.
        contribs, grads, fisher : the collector's ``contribution_cache``,
            ``gradient_manager`` and Fisher; each must come from the FisherCollector that
            made the heatmap (checked through their ``collector`` backlinks and the
            heatmap's ``collector_token``), else ValueError.
        reference : None or 'within_task' (default): task A's 'reference' samples; a task
            name: that control task's 'reference' samples.
        scorer : the metric that scores the reference disruptors (it must use the same
            collector); None rebuilds it from that collector and the heatmap's
            ``meta['settings']`` and ``meta['compute']``.
        allow_fisher_overlap : what to do when task B's scored samples are also Fisher
            samples of the heatmap's normaliser (the seed's ``role='all'``): None (default)
            runs, with a FisherOverlapWarning and the warning in ``summary['warnings']``;
            True runs and records the same without warning; False raises ValueError.
            Either way ``summary['fisher_overlap_b']`` counts those samples (0 when split).

        Returns the results of :meth:`test_scores`, plus task names in the summary.
        """
        collector = heatmap_collector(heatmap, contribs, grads, fisher, scorer)
        meta = heatmap["meta"]
        task_a, task_b = meta["task_a"], meta["task_b"]
        task_r, ids_r = reference_samples(collector, task_a, reference)
        layers, heads = list(meta["layers"]), list(meta["heads"])
        variant = meta.get("variant", "qkov")
        ids_a, ids_b = list(meta["sample_ids_a"]), list(meta["sample_ids_b"])
        blocks = heatmap_blocks(heatmap)
        scorer = scorer if scorer is not None else _rebuild_metric(collector, meta)
        scores_r = _reference_scores(scorer, meta, task_r, ids_r, blocks)
        norms_b, norms_r, note = self._l2_norms(scorer, grads, task_b, ids_b, task_r, ids_r)
        out = self.test_scores({b: heatmap[b]["scores"] for b in blocks}, scores_r, layers,
                               heads, meta.get("kv_head_of"), variant=variant,
                               norms_b=norms_b, norms_r=norms_r,
                               ids_b=[(task_b, i) for i in ids_b],
                               ids_r=[(task_r, i) for i in ids_r],
                               ids_a=[(task_a, i) for i in ids_a])
        _check_layer_head_avg(heatmap, blocks, out)
        fisher_tasks = meta.get("fisher_tasks")
        summary = out["summary"]
        _fisher_overlap(collector, task_b, ids_b, fisher_tasks, allow_fisher_overlap, summary)
        summary.update(task_a=task_a, task_b=task_b, reference_task=task_r,
                       reference="within_task" if task_r == task_a else f"control:{task_r}",
                       n_reference=len(ids_r), collector_token=meta.get("collector_token"),
                       fisher_tasks=list(fisher_tasks) if fisher_tasks is not None else None)
        if note:
            summary["note"] = note
        out["settings"] = dict(out["settings"], variant=variant, reference=summary["reference"])
        return out

    def _l2_norms(self, scorer, grads, task_b, ids_b, task_r, ids_r):
        """(norms_b, norms_r, note) for disruption_norm='l2' (None, None, None otherwise)."""
        if self.disruption_norm != "l2":
            return None, None, None
        if getattr(scorer, "gj_norm", "none") == "l2":
            return (np.ones(len(ids_b)), np.ones(len(ids_r)),
                    "scores already use L2-normalised g_j (metric gj_norm='l2')")
        return (np.asarray(grads.grad_norms(task_b, ids_b), dtype=np.float64),
                np.asarray(grads.grad_norms(task_r, ids_r), dtype=np.float64), None)


def _fisher_overlap(collector, task_b: str, ids_b: list, fisher_tasks, allow: bool | None,
                    summary: dict) -> None:
    """Count task B's scored samples that are Fisher samples of a task whose Fisher
    normalises the heatmap (all tasks when meta lacks 'fisher_tasks'); record the count in
    summary['fisher_overlap_b'], and warn or raise as ``allow`` says."""
    tasks = list(fisher_tasks) if fisher_tasks is not None else list(collector.fisher.tasks)
    in_fisher = set()
    if task_b in tasks:
        in_fisher = set(collector.sample_ids(task_b, "fisher")) & set(ids_b)
    summary["fisher_overlap_b"] = len(in_fisher)
    summary["fisher_overlap_allowed"] = bool(allow) if in_fisher else None
    if not in_fisher:
        return
    msg = (f"{len(in_fisher)} of {len(ids_b)} scored samples of task {task_b!r} are also in "
           f"its Fisher (collected with role='all'): the normaliser has seen group B but not "
           f"the reference group, so B and R are not exchangeable and p-values are "
           f"optimistic. Collect B with role='fisher' and role='scored' on disjoint batches "
           f"(docs/QUICK_REFERENCE.md).")
    if allow is False:
        raise ValueError(msg + " (allow_fisher_overlap=False)")
    summary["warnings"].append(msg)
    if allow is None:
        warnings.warn(msg + " Pass allow_fisher_overlap=True to accept it.",
                      FisherOverlapWarning, stacklevel=3)
        logger.warning(msg)


def _rebuild_metric(collector, meta: Mapping[str, Any]):
    """The metric that made a heatmap, from its collector and the plain settings in its
    meta (what it computes: 'settings'; how: 'compute')."""
    from ..scores import QKOVInterferenceMetric

    if "settings" not in meta:
        raise ValueError("heatmap['meta'] has no 'settings' to rebuild the metric from; pass "
                         "the metric that made the heatmap as scorer=")
    return QKOVInterferenceMetric(collector.config, collector, **meta["settings"],
                                  **meta.get("compute", {}))


def _reference_scores(scorer, meta: Mapping[str, Any], task_r: str, ids_r: list,
                      blocks: list[str]) -> dict[str, np.ndarray]:
    """Block -> [n_a, n_r, L, H]: task A's samples against the reference disruptors, with
    the heatmap's own Fisher normaliser (e.g. pooled A+B: the metric's default for
    (task_a, task_r) would be A's alone when task_r == task_a)."""
    from ..scores.arms import reference_scores

    pair = reference_scores(scorer, meta, task_r, ids_r)
    missing = [b for b in blocks if b not in pair]
    if missing:
        raise ValueError(f"metric.pair_scores returned no reference scores for blocks "
                         f"{missing}")
    return {b: pair[b] for b in blocks}


def _check_layer_head_avg(heatmap: Mapping[str, Any], blocks: list[str], out: dict) -> None:
    for b in blocks:
        given = heatmap[b].get("layer_head_avg")
        if given is not None and not np.allclose(np.asarray(given, dtype=np.float64),
                                                 out["layer_head_avg"][b]["estimate"],
                                                 rtol=1e-5, atol=0.0):
            warnings.warn(f"heatmap[{b!r}]['layer_head_avg'] differs from the mean of its "
                          "scores; the statistics use the scores", stacklevel=3)


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
