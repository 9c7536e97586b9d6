"""Counterfactual validation (interference.validation): exactness of the interventions,
the statistics against independent references, and a planted case it must recover."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from interference.architectures import QKOVConfig, QKOVIndexer
from interference.gradients import FisherCollector
from interference.gradients.fisher import TaskFisher
from interference.gradients.objectives import default_objective
from interference.models import tiny_model
from interference.scores import QKOVInterferenceMetric
from interference.stats import QKOVStatistics
from interference.validation import (Cell, CellParams, FinetuneSettings, StepRule,
                                     ValidationSettings, compare_arms, distinct_cells, finetune,
                                     precision_at_k, precision_curve, validate_map,
                                     validity_table)
from interference.validation.intervention import arm_sets
from interference.validation.losses import mean_loss_gradient, sample_losses
from interference.validation.validity import _rho_rows


def _model(layers=2, seed=0):
    torch.manual_seed(seed)
    return tiny_model("llama", vocab_size=128, seed=seed, num_hidden_layers=layers).eval()


def _batch(n, t, seed, prefix, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    lengths = torch.randint(t // 2, t + 1, (n,), generator=g)
    for k, n_k in enumerate(lengths):
        mask[k, n_k:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "sample_ids": [f"{prefix}:{k}" for k in range(n)]}


def _spec_slice(model, cfg: QKOVConfig, cell: Cell) -> dict[str, set[int]]:
    """S(c) from SPEC section 2 written out for the LLaMA layout: rows of q/k/v_proj,
    columns of o_proj (flat indices into each weight)."""
    attn = model.model.layers[cell.layer].self_attn
    if cell.block == "O":
        w = attn.o_proj.weight                       # [d, H·d_v]
        cols = range(cell.head * cfg.v_head_dim, (cell.head + 1) * cfg.v_head_dim)
        idx = {r * w.shape[1] + c for r in range(w.shape[0]) for c in cols}
        return {f"model.layers.{cell.layer}.self_attn.o_proj.weight": idx}
    proj = {"Q": "q_proj", "K": "k_proj", "V": "v_proj"}[cell.block]
    w = getattr(attn, proj).weight
    d = cfg.head_dim if cell.block != "V" else cfg.v_head_dim
    rows = range(cell.head * d, (cell.head + 1) * d)
    return {f"model.layers.{cell.layer}.self_attn.{proj}.weight":
            {r * w.shape[1] + c for r in rows for c in range(w.shape[1])}}


def test_cells_are_the_spec_slices_and_read_matches_the_indexer():
    model = _model()
    indexer = QKOVIndexer(model)
    params = CellParams(model, indexer)
    cells = distinct_cells(indexer)
    cfg = indexer.config
    assert len(cells) == 2 * (4 + 2 + 2 + 4)          # Q and O per query head, K/V per kv head
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    for cell in cells:
        got = {n: set(i.tolist()) for n, i in params.parts(cell)}
        assert got == _spec_slice(model, cfg, cell), cell.name
        row = indexer.gather(tensors, cell.layer, cell.block)[cell.head].reshape(-1)
        assert torch.equal(params.read(cell), row.float())


def test_a_restricted_step_changes_only_its_cell_and_is_undone_bitwise():
    model = _model()
    params = CellParams(model, QKOVIndexer(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for cell in [Cell("Q", 1, 3), Cell("K", 0, 1), Cell("V", 1, 0), Cell("O", 0, 2)]:
        inside = {n: i for n, i in params.parts(cell)}
        delta = torch.randn(params.size(cell))
        with params.shifted(cell, delta):
            for n, p in model.named_parameters():
                changed = (p.detach() != before[n]).reshape(-1).nonzero().reshape(-1)
                if n in inside:
                    assert set(changed.tolist()) <= set(inside[n].tolist())
                    assert len(changed) > 0.9 * inside[n].numel()
                else:
                    assert len(changed) == 0, (cell.name, n)
            np.testing.assert_allclose(params.read(cell) - before_read(before, params, cell),
                                       delta.numpy(), rtol=1e-5, atol=1e-6)
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), before[n]), (cell.name, n)


def before_read(before, params, cell):
    return torch.cat([before[n].reshape(-1)[i].float() for n, i in params.parts(cell)])


def test_step_rules():
    theta, g, sq = torch.randn(50), torch.randn(50), torch.rand(50) + 0.1
    rel = StepRule("relative", relative=0.05).step(theta, g, sq)
    assert math.isclose(float(rel.norm()), 0.05 * float(theta.norm()), rel_tol=1e-5)
    assert float(torch.dot(rel, g)) < 0                     # a descent step for B
    adam = StepRule("adam", lr=1e-3, steps=10, eps=1e-8).step(theta, g, sq)
    np.testing.assert_allclose(adam.numpy(), (-1e-2 * g / (sq.sqrt() + 1e-8)).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="step rule"):
        StepRule("sgd")


def test_sample_losses_equal_single_sample_losses():
    model = _model()
    obj = default_objective(model)
    batch = _batch(5, 12, 1, "a")
    batched = sample_losses(model, obj, batch, micro_batch=3)
    single = torch.stack([obj.loss(model, s) for s in obj.split(batch)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    # the gradient of the mean loss, against autograd on the single-sample losses
    names = [n for n, _ in model.named_parameters() if "q_proj" in n]
    grads = mean_loss_gradient(model, obj, batch, names, micro_batch=2)
    ref = torch.autograd.grad(torch.stack([obj.loss(model, s) for s in obj.split(batch)]).mean(),
                              [dict(model.named_parameters())[n] for n in names])
    for n, r in zip(names, ref):
        torch.testing.assert_close(grads[n], r, rtol=1e-4, atol=1e-6)


def test_frozen_cells_stay_bitwise_through_finetuning():
    model = _model()
    params = CellParams(model, QKOVIndexer(model))
    frozen = [Cell("Q", 0, 1), Cell("K", 1, 0), Cell("O", 1, 3)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved = params.save(frozen)
    losses = finetune(model, default_objective(model), _batch(8, 10, 2, "b"), params, frozen,
                      FinetuneSettings(steps=4, lr=1e-2, batch_size=4, weight_decay=0.1),
                      seed=0)
    assert len(losses) == 4
    for cell, values in saved.items():
        for (name, idx), v in zip(params.parts(cell), values):
            assert torch.equal(params.params[name].detach().reshape(-1)[idx], v), cell.name
    attn = set(params.indexer.param_names)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == attn                    # attention trained, nothing else touched
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_runs_fine_tuned_together_equal_runs_one_at_a_time(family):
    """ensemble.finetune_stacked: R runs in one batched pass give each run's own weights
    (float rounding), frozen entries bitwise at their start values; Linear and Conv1D."""
    from interference.validation.ensemble import finetune_stacked, stackable
    from interference.validation.intervention import _order, trainable_names

    torch.manual_seed(0)
    model = tiny_model(family, vocab_size=128, seed=0, num_hidden_layers=2).eval()
    obj = default_objective(model)
    params = CellParams(model, QKOVIndexer(model))
    settings = FinetuneSettings(steps=3, lr=1e-2, batch_size=4, weight_decay=0.1)
    names = trainable_names(model, params, settings)
    assert stackable(model, obj, names)
    cells = distinct_cells(params.indexer)
    frozen_sets = [[], cells[:3], cells[-4:]]
    seeds = [0, 1, 2]
    train = _batch(8, 10, 2, "b")
    start = {n: params.params[n].detach().clone() for n in names}
    together = finetune_stacked(model, obj, train, params, frozen_sets,
                                [_order(8, 3, 4, s) for s in seeds], names, settings)
    for n in names:                                   # the model itself is unchanged
        assert torch.equal(params.params[n].detach(), start[n])
    for r, (frozen, seed) in enumerate(zip(frozen_sets, seeds)):
        finetune(model, obj, train, params, frozen, settings, seed=seed)
        for n in names:
            alone = params.params[n].detach()
            assert r > 0 or not torch.equal(alone, start[n])     # run 0 freezes nothing
            torch.testing.assert_close(together[n][r], alone, rtol=1e-4, atol=2e-5)
        for name, idx in params.merged(frozen).items():
            assert torch.equal(together[name][r].reshape(-1)[idx], start[name].reshape(-1)[idx])
        with torch.no_grad():
            for n in names:
                params.params[n].copy_(start[n])


def test_random_arms_match_the_top_arm_by_block_and_parameter_count():
    model = _model(layers=3)
    params = CellParams(model, QKOVIndexer(model))
    cells = distinct_cells(params.indexer)
    ranked = [cells[k] for k in np.random.default_rng(0).permutation(len(cells))]
    arms = arm_sets(ranked, (0.1, 0.25, 0.5), n_random=4, seed=3)
    for f in (0.1, 0.25, 0.5):
        top = next(c for a, ff, _, c in arms if a == "top" and ff == f)
        blocks = sorted(c.block for c in top)
        for _, _, _, rand in [x for x in arms if x[0] == "random" and x[1] == f]:
            assert sorted(c.block for c in rand) == blocks
            assert len(set(rand)) == len(rand)
            assert sum(params.size(c) for c in rand) == sum(params.size(c) for c in top)
    assert arm_sets(ranked, (0.25,), 2, seed=3) == arm_sets(ranked, (0.25,), 2, seed=3)


def test_random_arms_depend_on_the_ranking_only_through_the_top_arm_s_blocks():
    """Two rankings whose first k cells fall in the same blocks draw the same random cells
    (the pool is in (block, layer, head) order, not the map's)."""
    model = _model(layers=3)
    cells = distinct_cells(QKOVIndexer(model))
    rng = np.random.default_rng(1)
    ranked = [cells[k] for k in rng.permutation(len(cells))]
    k = int(np.ceil(0.25 * len(ranked)))
    # shuffle within the top k and within the rest, then swap a top cell with a cell of
    # its block from the rest: other top cells, in the same blocks
    other = ([ranked[i] for i in rng.permutation(k)]
             + [ranked[k + i] for i in rng.permutation(len(ranked) - k)])
    j = next(i for i in range(k, len(other)) if other[i].block == other[0].block)
    other[0], other[j] = other[j], other[0]
    assert set(other[:k]) != set(ranked[:k])
    draws = [[c for a, _, _, c in arm_sets(r, (0.25,), 3, seed=3) if a == "random"]
             for r in (ranked, other)]
    assert draws[0] == draws[1]
    assert all(sorted(c.block for c in d) == sorted(c.block for c in ranked[:k])
               for d in draws[0])


def test_rho_rows_and_validity_table_against_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 30))
    y = x + rng.normal(size=(7, 30))
    y[:, :5] = y[:, 0:1]                     # ties
    ref = [spearmanr(a, b).statistic for a, b in zip(x, y)]
    np.testing.assert_allclose(_rho_rows(x, y), ref, rtol=1e-12)
    delta = rng.normal(size=(30, 9)) + np.linspace(0, 4, 30)[:, None]
    cand = {"good": np.linspace(0, 1, 30) + rng.normal(scale=0.1, size=30),
            "random": rng.random(30)}
    table = validity_table(cand, delta, fractions=(0.1,), n_bootstrap=300, seed=1)
    for name, s in cand.items():
        row = table.set_index("candidate").loc[name]
        assert math.isclose(row["rho"], spearmanr(s, delta.mean(1)).statistic, rel_tol=1e-12)
        assert math.isclose(row["rho_abs"], spearmanr(s, np.abs(delta.mean(1))).statistic,
                            rel_tol=1e-12)
        assert row["rho_cells_low"] <= row["rho"] <= row["rho_cells_high"]
        assert row["precision@0.1"] == precision_at_k(s, delta.mean(1), 3)
    assert table.set_index("candidate").loc["good", "rho_cells_low"] > 0.5


