"""Tests of interference.stats (SPEC section 6): correctness against scipy / statsmodels,
brute-force loops, calibration, power, localisation, bootstrap coverage, GQA cells, errors.

Calibration and power run on synthetic disruption matrices with few runs so the file stays
fast; scripts/simulate_stats.py runs the full simulations.
"""
from __future__ import annotations

import math
import warnings
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

import interference.stats as qs
from interference.stats import PermutationResolutionWarning, QKOVStatistics


# --------------------------------------------------------------------------- helpers
def welch_stat(x, y, axis):
    return sps.ttest_ind(x, y, equal_var=False, axis=axis).statistic


def diff_stat(x, y, axis):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def make_scores(rng, n_a, n_j, n_layers, kv_head_of, scale=1.0, blocks="QKVO"):
    """Random non-negative scores [n_a, n_j, L, H]; K/V columns repeat per kv group."""
    kv = np.asarray(kv_head_of)
    n_heads = len(kv)
    out = {}
    for b in blocks:
        if b in "KV":
            base = rng.gamma(2.0, 1.0, (n_a, n_j, n_layers, kv.max() + 1))
            out[b] = base[..., kv] * scale
        else:
            out[b] = rng.gamma(2.0, 1.0, (n_a, n_j, n_layers, n_heads)) * scale
    return out


# ------------------------------------------------------ p-values vs scipy
@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")   # scipy, constant cell
@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_kept_null_of_top_cells_equals_scipy_null_distribution(alternative):
    """keep_null_top: the T* samples of the k most extreme cells are scipy's exact null
    distribution of those cells (as multisets), and they reproduce the p-values."""
    rng = np.random.default_rng(3)
    xb = rng.normal(0.0, 1.0, (5, 7)) + np.linspace(-1, 1, 7)
    xr = rng.normal(0.0, 1.0, (4, 7))
    xb[:, 2] = xr[0, 2] = 1.0
    xr[1:, 2] = 1.0                                       # a constant cell: never "top"
    res = qs.permutation_test_matrix(xb, xr, alternative=alternative, n_permutations=10_000,
                                     keep_null_top=3)
    ref = sps.permutation_test((xb, xr), welch_stat, permutation_type="independent",
                               alternative=alternative, n_resamples=10_000, vectorized=True,
                               axis=0)
    key = ref.statistic if alternative == "greater" else -ref.statistic
    want_cols = [c for c in np.argsort(-key, kind="stable") if c != 2][:3]
    assert list(res.null_top_columns) == want_cols
    assert res.null_top.shape == (3, math.comb(9, 5))
    for row, c in zip(res.null_top, res.null_top_columns):
        np.testing.assert_allclose(np.sort(row), np.sort(ref.null_distribution[:, c]),
                                   rtol=1e-10, atol=1e-12)
        tol = 1e-12 * abs(res.statistic[c])
        extreme = row >= res.statistic[c] - tol if alternative == "greater" else \
            row <= res.statistic[c] + tol
        assert extreme.mean() == pytest.approx(res.pvalue[c], abs=1e-12)
    assert qs.permutation_test_matrix(xb, xr).null_top.shape == (0, 0)


def test_statistics_return_the_named_null_of_the_top_cells():
    rng = np.random.default_rng(4)
    kv = [0, 0, 1, 1]
    sb, sr = make_scores(rng, 5, 8, 2, kv, scale=1.5), make_scores(rng, 5, 8, 2, kv)
    out = QKOVStatistics(n_permutations=2000, n_bootstrap=0, n_null_top=4).test_scores(
        sb, sr, [0, 1], [0, 1, 2, 3], kv)
    nt, cells = out["null_top"], out["cells"]
    assert nt["null"].shape == (4, 2000) and len(nt["cells"]) == 4
    # the top cells in the conflict's direction, whatever the sidedness of the p-values
    top = cells.sort_values("statistic", ascending=False, kind="stable").head(4)
    assert list(nt["cells"]) == list(top["name"])
    np.testing.assert_allclose(nt["statistic"], top["statistic"])
    np.testing.assert_allclose(nt["null"].mean(axis=1), top["null_mean"], rtol=1e-9)


@pytest.mark.parametrize("alternative", ["greater", "less"])
@pytest.mark.parametrize("statistic", ["welch", "mean_diff"])
def test_pvalues_exact_equal_scipy(alternative, statistic):
    rng = np.random.default_rng(0)
    xb = rng.normal(0.4, 1.0, (6, 5))
    xr = rng.normal(0.0, 2.0, (5, 5))
    res = qs.permutation_test_matrix(xb, xr, statistic=statistic, alternative=alternative,
                                     n_permutations=10_000, seed=1)
    fn = welch_stat if statistic == "welch" else diff_stat
    ref = sps.permutation_test((xb, xr), fn, permutation_type="independent",
                               alternative=alternative, n_resamples=10_000, vectorized=True,
                               axis=0)
    assert res.exact and res.n_permutations == math.comb(11, 6)
    np.testing.assert_array_equal(res.pvalue, ref.pvalue)
    np.testing.assert_allclose(res.statistic, ref.statistic, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res.null_mean, ref.null_distribution.mean(axis=0),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.null_sd, ref.null_distribution.std(axis=0, ddof=1),
                               rtol=1e-9)


def test_pvalues_exact_with_ties_equal_scipy():
    # integer data: many permuted statistics tie exactly with the observed one, so the
    # tolerance decides; ours (100 eps |T|) must count them as scipy does
    rng = np.random.default_rng(5)
    xb = rng.integers(0, 3, (5, 6)).astype(float)
    xr = rng.integers(0, 3, (4, 6)).astype(float)
    res = qs.permutation_test_matrix(xb, xr, statistic="mean_diff", n_permutations=1000)
    ref = sps.permutation_test((xb, xr), diff_stat, permutation_type="independent",
                               alternative="greater", n_resamples=1000, vectorized=True,
                               axis=0)
    assert res.exact
    np.testing.assert_array_equal(res.pvalue, ref.pvalue)


