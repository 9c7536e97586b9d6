"""Statistics of QK-OV heatmaps: permutation tests, FDR, effect sizes, bootstrap (SPEC 6).

Stages, each a small module:
- cells: the distinct (block, layer, head / kv_head) cells and their columns;
- disruption: s_jc = mean_i M_ij,c and its normalisation (share / l2 / none);
- permutation: one shared set of permutations, batched GEMMs, one- or two-sided p-values;
- fdr: Benjamini-Hochberg q-values (statsmodels) and the permutation-count check;
- rank: Brunner-Munzel's studentised rank statistic (the default test) and its null;
- edgeworth: a Hall-corrected variant the harness measured and rejected (not offered);
- effects: Welch's t, Cohen's d, AUC;
- power: the minimal detectable effect of a run and the samples a target effect needs;
- simulate: the designs of the calibration harness (scripts/calibrate_stats.py);
- bootstrap: stratified two-way bootstrap intervals;
- checks / assemble: the validate and assemble steps of each test (validate -> compute ->
  assemble), named results (DisruptionInputs, ScoreArrays, PermutationResult);
- statistics: QKOVStatistics, tying them together (test_disruption / test_scores /
  test_heatmap); its settings are a frozen StatisticsSettings (interference.settings).
"""
from .bootstrap import (CI_METHODS, BootstrapDraws, bootstrap_interval, bootstrap_weights,
                        percentile_interval, stratified_bootstrap)
from .cells import BLOCKS, broadcast_to_heads, distinct_cells, gather_cells, n_distinct_cells
from .disruption import DISRUPTION_NORMS, disruption, normalise
from .effects import auc, cohens_d, mean_difference, welch_t
from .fdr import bh_qvalues, default_n_permutations, min_bh_rejections
from .permutation import PermutationResult, permutation_test_matrix
from .power import minimal_detectable_effect, power_summary, samples_needed
from .rank import brunner_munzel, brunner_munzel_z
from ..settings import StatisticsSettings
from .statistics import (FisherOverlapWarning, PermutationResolutionWarning, QKOVStatistics,
                         alternative_for, test_scores)

__all__ = [
    "QKOVStatistics", "StatisticsSettings", "test_scores", "alternative_for",
    "PermutationResolutionWarning", "FisherOverlapWarning",
    "brunner_munzel", "brunner_munzel_z",
    "minimal_detectable_effect", "samples_needed", "power_summary",
    "bootstrap_interval", "CI_METHODS",
    "permutation_test_matrix", "PermutationResult",
    "bh_qvalues", "default_n_permutations", "min_bh_rejections",
    "cohens_d", "auc", "welch_t", "mean_difference",
    "disruption", "normalise", "DISRUPTION_NORMS",
    "distinct_cells", "gather_cells", "broadcast_to_heads", "n_distinct_cells", "BLOCKS",
    "stratified_bootstrap", "bootstrap_weights", "percentile_interval", "BootstrapDraws",
]