def test_precision_curve_equals_brute_force():
    rng = np.random.default_rng(2)
    truth, score = rng.normal(size=40), rng.normal(size=40)
    curve = precision_curve({"s": score}, truth)
    brute = [precision_at_k(score, truth, k) for k in range(1, 41)]
    np.testing.assert_allclose(curve["precision"].to_numpy(), brute)


def test_compare_arms_against_brute_force():
    rng = np.random.default_rng(4)
    rows = []
    for seed in (0, 1, 2):
        rows.append({"arm": "top", "fraction": 0.1, "k": 3, "draw": 0, "seed": seed,
                     "forgetting": 0.1 + 0.01 * seed, "learning": 1.0})
        for draw in range(6):
            rows.append({"arm": "random", "fraction": 0.1, "k": 3, "draw": draw, "seed": seed,
                         "forgetting": 0.1 + rng.normal(scale=0.05), "learning": 1.1})
    arms = pd.DataFrame(rows)
    got = compare_arms(arms, "top", n_bootstrap=500).iloc[0]
    top = arms[arms.arm == "top"]["forgetting"].mean()
    by_draw = arms[arms.arm == "random"].groupby("draw")["forgetting"].mean()
    assert math.isclose(got["diff"], top - by_draw.mean(), rel_tol=1e-12)
    assert got["p_value"] == (1 + (by_draw <= top).sum()) / 7
    assert got["diff_low"] <= got["diff"] <= got["diff_high"]
    assert (got["n_random"], got["n_seeds"]) == (6, 3)