@pytest.mark.parametrize("statistic", ["welch", "mean_diff", "brunner_munzel"])
def test_two_sided_pvalues_exact_equal_a_loop_over_all_relabellings(statistic):
    """p = #{|T*| >= |T|} / C(n, n_b) over every relabelling, T* by each statistic's own
    float64 reference (scipy's Welch t, a mean difference, scipy's Brunner-Munzel)."""
    rng = np.random.default_rng(8)
    xb = rng.normal(0.6, 1.0, (5, 4))
    xr = rng.normal(0.0, 2.0, (6, 4))
    xb[:, 3] = rng.normal(-8.0, 0.5, 5)                # a cell where B is lower
    x = np.vstack([xb, xr])

    def stat(b, r):
        if statistic == "welch":
            return sps.ttest_ind(b, r, equal_var=False, axis=0).statistic
        if statistic == "mean_diff":
            return b.mean(0) - r.mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            bm = sps.brunnermunzel(r, b, axis=0)       # B second: > 0 when B tends higher
        # complete separation: scipy's W is infinite and its p NaN
        return np.where(np.isfinite(bm.statistic),
                        np.sign(bm.statistic) * sps.norm.isf(bm.pvalue / 2),
                        np.sign(bm.statistic) * np.inf)

    t = stat(xb, xr)
    null = []
    for subset in combinations(range(11), 5):
        mask = np.zeros(11, bool)
        mask[list(subset)] = True
        null.append(stat(x[mask], x[~mask]))
    expect = np.mean(np.abs(np.array(null)) >= np.abs(t) * (1 - 1e-9), axis=0)
    res = qs.permutation_test_matrix(xb, xr, statistic=statistic, alternative="two-sided",
                                     n_permutations=10_000)
    assert res.exact and res.alternative == "two-sided"
    np.testing.assert_allclose(res.pvalue, expect, rtol=1e-12)
    assert res.statistic[3] < 0 and res.pvalue[3] < 0.05


def test_two_sided_default_claims_conflicts_in_one_direction_only():
    rng = np.random.default_rng(12)
    xb, xr = rng.normal(0.0, 1.0, (30, 12)), rng.normal(0.0, 1.0, (30, 12))
    xb[:, 2] += 2.0                                    # B higher: a conflict
    xb[:, 7] -= 2.0                                    # B lower: not a conflict
    out = QKOVStatistics(n_permutations=4000, n_bootstrap=0).test_disruption(xb, xr)
    cells, summary = out["cells"], out["summary"]
    assert cells["q_value"].iloc[[2, 7]].max() <= 0.05
    assert cells["q_significant"].tolist() == [c == 2 for c in range(12)]
    assert cells["significant"].tolist() == [c == 2 for c in range(12)]
    assert summary["n_q_opposite"] == 1 and summary["two_sided"] is True
    assert summary["power"]["level"] == pytest.approx(0.05 / 24)
    one = QKOVStatistics(n_permutations=4000, n_bootstrap=0, two_sided=False,
                         ).test_disruption(xb, xr)
    assert one["cells"]["p_value"].iloc[7] > 0.99 and one["summary"]["n_q_opposite"] == 0
    assert one["summary"]["power"]["level"] == pytest.approx(0.05 / 12)
    # a milder shift: with the same relabellings the two-sided p is about twice the one-sided
    xb[:, 2] -= 1.4
    p1, p2 = (QKOVStatistics(n_permutations=4000, n_bootstrap=0, two_sided=ts).test_disruption(
        xb, xr)["cells"]["p_value"].iloc[2] for ts in (False, True))
    assert p1 < 0.05 and 1.5 < p2 / p1 < 2.5, (p1, p2)


@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_pvalues_randomised_close_to_scipy(alternative):
    rng = np.random.default_rng(2)
    xb = rng.normal(0.5, 1.0, (15, 6))
    xr = rng.normal(0.0, 1.5, (12, 6))
    n = 4000
    res = qs.permutation_test_matrix(xb, xr, alternative=alternative, n_permutations=n, seed=3)
    ref = sps.permutation_test((xb, xr), welch_stat, permutation_type="independent",
                               alternative=alternative, n_resamples=n, vectorized=True,
                               axis=0, rng=np.random.default_rng(4))
    assert not res.exact and res.n_permutations == n
    # both are Monte Carlo estimates of the same exact p: difference ~ sqrt(2 p (1-p) / N)
    p = (res.pvalue + ref.pvalue) / 2
    tol = 4 * np.sqrt(2 * p * (1 - p) / n) + 2.0 / n
    assert np.all(np.abs(res.pvalue - ref.pvalue) <= tol), (res.pvalue, ref.pvalue)
    # randomised p-values are (1 + k) / (1 + N)
    k = res.pvalue * (n + 1) - 1
    np.testing.assert_allclose(k, np.round(k), atol=1e-6)


def test_one_shared_permutation_set_and_batch_independence():
    rng = np.random.default_rng(7)
    xb = rng.normal(size=(20, 8))
    xr = rng.normal(size=(20, 8))
    a = qs.permutation_test_matrix(xb, xr, n_permutations=3000, seed=11, batch_size=64)
    b = qs.permutation_test_matrix(xb, xr, n_permutations=3000, seed=11, batch_size=1000)
    np.testing.assert_array_equal(a.pvalue, b.pvalue)
    # identical columns get identical p-values: the same relabellings are applied to all
    x2b = np.hstack([xb, xb[:, :1]])
    x2r = np.hstack([xr, xr[:, :1]])
    c = qs.permutation_test_matrix(x2b, x2r, n_permutations=3000, seed=11)
    assert c.pvalue[0] == c.pvalue[-1]
    np.testing.assert_array_equal(c.pvalue[:-1], a.pvalue)
    d = qs.permutation_test_matrix(xb, xr, n_permutations=3000, seed=12)
    assert not np.array_equal(a.pvalue, d.pvalue)


def test_constant_column_gives_p_one():
    xb = np.ones((5, 2))
    xr = np.ones((6, 2))
    xb[:, 1] = np.arange(5)
    xr[:, 1] = np.arange(6) - 3.0
    res = qs.permutation_test_matrix(xb, xr, n_permutations=500, seed=0)
    assert res.constant.tolist() == [True, False]
    assert res.statistic[0] == 0.0 and res.pvalue[0] == 1.0


# ------------------------------------------------------------ q-values
def test_qvalues_equal_statsmodels():
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.uniform(size=50), rng.uniform(0, 1e-3, size=10)])
    q = qs.bh_qvalues(p)
    np.testing.assert_allclose(q, multipletests(p, method="fdr_bh")[1], rtol=0, atol=0)
    fam = np.array(["Q"] * 30 + ["K"] * 30)
    qf = qs.bh_qvalues(p, fam)
    for f in ("Q", "K"):
        np.testing.assert_array_equal(qf[fam == f], multipletests(p[fam == f],
                                                                  method="fdr_bh")[1])
    assert np.all(qs.bh_qvalues(np.ones(4)) <= 1.0)