def test_the_intervention_figure_draws_each_arm_minus_random_with_its_interval(tmp_path):
    """The right panel's points and bars are compare_arms' diff and interval per k and arm,
    in order of k, and the figure is written."""
    import matplotlib.pyplot as plt

    from interference.figures.validation import _differences, intervention

    rng = np.random.default_rng(5)
    rows = []
    for f, k in ((0.2, 6), (0.1, 3)):
        for seed in (0, 1, 2):
            for arm in ("top", "bottom"):
                rows.append({"arm": arm, "fraction": f, "k": k, "draw": 0, "seed": seed,
                             "forgetting": rng.normal(), "learning": 1.0})
            rows += [{"arm": "random", "fraction": f, "k": k, "draw": d, "seed": seed,
                      "forgetting": rng.normal(), "learning": 1.0} for d in range(4)]
    arms = pd.DataFrame(rows)
    comparison = pd.concat([compare_arms(arms, v, n_bootstrap=200) for v in ("top", "bottom")])
    fig, ax = plt.subplots()
    _differences(ax, comparison)
    drawn = {c.get_label(): c for c in ax.containers}
    for arm in ("top", "bottom"):
        want = comparison[comparison.arm == arm].sort_values("fraction")
        line, _, (bars,) = drawn[f"{arm} - random"]
        np.testing.assert_array_equal(line.get_ydata(), want["diff"])
        ends = np.array([seg[:, 1] for seg in bars.get_segments()])
        np.testing.assert_allclose(ends, want[["diff_low", "diff_high"]].to_numpy())
    plt.close(fig)
    paths = intervention(arms, tmp_path / "arms", "t", comparison)
    assert all(p.stat().st_size > 10_000 for p in paths)