def test_test_disruption_qvalues_and_families():
    rng = np.random.default_rng(3)
    m = 24
    xb = rng.normal(size=(20, m))
    xr = rng.normal(size=(20, m))
    xb[:, :4] += 1.5
    cells = qs.distinct_cells([0, 1], [0, 1, 2, 3], [0, 0, 1, 1])
    for family in ("all", "block"):
        st = QKOVStatistics(n_permutations=2000, n_bootstrap=0, fdr_family=family)
        out = st.test_disruption(xb, xr, cells=cells)
        t = out["cells"]
        if family == "all":
            ref = multipletests(t["p_value"].to_numpy(), method="fdr_bh")[1]
        else:
            ref = np.empty(m)
            for b in "QKVO":
                idx = (t["block"] == b).to_numpy()
                ref[idx] = multipletests(t["p_value"].to_numpy()[idx], method="fdr_bh")[1]
        np.testing.assert_array_equal(t["q_value"].to_numpy(), ref)
        assert out["summary"]["n_q_significant"] == int((t["q_value"] <= 0.05).sum())
        # fdr_corrected lists exactly the significant cells, per block
        listed = sum(len(v) for v in out["fdr_corrected"].values())
        assert listed == out["summary"]["n_significant"] == int(t["significant"].sum())


# --------------------------------------------------------- effect sizes
def test_cohens_d_matches_loop():
    rng = np.random.default_rng(4)
    xb = rng.normal(1.0, 2.0, (9, 5))
    xr = rng.normal(0.0, 1.0, (13, 5))
    d = qs.cohens_d(xb, xr)
    for c in range(5):
        b, r = [float(v) for v in xb[:, c]], [float(v) for v in xr[:, c]]
        mb, mr = sum(b) / len(b), sum(r) / len(r)
        vb = sum((v - mb) ** 2 for v in b) / (len(b) - 1)
        vr = sum((v - mr) ** 2 for v in r) / (len(r) - 1)
        sp = math.sqrt(((len(b) - 1) * vb + (len(r) - 1) * vr) / (len(b) + len(r) - 2))
        assert d[c] == pytest.approx((mb - mr) / sp, rel=1e-12)


def test_auc_matches_mannwhitneyu_with_ties():
    rng = np.random.default_rng(5)
    xb = rng.integers(0, 5, (11, 4)).astype(float)
    xr = rng.integers(0, 5, (8, 4)).astype(float)
    a = qs.auc(xb, xr)
    for c in range(4):
        u = sps.mannwhitneyu(xb[:, c], xr[:, c], alternative="two-sided").statistic
        assert a[c] == pytest.approx(u / (11 * 8), rel=1e-12)
    # brute force P(b > r) + P(b = r) / 2
    c = 0
    pairs = [(1.0 if b > r else 0.5 if b == r else 0.0) for b in xb[:, c] for r in xr[:, c]]
    assert a[c] == pytest.approx(sum(pairs) / len(pairs))


def test_welch_t_matches_scipy():
    rng = np.random.default_rng(6)
    xb, xr = rng.normal(size=(7, 3)), rng.normal(size=(10, 3))
    np.testing.assert_allclose(qs.welch_t(xb, xr), welch_stat(xb, xr, 0), rtol=1e-12)


# ---------------------------------------------------- cells and disruption
def test_distinct_cell_counts_gqa_and_mha():
    layers, heads = list(range(30)), list(range(9))
    kv = [h // 3 for h in heads]
    cells = qs.distinct_cells(layers, heads, kv)
    assert len(cells) == 720 == qs.n_distinct_cells(30, 9, 3)
    assert cells["block"].value_counts().to_dict() == {"Q": 270, "O": 270, "K": 90, "V": 90}
    k0 = cells[(cells["block"] == "K") & (cells["layer"] == 0)]
    assert k0["kv_group"].tolist() == ["0,1,2", "3,4,5", "6,7,8"]
    assert k0["head"].tolist() == [0, 3, 6] and k0["shared"].all()
    assert len(qs.distinct_cells(layers, heads, None)) == 1080 == qs.n_distinct_cells(30, 9)
    # a subset of heads: groups only hold the selected heads
    sub = qs.distinct_cells([4, 7], [1, 4, 5], [0, 1, 1])
    v = sub[sub["block"] == "V"]
    assert v["kv_group"].tolist() == ["1", "4,5", "1", "4,5"]
    assert v["layer"].tolist() == [4, 4, 7, 7]
    assert v["name"].tolist() == ["V/L4/KV0", "V/L4/KV1", "V/L7/KV0", "V/L7/KV1"]


def test_gather_rejects_unequal_kv_columns():
    rng = np.random.default_rng(0)
    kv = [0, 0, 1, 1]
    scores = make_scores(rng, 3, 4, 2, kv)
    cells = qs.distinct_cells([0, 1], range(4), kv)
    cube = qs.gather_cells(scores, cells)
    assert cube.shape == (3, 4, 24)
    scores["K"][0, 0, 1, 1] += 1.0
    with pytest.raises(ValueError, match="kv group K/L1/KV0"):
        qs.gather_cells(scores, cells)


def test_disruption_and_share_match_loops():
    rng = np.random.default_rng(8)
    layers, heads, kv = [2, 5], [0, 1, 2, 3], [0, 0, 1, 1]
    n_a, n_j = 4, 5
    scores = make_scores(rng, n_a, n_j, 2, kv)
    cells = qs.distinct_cells(layers, heads, kv)
    s = qs.disruption(qs.gather_cells(scores, cells))
    share = qs.normalise(s, "share")
    norms = rng.uniform(1, 2, n_j)
    l2 = qs.normalise(s, "l2", norms)
    # brute force
    distinct = []
    for b in "QKVO":
        for lp in range(2):
            if b in "KV":
                for g in (0, 1):
                    distinct.append((b, lp, 2 * g))
            else:
                for hp in range(4):
                    distinct.append((b, lp, hp))
    for j in range(n_j):
        raw = []
        for (b, lp, hp) in distinct:
            tot = 0.0
            for i in range(n_a):
                tot += scores[b][i, j, lp, hp]
            raw.append(tot / n_a)
        total = sum(raw)
        for c, val in enumerate(raw):
            assert s[j, c] == pytest.approx(val, rel=1e-12)
            assert share[j, c] == pytest.approx(val / total, rel=1e-12)
            assert l2[j, c] == pytest.approx(val / norms[j], rel=1e-12)
    np.testing.assert_allclose(share.sum(axis=1), 1.0)


def test_broadcast_to_heads_repeats_kv_groups():
    cells = qs.distinct_cells([0], [0, 1, 2, 3], [0, 0, 1, 1])
    vals = np.arange(len(cells), dtype=float)
    k = qs.broadcast_to_heads(vals, cells, "K", 1, 4)
    kidx = np.flatnonzero(cells["block"] == "K")
    np.testing.assert_array_equal(k[0], [vals[kidx[0]]] * 2 + [vals[kidx[1]]] * 2)


def test_gather_and_broadcast_match_loops_over_the_cells():
    """gather_cells (the whole-block view when every head is taken in order, a gather
    otherwise) and broadcast_to_heads (leading axes kept) against loops over the table."""
    rng = np.random.default_rng(5)
    for layers, heads, kv in [([0, 1, 2], [0, 1, 2, 3], None),           # MHA, all in order
                              ([3, 1], [2, 0, 3], None),                  # a reordered subset
                              ([0, 1], [0, 1, 2, 3], [0, 0, 1, 1])]:      # GQA
        scores = make_scores(rng, 2, 3, len(layers), kv or list(range(len(heads))))
        cells = qs.distinct_cells(layers, heads, kv)
        cube = qs.gather_cells(scores, cells)
        for c, row in enumerate(cells.itertuples()):
            np.testing.assert_array_equal(cube[..., c],
                                          scores[row.block][..., row.layer_pos, row.head_pos])
        vals = rng.normal(size=(2, len(cells)))
        for b in "QKVO":
            grid = qs.broadcast_to_heads(vals, cells, b, len(layers), len(heads))
            want = np.full((2, len(layers), len(heads)), np.nan)
            for c, row in enumerate(cells.itertuples()):
                if row.block == b:
                    for hp in row.head_positions:
                        want[:, row.layer_pos, hp] = vals[:, c]
            np.testing.assert_array_equal(grid, want)


@pytest.mark.parametrize("norm", ["share", "l2", "none"])
def test_bootstrap_draws_equal_a_loop_over_resamples_at_any_batch_size(norm):
    """Each draw of stratified_bootstrap equals the statistic recomputed in float64 on the
    resampled samples themselves (i shared by both groups, B and R apart), for the weights
    drawn in the documented order, under each normalisation (signed scores for the shares);
    and the draws do not depend on the batch size."""
    rng = np.random.default_rng(6)
    n_a, n_b, n_r, m, n_boot = 5, 4, 6, 7, 9
    cb, cr = rng.gamma(2.0, 1.0, (n_a, n_b, m)), rng.gamma(2.0, 1.0, (n_a, n_r, m))
    if norm == "share":
        cb[:, :, 0] *= -1.0
    g_b, g_r = rng.uniform(0.5, 2.0, n_b), rng.uniform(0.5, 2.0, n_r)
    norms = dict(norms_b=g_b, norms_r=g_r) if norm == "l2" else {}
    draws = [qs.stratified_bootstrap(cb, cr, n_bootstrap=n_boot, seed=3, batch_size=size,
                                     disruption_norm=norm, **norms)
             for size in (None, 1, 4, 100)]
    w = np.random.default_rng(3)
    w_i, w_b, w_r = (qs.bootstrap_weights(w, n, n_boot) for n in (n_a, n_b, n_r))
    for d in range(n_boot):
        i, jb, jr = (np.repeat(np.arange(len(x)), np.rint(x * len(x)).astype(int))
                     for x in (w_i[d], w_b[d], w_r[d]))
        s_b, s_r = cb[i].mean(axis=0), cr[i].mean(axis=0)        # [n_b, m], [n_r, m]
        if norm == "share":
            share_b = s_b / np.abs(s_b).sum(axis=1, keepdims=True)
            share_r = s_r / np.abs(s_r).sum(axis=1, keepdims=True)
        elif norm == "l2":
            share_b, share_r = s_b / g_b[:, None], s_r / g_r[:, None]
        else:
            share_b, share_r = s_b, s_r
        want = share_b[jb].mean(axis=0) - share_r[jr].mean(axis=0)
        for got in draws:
            np.testing.assert_allclose(got.mean_diff[d], want, rtol=1e-12)
            np.testing.assert_allclose(got.avg_b[d], s_b[jb].mean(axis=0), rtol=1e-12)


# ------------------------------------------------------------ calibration
def _null_runs(design, statistic, runs, m=3, n_perm=199, seed=123):
    """p-values [runs, m] and 'any q <= 0.05' per run on synthetic disruption matrices."""
    ps = np.empty((runs, m))
    anyq = np.zeros(runs, dtype=bool)
    for r, child in enumerate(np.random.SeedSequence(seed).spawn(runs)):
        rng = np.random.default_rng(child)
        if design == "exchangeable":
            xb = rng.gamma(2.0, 1.0, (20, m))
            xr = rng.gamma(2.0, 1.0, (30, m))
        else:  # equal means, unequal variances and sizes (B: 2x the sd, 1/3 the size)
            xb = rng.normal(0.0, 2.0, (100, m))
            xr = rng.normal(0.0, 1.0, (300, m))
        res = qs.permutation_test_matrix(xb, xr, statistic=statistic,
                                         n_permutations=n_perm, seed=rng)
        ps[r] = res.pvalue
        anyq[r] = np.any(qs.bh_qvalues(res.pvalue) <= 0.05)
    return ps, anyq


@pytest.mark.parametrize("design", ["exchangeable", "unequal_variances"])
def test_calibration_per_cell_and_familywise(design):
    # Welch's t is only asymptotically pivotal: its permutation null ignores the Welch
    # degrees of freedom, an excess that shrinks with n (P(p <= 0.01) = 0.014 at n_B = 48,
    # n_R = 144, 0.011 at 100 / 300 over 4000 runs; docs/statistics.md). The design below
    # is the larger one.
    runs = 1000
    ps, anyq = _null_runs(design, "welch", runs, m=3 if design == "exchangeable" else 2)
    for t in (0.01, 0.05, 0.1):
        se = math.sqrt(t * (1 - t) / runs)
        rate = (ps <= t).mean(axis=0)  # per cell, across independent runs
        assert np.all(rate <= t + 2 * se), (t, rate)
    se = math.sqrt(0.05 * 0.95 / runs)
    assert anyq.mean() <= 0.05 + 2 * se, anyq.mean()


def test_plain_mean_difference_fails_under_unequal_variances():
    # why the statistic is studentised: the same design breaks the unstudentised test
    ps, _ = _null_runs("unequal_variances", "mean_diff", 300)
    assert (ps <= 0.05).mean() > 0.08


# ------------------------------------------------------------------ power
def test_power_and_fdr_on_planted_cells():
    # two-sided p-values (the default) cost power: 0.945 per planted cell one-sided, 0.90-0.92
    # two-sided at N = 800 or 4000 (N = 800 leaves the two-sided p too coarse for 0.9)
    runs, m, planted, delta = 200, 20, [3, 11], 1.0
    found = np.zeros(m)
    fdp = np.empty(runs)
    for r, child in enumerate(np.random.SeedSequence(5).spawn(runs)):
        rng = np.random.default_rng(child)
        xb = rng.normal(0.0, 1.0, (40, m))
        xr = rng.normal(0.0, 1.0, (40, m))
        xb[:, planted] += delta  # Cohen's d = 1
        st = QKOVStatistics(n_permutations=4000, n_bootstrap=0, seed=child)
        sig = st.test_disruption(xb, xr)["cells"]["significant"].to_numpy()
        found += sig
        false = np.delete(sig, planted).sum()
        fdp[r] = false / max(sig.sum(), 1)
    assert np.all(found[planted] / runs >= 0.9), found[planted] / runs
    assert fdp.mean() <= 0.05 + 2 * fdp.std(ddof=1) / math.sqrt(runs), fdp.mean()


def test_signed_variant_uses_lower_tail():
    rng = np.random.default_rng(9)
    kv = [0, 0, 1, 1]
    sb = {b: rng.normal(0.0, 1.0, (6, 25, 2, 4)) for b in "QO"}
    sr = {b: rng.normal(0.0, 1.0, (6, 25, 2, 4)) for b in "QO"}
    sb["Q"][:, :, 1, 2] -= 2.0  # conflict: negative signed score on Q/L1/H2
    out = QKOVStatistics(n_permutations=2000, n_bootstrap=0).test_scores(
        sb, sr, [0, 1], [0, 1, 2, 3], kv, variant="signed")
    assert out["summary"]["tail"] == "lower"
    t = out["cells"]
    hit = t[(t["block"] == "Q") & (t["layer"] == 1) & (t["head"] == 2)].iloc[0]
    assert hit["significant"] and hit["effect_size"] < 0 and hit["statistic"] < 0
    assert [(c["layer"], c["head"]) for c in out["fdr_corrected"]["Q"]] == [(1, 2)]


# ----------------------------------------------------------- localisation
def _scaled_scores(rng, a, n_j, scale, kv, n_layers=2, planted=None):
    """M_ij,c = a_i * w_j * u_ijc: task-A factor a_i (shared by B and R), per-sample
    gradient scale w_j, the whole of B scaled by `scale`."""
    base = make_scores(rng, len(a), n_j, n_layers, kv)
    a = np.asarray(a)[:, None, None, None]
    w = rng.lognormal(0.0, 0.3, n_j)[None, :, None, None]
    out = {b: v * a * w * scale for b, v in base.items()}
    if planted is not None:
        out[planted[0]][:, :, planted[1], planted[2]] *= planted[3]
    return out


def test_constant_factor_flags_no_cell_with_share():
    kv = [0, 0, 1, 1]
    runs = 20
    any_share = any_none = 0
    ratios = []
    for r, child in enumerate(np.random.SeedSequence(21).spawn(runs)):
        rng = np.random.default_rng(child)
        a = rng.gamma(5.0, 0.2, 8)
        sb = _scaled_scores(rng, a, 30, 1.5, kv)
        sr = _scaled_scores(rng, a, 30, 1.0, kv)
        share = QKOVStatistics(n_permutations=1000, n_bootstrap=0, seed=r).test_scores(
            sb, sr, [0, 1], [0, 1, 2, 3], kv)
        raw = QKOVStatistics(n_permutations=1000, n_bootstrap=0, seed=r,
                             disruption_norm="none").test_scores(sb, sr, [0, 1], [0, 1, 2, 3],
                                                                 kv)
        any_share += share["summary"]["n_significant"] > 0
        any_none += raw["summary"]["n_significant"] > 0
        ratios.append(share["summary"]["global"]["ratio"])
        assert share["summary"]["global"]["p_value"] < 0.05
    assert any_share / runs <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / runs)
    assert any_none == runs  # raw disruption flags cells without any localised effect
    assert np.mean(ratios) == pytest.approx(1.5, rel=0.1)