def _canonical_slice(indexer, cell):
    e = indexer.entry(cell.layer, cell.block)
    return slice(e.offset + cell.head * e.size, e.offset + (cell.head + 1) * e.size)


def test_planted_interference_is_recovered_and_a_random_score_is_not():
    """Task B's per-sample gradients are planted: on 8 known cells they point against task
    A's held-out gradient (a step for B hurts A there), elsewhere they are small isotropic
    noise. The measured ΔL_A must single out the planted cells, the map must rank them
    first, and a random score must not. (Planted among V and O cells: in a random-init
    model A's loss barely depends on Q and K, so a conflict planted there would not hurt
    A, and the measurement rightly says so.)"""
    model = _model(layers=3, seed=1)
    objective = default_objective(model)
    col = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=64)
    col.collect_fisher(model, _batch(16, 12, 10, "a:f"), task="a", mode="mean", role="fisher")
    col.collect_fisher(model, _batch(12, 12, 11, "a:s"), task="a", mode="mean", role="scored")
    col.collect_fisher(model, _batch(12, 12, 12, "a:r"), task="a", mode="mean", role="reference")
    eval_a, eval_b = _batch(16, 12, 13, "a:e"), _batch(8, 12, 14, "b:e")
    indexer = col.indexer
    names = indexer.param_names
    g_a = indexer.flatten(mean_loss_gradient(model, objective, eval_a, names))
    cells = distinct_cells(indexer)
    vo = [c for c in cells if c.block in ("V", "O")]
    planted = [vo[k] for k in np.random.default_rng(5).choice(len(vo), 8, replace=False)]
    mean_b = torch.zeros_like(g_a)
    for c in planted:
        s = _canonical_slice(indexer, c)
        mean_b[s] = -g_a[s] / g_a[s].norm() * 0.05
    gen = torch.Generator().manual_seed(6)
    store = col.gradient_manager
    rows = [mean_b + 1e-4 * torch.randn(g_a.shape, generator=gen) for _ in range(28)]
    fisher_b = TaskFisher(indexer.total_size, "mean", 0.99)
    fisher_b.update(torch.stack(rows[:16]).double().square().sum(0), 16,
                    [f"b:f{k}" for k in range(16)])
    col.fisher.tasks["b"] = fisher_b
    for k, r in enumerate(rows[16:]):
        store.add("b", "scored", f"b:s{k}", r)
    metric_settings = {"ridge_lambda_rel": 1e-3}
    metric = QKOVInterferenceMetric(col.config, col, **metric_settings)
    heat = metric.compute_heatmap("a", "b")
    meta = heat["meta"]
    ref = metric.pair_scores("a", meta["sample_ids_a"], "a", col.sample_ids("a", "reference"),
                             meta["layers"], meta["heads"], fisher_tasks=("a", "b"))
    cells_table = QKOVStatistics(n_permutations=2000, n_bootstrap=50).test_scores(
        {b: heat[b]["scores"] for b in "QKVO"}, ref, meta["layers"], meta["heads"],
        meta["kv_head_of"])["cells"]
    settings = ValidationSettings(step_rules=("relative", "adam"), n_bootstrap=300,
                                  intervention=False, finetune=FinetuneSettings(lr=1e-3))
    res = validate_map(model, objective, col, "a", "b", cells_table, metric_settings, eval_a,
                       eval_b, _batch(8, 12, 15, "b:t"), settings, progress=False)
    is_planted = np.array([c in planted for c in cells])
    for rule in ("relative", "adam"):
        cf = res.cells[res.cells.step_rule == rule]
        truth = cf["delta_loss_a"].to_numpy()
        assert truth[is_planted].min() > np.abs(truth[~is_planted]).max(), rule
        val = res.validity[res.validity.step_rule == rule].set_index("candidate")
        assert val.loc["mean_M[qkov]", "rho"] > 0.5, rule
        assert val.loc["mean_M[qkov]", "rho_cells_low"] > 0.2, rule
        assert val.loc["mean_M[qkov]", "precision@0.2"] >= 0.75, rule
        assert abs(val.loc["random", "rho"]) < 0.3, rule
        assert val.loc["random", "rho_cells_low"] < 0 < val.loc["random", "rho_cells_high"], rule
        assert spearmanr(cf["predicted_delta_a"], truth).statistic > 0.9, rule