def test_planted_load_found_with_share():
    kv = [0, 0, 1, 1]
    rng = np.random.default_rng(3)
    a = rng.gamma(5.0, 0.2, 8)
    sb = _scaled_scores(rng, a, 30, 1.5, kv, planted=("V", 1, 2, 1.6))
    sb["V"][:, :, 1, 3] = sb["V"][:, :, 1, 2]  # same kv group
    sr = _scaled_scores(rng, a, 30, 1.0, kv)
    out = QKOVStatistics(n_permutations=2000, n_bootstrap=200).test_scores(
        sb, sr, [0, 1], [0, 1, 2, 3], kv)
    v = out["fdr_corrected"]["V"]
    assert [(c["layer"], c["kv_head"], c["kv_group"], c["heads"]) for c in v] == \
        [(1, 1, "2,3", [2, 3])]
    assert out["summary"]["n_significant"] == 1
    c = v[0]
    assert c["ci_low"] <= c["mean_diff"] <= c["ci_high"]
    assert c["ci_low_by"] < c["ci_low"] and c["ci_high_by"] > c["ci_high"]


# --------------------------------------------------------------- bootstrap
def test_bootstrap_coverage_near_nominal():
    runs, n_a, n_b, n_r, level = 300, 15, 20, 25, 0.9
    mu_b = np.array([1.0, 1.5, 2.0])
    mu_r = np.ones(3)
    cov_d = np.zeros(3)
    cov_a = np.zeros(3)
    for child in np.random.SeedSequence(3).spawn(runs):
        rng = np.random.default_rng(child)
        a = rng.gamma(4.0, 0.25, n_a)  # E[a] = 1: E[s_jc] = mu_c
        cb = a[:, None, None] * rng.gamma(4.0, mu_b / 4, (n_b, 3))[None]
        cr = a[:, None, None] * rng.gamma(4.0, mu_r / 4, (n_r, 3))[None]
        d = qs.stratified_bootstrap(cb, cr, n_bootstrap=400, disruption_norm="none",
                                    seed=rng)
        lo, hi = qs.percentile_interval(d.mean_diff, level)
        cov_d += (lo <= mu_b - mu_r) & (mu_b - mu_r <= hi)
        lo, hi = qs.percentile_interval(d.avg_b, level)
        cov_a += (lo <= mu_b) & (mu_b <= hi)
    tol = 3 * math.sqrt(level * (1 - level) / runs) + 0.02
    assert np.all(np.abs(cov_d / runs - level) <= tol), cov_d / runs
    assert np.all(np.abs(cov_a / runs - level) <= tol), cov_a / runs


def test_bootstrap_shares_i_between_groups():
    # additive scores M_ijc = a_i + u_jc: with one disruptor per group the j-resampling is
    # trivial and a_i cancels from the difference only if both groups use the SAME
    # resample of i, so every draw must equal u_B - u_R
    rng = np.random.default_rng(0)
    a = rng.gamma(2.0, 1.0, 12)
    u_b, u_r = rng.gamma(2.0, 1.0, (1, 3)), rng.gamma(2.0, 1.0, (1, 3))
    cb = a[:, None, None] + u_b[None]
    cr = a[:, None, None] + u_r[None]
    d = qs.stratified_bootstrap(cb, cr, n_bootstrap=50, disruption_norm="none", seed=1)
    np.testing.assert_allclose(d.mean_diff, np.broadcast_to(u_b - u_r, (50, 3)), rtol=1e-12)
    assert np.std(d.avg_b[:, 0]) > 0  # while the mean score of B does vary with i


def test_layer_head_avg_intervals_broadcast_over_groups():
    rng = np.random.default_rng(2)
    kv = [0, 0, 1, 1]
    sb = make_scores(rng, 6, 10, 2, kv)
    sr = make_scores(rng, 6, 10, 2, kv)
    out = QKOVStatistics(n_permutations=1000, n_bootstrap=200).test_scores(
        sb, sr, [0, 1], [0, 1, 2, 3], kv)
    lha = out["layer_head_avg"]
    for b in "QKVO":
        est, lo, hi = lha[b]["estimate"], lha[b]["ci_low"], lha[b]["ci_high"]
        np.testing.assert_allclose(est, sb[b].mean(axis=(0, 1)))
        assert est.shape == lo.shape == hi.shape == (2, 4)
        assert np.all(lo <= est) and np.all(est <= hi)
    np.testing.assert_array_equal(lha["K"]["ci_low"][:, 0], lha["K"]["ci_low"][:, 1])


# ---------------------------------------------------------- results shape
def test_results_table_columns_and_summary():
    rng = np.random.default_rng(4)
    kv = [0, 0, 1, 1]
    sb = make_scores(rng, 5, 12, 3, kv)
    sr = make_scores(rng, 5, 14, 3, kv)
    out = qs.test_scores(sb, sr, [0, 1, 2], [0, 1, 2, 3], kv, n_permutations=3000,
                         n_bootstrap=100, seed=3)
    t = out["cells"]
    assert isinstance(t, pd.DataFrame) and len(t) == 3 * (4 + 2 + 2 + 4)
    for col in ["block", "layer", "head", "kv_head", "kv_group", "statistic", "p_value",
                "q_value", "effect_size", "auc", "null_mean", "null_sd", "ci_low",
                "ci_high", "ci_low_by", "ci_high_by", "significant", "q_significant"]:
        assert col in t.columns
    s = out["summary"]
    for key in ("n_q_significant", "n_significant", "n_permutations", "seed", "test", "tail",
                "global", "n_cells", "warnings"):
        assert key in s
    assert s["n_cells"] == 36 and s["n_b"] == 12 and s["n_r"] == 14 and s["n_a"] == 5
    assert set(out["fdr_corrected"]) == set("QKVO")
    assert out["settings"]["n_permutations"] == 3000
    assert np.all((t["p_value"] > 0) & (t["p_value"] <= 1) & (t["q_value"] <= 1))
    assert np.all(t["q_value"] >= t["p_value"])
    # deterministic given the seed
    again = qs.test_scores(sb, sr, [0, 1, 2], [0, 1, 2, 3], kv, n_permutations=3000,
                           n_bootstrap=100, seed=3)
    pd.testing.assert_frame_equal(t, again["cells"])


def test_seed_sequence_seed_is_reproducible_across_calls():
    rng = np.random.default_rng(1)
    kv = [0, 0, 1, 1]
    sb, sr = make_scores(rng, 4, 9, 2, kv), make_scores(rng, 4, 9, 2, kv)
    st = QKOVStatistics(n_permutations=1000, n_bootstrap=50,
                        seed=np.random.SeedSequence(99).spawn(1)[0])
    first = st.test_scores(sb, sr, [0, 1], [0, 1, 2, 3], kv)["cells"]
    second = st.test_scores(sb, sr, [0, 1], [0, 1, 2, 3], kv)["cells"]
    pd.testing.assert_frame_equal(first, second)


def test_exact_enumeration_small_groups():
    rng = np.random.default_rng(0)
    xb, xr = rng.normal(1, 1, (4, 3)), rng.normal(0, 1, (4, 3))
    with pytest.warns(PermutationResolutionWarning, match="exact test"):
        out = QKOVStatistics(n_permutations=1000, n_bootstrap=0).test_disruption(xb, xr)
    assert out["summary"]["exact"] and out["summary"]["n_permutations"] == 70
    p = out["cells"]["p_value"].to_numpy()
    np.testing.assert_allclose(p * 70, np.round(p * 70))