@pytest.mark.parametrize("bad", [{"step_rules": ("sgd",)}, {"rank_by": "q"},
                                 {"fractions": (0.0,)}, {"max_cells": 1}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        ValidationSettings(**bad)


# ----------------------------------------------------------------------------- workflow

def test_dry_run_validate_experiment_reuses_the_default_stores(tmp_path):
    """`validate` is the default plus the validation: the same data and store keys (so a
    default run's stores are reused), plus eval samples per task, validate and its figures."""
    from conftest import job_counts, run_workflow

    res = run_workflow(tmp_path, "-n", "--config", "experiment=validate", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = job_counts(res.stdout)
    assert (counts["prepare_eval"], counts["validate"], counts["draw_validation"]) == (2, 1, 1)
    default = run_workflow(tmp_path, "-n", timeout=120)
    stores = {line.split("_stores/")[1].split("/")[0] for line in default.stdout.splitlines()
              if "_stores/" in line}
    assert stores and all(f"_stores/{k}/store.json" in res.stdout for k in stores)


def test_tiny_validation_in_the_workflow(tiny_run, tmp_path):
    """The tiny experiment's validation in a copy of the session's tiny run: only the
    validation's jobs (and the map they read) run; its tables, figures and verdict are
    complete and consistent."""
    import json
    import shutil
    import time

    from conftest import run_workflow

    from interference.validation.report import verdict_lines

    work = tmp_path / "w"
    shutil.copytree(tiny_run["work"], work, symlinks=True)
    t0 = time.time()
    res = run_workflow(work, "validation", "--cores", "2", "--config",
                       "experiment=tiny_validate", timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    out = res.stdout + res.stderr
    assert "rule collect" not in out and "rule prepare_data" not in out
    base = work / "results" / "tiny_validate" / "tiny" / "math__code"
    vdir = base / "split0" / "validation"
    bench = (work / "results" / "benchmarks" / "validate" / "tiny_validate" / "tiny"
             / "math__code" / "split0.tsv").read_text().splitlines()[1].split("\t")[0]
    print(f"tiny validation: workflow {time.time() - t0:.0f} s, validate job {bench} s")
    cells = pd.read_csv(vdir / "validation_cells.csv")
    assert sorted(cells["step_rule"].unique()) == ["adam", "relative"]
    assert len(cells) == 2 * 24 and cells.groupby("step_rule")["name"].nunique().eq(24).all()
    assert np.isfinite(cells[["delta_loss_a", "delta_loss_b", "predicted_delta_a"]]).all().all()
    validity = pd.read_csv(vdir / "validity.csv")
    assert {"mean_M[qkov]", "mean_M[signed]", "mean_M[symmetric]", "mean_M[fisher_weighted]",
            "effect_size", "grad_share", "first_order", "overlap", "random"} <= set(
        validity["candidate"])
    arms = pd.read_csv(vdir / "arms.csv")
    for f, g in arms[arms.arm != "none"].groupby("fraction"):
        assert g.groupby("arm")["n_frozen_params"].nunique().eq(1).all()
        assert g["n_frozen_params"].nunique() == 1       # random arms match the top arm
    doc = json.loads((vdir / "validation.json").read_text())
    assert set(doc["verdict"]) == {"relative", "adam", "intervention"}
    assert any("the map" in line for line in verdict_lines("math__code", 0, doc))
    # eval samples: held out from every role of the stores
    evals = [json.loads(p.read_text()) for p in (work / "results" / "_eval").glob("*/manifest.json")]
    assert len(evals) == 2
    for m in evals:
        task = m["meta"]["task_name"]
        eval_ids = set(m["roles"]["eval"]["sample_ids"])
        for store in (work / "results" / "_stores").glob(f"{task}-*/store.json"):
            used = {i for r in json.loads(store.read_text())["roles"].values()
                    for i in r.get("sample_ids", [])}
            assert used and not eval_ids & used
    for name in ("validation_scatter", "validation_precision", "validation_intervention"):
        assert (base / "figures" / f"{name}.png").stat().st_size > 10_000
        assert (base / "figures" / f"{name}.pdf").is_file()
    again = run_workflow(work, "validation", "--cores", "2", "--config",
                         "experiment=tiny_validate", timeout=300)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_skipping_unchanged_blocks_gives_the_same_counterfactuals():
    from interference.validation import measure

    model = _model(layers=3, seed=2)
    objective = default_objective(model)
    params = CellParams(model, QKOVIndexer(model))
    cells = distinct_cells(params.indexer)
    gen = torch.Generator().manual_seed(0)
    g = {c: torch.randn(params.size(c), generator=gen) for c in cells}
    sq = {c: v * v + 0.1 for c, v in g.items()}
    ea, eb = _batch(6, 10, 20, "a"), _batch(5, 10, 21, "b")
    rule = StepRule("relative", relative=0.05)
    fast = measure(model, objective, params, cells, rule, g, sq, ea, eb, 4, False, True)
    slow = measure(model, objective, params, cells, rule, g, sq, ea, eb, 4, False, False)
    np.testing.assert_array_equal(fast.delta_a, slow.delta_a)
    np.testing.assert_array_equal(fast.delta_b, slow.delta_b)
    assert np.abs(fast.delta_a).max() > 0


def test_the_sweep_summary_ranks_variants_by_predictive_validity():
    from interference.figures.sweep import validity_markdown, validity_of

    def vdoc(variant, d, m):
        return {"variant": variant, "verdict": {"adam": {
            "rho": {"effect_size": d, f"mean_M[{variant}]": m, "first_order": 0.9},
            "best_baseline": "first_order", "best_baseline_rho": 0.9}, "intervention": []}}

    a = {"variants": {"qkov": {"validity": validity_of(vdoc("qkov", 0.05, -0.58))},
                      "signed": {"validity": validity_of(vdoc("signed", 0.6, 0.91))},
                      "other": {}}}
    assert a["variants"]["signed"]["validity"]["adam"]["rho_mean_score"] == 0.91
    lines = validity_markdown(a)
    rows = [line for line in lines if line.startswith("| adam")]
    assert [r.split("|")[3].strip() for r in rows] == ["signed", "qkov"]
    assert "first_order (0.90)" in rows[0]
    assert validity_markdown({"variants": {"x": {}}}) == []


@pytest.mark.parametrize("signed", [False, True])
def test_the_map_ranks_conflicts_first_and_cells_significant_the_other_way_last(signed):
    # two-sided q-values: a small q says "significant", the sign of T says which way. The
    # arms' top-k must hold only cells T points the conflict's way (T > 0; T < 0 for the
    # signed variant), the most significant first; the cells most significantly the other
    # way are the map's last (the bottom arm), as a one-sided test ranked them
    from interference.validation.run import _ranked

    s = -1.0 if signed else 1.0
    rows = [  # name: (q, T in the conflict's direction)
        ("conflict_q0_strong", 0.001, 5.0), ("conflict_q0_weak", 0.001, 3.0),
        ("other_q0_strong", 0.001, -6.0), ("conflict_q1", 0.02, 2.5),
        ("other_q1", 0.02, -2.4), ("null_pos", 0.7, 0.3), ("null_neg", 0.7, -0.2),
        ("null_zero", 0.9, 0.0)]
    cells = [Cell("Q", 0, k) for k in range(len(rows))]
    table = pd.DataFrame({"name": [c.name for c in cells],
                          "q_value": [q for _, q, _ in rows],
                          "statistic": [s * t for _, _, t in rows]})
    got = [rows[c.head][0] for c in _ranked(cells, table, np.zeros(len(cells)), "map", signed)]
    assert got == ["conflict_q0_strong", "conflict_q0_weak", "conflict_q1", "null_pos",
                   "null_zero", "null_neg", "other_q1", "other_q0_strong"]
    # the order q then T alone (before the fix) put a cell significant the other way third
    t = table.set_index("name")
    by_q = np.lexsort((-s * t["statistic"].to_numpy(float), t["q_value"].to_numpy(float)))
    assert [rows[k][0] for k in by_q][2] == "other_q0_strong"


@pytest.mark.parametrize("signed", [False, True])
def test_the_map_s_neg_log10_q_is_signed_by_the_direction_of_its_statistic(signed):
    # a two-sided q is direction-blind: a cell significant the other way (code puts a
    # smaller share on it) must score below a null cell, not beside the top conflicts
    from interference.validation.candidates import map_statistics

    s = -1.0 if signed else 1.0
    cells = [Cell("O", 1, k) for k in range(4)]
    table = pd.DataFrame({"name": [c.name for c in cells], "q_value": [0.001, 0.001, 0.5, 1.0],
                          "statistic": [s * 4.0, s * -4.0, s * 0.1, 0.0],
                          "effect_size": [s * 0.8, s * -0.8, s * 0.01, 0.0]})
    got = map_statistics(table, cells, signed)
    np.testing.assert_allclose(got["neg_log10_q"], [3.0, -3.0, math.log10(2.0), 0.0])
    np.testing.assert_allclose(got["statistic"], [4.0, -4.0, 0.1, 0.0])
    np.testing.assert_allclose(got["effect_size"], [0.8, -0.8, 0.01, 0.0])


def test_the_verdict_counts_every_statistic_of_the_map_as_the_map_s():
    # -log10 q is the map's own number: were it the best score, the verdict must say the
    # map predicts best, not count it as a baseline that beats the map
    from interference.validation.run import ValidationResult, verdict

    names = ["mean_M[qkov]", "effect_size", "statistic", "neg_log10_q", "first_order",
             "grad_share", "random"]
    rho = [0.1, 0.2, 0.3, 0.9, 0.5, 0.0, 0.01]
    validity = pd.DataFrame({"candidate": names, "rho": rho, "step_rule": "adam",
                             "rho_cells_low": np.array(rho) - 0.05,
                             "rho_cells_high": np.array(rho) + 0.05, "first_order_rho": 0.5})
    empty = pd.DataFrame()
    got = verdict(ValidationResult(pd.DataFrame(), validity, empty, empty, empty, {}))["adam"]
    assert got["best_map"] == "neg_log10_q" and got["best_baseline"] == "first_order"
    assert got["map_beats_baselines"] is True