def test_default_n_permutations_and_warning():
    assert qs.default_n_permutations(720, 0.05) == 28_800
    assert qs.default_n_permutations(10, 0.05) == 10_000
    assert QKOVStatistics().n_permutations is None
    rng = np.random.default_rng(0)
    xb, xr = rng.normal(size=(10, 720)), rng.normal(size=(10, 720))
    with pytest.warns(PermutationResolutionWarning, match="cannot reject fewer than 15 cells"):
        out = QKOVStatistics(fdr_alpha=0.05, n_permutations=1000, n_bootstrap=1000,
                             min_effect_size=0.2).test_disruption(xb, xr)
    assert out["summary"]["min_bh_rejections"] == 15
    assert out["summary"]["min_pvalue"] == pytest.approx(1 / 1001)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PermutationResolutionWarning)
        QKOVStatistics(n_permutations=28_800, n_bootstrap=0).test_disruption(xb[:, :20],
                                                                            xr[:, :20])


def test_progress_bar_runs(capsys):
    rng = np.random.default_rng(0)
    out = QKOVStatistics(n_permutations=300, n_bootstrap=0, progress=True,
                         batch_size=100).test_disruption(rng.normal(size=(9, 3)),
                                                         rng.normal(size=(9, 3)))
    assert out["summary"]["n_permutations"] == 300


# ------------------------------------------------------------------ errors
def test_input_errors():
    rng = np.random.default_rng(0)
    kv = [0, 0, 1, 1]
    sb = make_scores(rng, 4, 6, 2, kv)
    sr = make_scores(rng, 4, 7, 2, kv)
    st = QKOVStatistics(n_permutations=200, n_bootstrap=0)
    layers, heads = [0, 1], [0, 1, 2, 3]
    with pytest.raises(ValueError, match="expected \\[n_a, n_j, 2, 5\\]"):
        st.test_scores(sb, sr, layers, [0, 1, 2, 3, 4], kv + [1])
    bad = dict(sr, Q=sr["Q"][:3])
    with pytest.raises(ValueError, match="differ|same task-A"):
        st.test_scores(sb, bad, layers, heads, kv)
    with pytest.raises(ValueError, match="lacks blocks"):
        st.test_scores(sb, {k: v for k, v in sr.items() if k != "O"}, layers, heads, kv)
    nan = dict(sb, O=sb["O"].copy())
    nan["O"][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="missing data"):
        st.test_scores(nan, sr, layers, heads, kv)
    with pytest.raises(ValueError, match="share 1 sample id"):
        st.test_scores(sb, sr, layers, heads, kv, ids_b=list("abcdef"),
                       ids_r=list("fghijkl"))
    with pytest.raises(ValueError, match="norms"):
        QKOVStatistics(disruption_norm="l2", n_bootstrap=0).test_scores(sb, sr, layers,
                                                                        heads, kv)
    with pytest.raises(ValueError, match="unknown variant"):
        st.test_scores(sb, sr, layers, heads, kv, variant="abs")
    with pytest.raises(ValueError, match="kv_head_of"):
        st.test_scores(sb, sr, layers, heads, [0, 1])
    zero = {k: v.copy() for k, v in sb.items()}
    for v in zero.values():
        v[:, 2] = 0.0
    with pytest.raises(ValueError, match="zero total disruption"):
        st.test_scores(zero, sr, layers, heads, kv, ids_b=list("abcdef"))
    with pytest.raises(ValueError, match="at least 2"):
        qs.permutation_test_matrix(np.ones((1, 2)), np.ones((3, 2)))
    for kw in (dict(fdr_alpha=1.5), dict(statistic="t"), dict(disruption_norm="max"),
               dict(fdr_family="layer"), dict(n_permutations=0)):
        with pytest.raises(ValueError):
            QKOVStatistics(**kw)


# ------------------------------------------------------- test_heatmap API
class _Backlink:
    def __init__(self, collector):
        self.collector = collector


class FakeGradientManager(_Backlink):
    def __init__(self, collector):
        super().__init__(collector)
        self.calls = []

    def grad_norms(self, task, ids):
        self.calls.append((task, tuple(ids)))
        return np.array([np.sqrt(sum(float((g ** 2).sum()) for g in
                                     self.collector.grads[(task, i)].values())) for i in ids])


class FakeCollector:
    """Duck-typed FisherCollector: per-sample gradients per block [L, slots, P]."""

    def __init__(self, token, grads, roles):
        self.token = token
        self.grads = grads          # (task, id) -> {block: [L, slots, P]}
        self.roles = roles          # (task, role) -> [ids]
        self.contribution_cache = _Backlink(self)
        self.gradient_manager = FakeGradientManager(self)
        self.fisher = _Backlink(self)

    def sample_ids(self, task, role):
        return sorted(self.roles.get((task, role), []))


class FakeMetric:
    def __init__(self, collector, kv_head_of, gj_norm="none"):
        self.fisher_collector = collector
        self.kv_head_of = kv_head_of
        self.gj_norm = gj_norm
        self.fisher_calls = []

    def pair_scores(self, task_a, ids_a, task_j, ids_j, layers, heads, fisher_tasks=None):
        self.fisher_calls.append(fisher_tasks)
        col = self.fisher_collector
        out = {}
        for b in "QKVO":
            slots = [self.kv_head_of[h] if b in "KV" else h for h in heads]
            ci = np.stack([col.grads[(task_a, i)][b][layers][:, slots] ** 2 for i in ids_a])
            gj = np.stack([np.abs(col.grads[(task_j, j)][b][layers][:, slots]) for j in ids_j])
            out[b] = np.einsum("alhp,blhp->ablh", ci, gj)
        return out

    def compute_heatmap(self, task_a, task_b, layers, heads, variant="qkov"):
        col = self.fisher_collector
        ids_a, ids_b = col.sample_ids(task_a, "scored"), col.sample_ids(task_b, "scored")
        scores = self.pair_scores(task_a, ids_a, task_b, ids_b, layers, heads)
        hm = {b: {"scores": scores[b], "layer_head_avg": scores[b].mean(axis=(0, 1))}
              for b in "QKVO"}
        hm["meta"] = dict(task_a=task_a, task_b=task_b, layers=list(layers),
                          heads=list(heads), kv_head_of=[self.kv_head_of[h] for h in heads],
                          num_kv_heads=max(self.kv_head_of) + 1, variant=variant,
                          sample_ids_a=ids_a, sample_ids_b=ids_b,
                          collector_token=col.token, fisher_tasks=[task_a, task_b])
        return hm


def _fake_setup(token="tok-1", with_reference=True, planted=("Q", 1, 2, 3.0)):
    rng = np.random.default_rng(17)
    n_layers, n_heads, kv_head_of, p = 2, 4, [0, 0, 1, 1], 5
    slots = {"Q": n_heads, "O": n_heads, "K": 2, "V": 2}
    grads, roles = {}, {}

    def add(task, role, n, boost=None):
        ids = [f"{task}-{role}-{k}" for k in range(n)]
        roles[(task, role)] = ids
        for i in ids:
            scale = rng.lognormal(0.0, 0.3)
            g = {b: rng.normal(0.0, 1.0, (n_layers, s, p)) * scale for b, s in slots.items()}
            if boost is not None:
                g[boost[0]][boost[1], boost[2]] *= boost[3]
            grads[(task, i)] = g

    add("math", "scored", 8)
    add("code", "scored", 16, boost=planted)
    if with_reference:
        add("math", "reference", 16)
        add("ctrl", "reference", 16)
    col = FakeCollector(token, grads, roles)
    metric = FakeMetric(col, kv_head_of)
    hm = metric.compute_heatmap("math", "code", [0, 1], [0, 1, 2, 3])
    return col, metric, hm


def test_test_heatmap_seed_call_finds_planted_cell():
    col, metric, hm = _fake_setup()
    stats = QKOVStatistics(fdr_alpha=0.05, n_permutations=1000, n_bootstrap=1000,
                           min_effect_size=0.2)
    results = stats.test_heatmap(hm, col.contribution_cache, col.gradient_manager, col.fisher,
                                 scorer=metric)
    # the reference is scored with the heatmap's Fisher normaliser, not the metric's default
    assert metric.fisher_calls[-1] == ("math", "code")
    sig_q = results["fdr_corrected"]["Q"]
    assert [(c["layer"], c["head"]) for c in sig_q] == [(1, 2)]
    for b in "KVO":
        assert isinstance(results["fdr_corrected"][b], list)
    c = sig_q[0]
    for key in ("statistic", "p_value", "q_value", "effect_size", "auc", "ci_low", "ci_high"):
        assert np.isfinite(c[key])
    s = results["summary"]
    assert s["reference"] == "within_task" and s["reference_task"] == "math"
    assert s["n_cells"] == 2 * (4 + 2 + 2 + 4) and s["n_r"] == 16 and s["n_b"] == 16
    assert s["task_a"] == "math" and s["task_b"] == "code"


def test_test_heatmap_control_task_and_l2_uses_grads():
    col, metric, hm = _fake_setup()
    stats = QKOVStatistics(n_permutations=1000, n_bootstrap=0, disruption_norm="l2")
    res = stats.test_heatmap(hm, col.contribution_cache, col.gradient_manager, col.fisher,
                             reference="ctrl", scorer=metric)
    assert res["summary"]["reference"] == "control:ctrl"
    tasks = [c[0] for c in col.gradient_manager.calls]
    assert tasks == ["code", "ctrl"]
    assert [(c["layer"], c["head"]) for c in res["fdr_corrected"]["Q"]] == [(1, 2)]


def test_test_heatmap_errors():
    col, metric, hm = _fake_setup()
    other, other_metric, _ = _fake_setup(token="tok-2")
    stats = QKOVStatistics(n_permutations=500, n_bootstrap=0)
    with pytest.raises(ValueError, match="contribs does not come from"):
        stats.test_heatmap(hm, other.contribution_cache, col.gradient_manager, col.fisher)
    with pytest.raises(ValueError, match="grads does not come from"):
        stats.test_heatmap(hm, col.contribution_cache, other.gradient_manager, col.fisher)
    with pytest.raises(ValueError, match="fisher does not come from"):
        stats.test_heatmap(hm, col.contribution_cache, col.gradient_manager, other.fisher)
    forged = dict(hm, meta=dict(hm["meta"], collector_token="tok-2"))
    with pytest.raises(ValueError, match="collector_token"):
        stats.test_heatmap(forged, col.contribution_cache, col.gradient_manager, col.fisher)
    with pytest.raises(ValueError, match="role='reference'"):
        stats.test_heatmap(hm, col.contribution_cache, col.gradient_manager, col.fisher,
                           reference="poetry")
    bare, _, hm2 = _fake_setup(with_reference=False)
    with pytest.raises(ValueError, match=r"collect_fisher\(model, batch, task='math', "
                                         r"role='reference'\)"):
        stats.test_heatmap(hm2, bare.contribution_cache, bare.gradient_manager, bare.fisher)
    # a reference sample that is also a scored task-A sample is refused
    col.roles[("math", "reference")] = col.roles[("math", "reference")] + ["math-scored-0"]
    with pytest.raises(ValueError, match="must be disjoint"):
        stats.test_heatmap(hm, col.contribution_cache, col.gradient_manager, col.fisher,
                           scorer=metric)
    # the metric that scores the reference must use the heatmap's collector too
    with pytest.raises(ValueError, match="scorer"):
        stats.test_heatmap(hm, col.contribution_cache, col.gradient_manager, col.fisher,
                           scorer=other_metric)


@pytest.mark.parametrize("signed", [False, True])
def test_conflict_order_puts_cells_significant_the_other_way_last(signed):
    # against a brute-force sort: (the conflict's way first; there by q ascending, then T
    # the farther that way first; the others by q descending, then T nearer zero first;
    # then layer, then position)
    from interference.stats.cells import conflict_order

    rng = np.random.default_rng(3)
    n = 200
    q = rng.choice([1e-4, 0.01, 0.3, 1.0], size=n)
    t = rng.choice([-3.0, -0.5, 0.0, 0.5, 3.0], size=n)
    layer = rng.integers(0, 3, size=n)
    s = -1.0 if signed else 1.0
    got = conflict_order(q, s * t, signed, then=(layer,))

    def key(i):
        toward = t[i]
        return (0, q[i], -toward, layer[i], i) if toward > 0 else (1, -q[i], -toward, layer[i], i)

    assert list(got) == sorted(range(n), key=key)
    # by q then T alone (the order before): a significant cell of the other way ranks
    # before a less significant conflict
    first_other = min(k for k, i in enumerate(got) if t[i] <= 0)
    assert all(t[i] > 0 for i in got[:first_other]) and all(t[i] <= 0 for i in got[first_other:])
