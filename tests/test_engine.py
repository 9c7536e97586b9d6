"""The engine against float64 brute force: gradients, Fisher, slices and every score."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interference.architectures import QKOVConfig, QKOVIndexer
from interference.gradients import FisherCollector
from interference.scores import QKOVInterferenceMetric
from interference.device import triton_available

from conftest import padded_batch, tiny_gpt2, tiny_llama
from reference import brute_grads, brute_scores, fisher_mean

FAMILIES = {
    "gpt2": (tiny_gpt2, {"L": 2, "H": 4, "Hkv": 4, "dk": 8, "dv": 8}),
    "llama": (tiny_llama, {"L": 2, "H": 4, "Hkv": 2, "dk": 12, "dv": 12}),
}


def _collect(model, include_bias=False, memory_mb=100.0):
    cfg = QKOVConfig.from_model(model, include_bias=include_bias)
    fc = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=memory_mb,
                         config=cfg)
    batches = {
        ("math", "fisher"): padded_batch(5, 12, 1, "math:f"),
        ("code", "fisher"): padded_batch(4, 12, 2, "code:f"),
        ("math", "scored"): padded_batch(3, 12, 3, "math:s"),
        ("code", "scored"): padded_batch(4, 11, 4, "code:s"),
    }
    for (task, role), b in batches.items():
        fc.collect_fisher(model, b, task=task, mode="mean", role=role)
    return fc, cfg, batches


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family_run(request):
    family = request.param
    make, dims = FAMILIES[family]
    model = make()
    fc, cfg, batches = _collect(model)
    ref = {k: brute_grads(model, b) for k, b in batches.items()}
    fisher = {t: fisher_mean(ref[(t, "fisher")]) for t in ("math", "code")}
    return family, dims, model, fc, cfg, ref, fisher


# ridge_lambda=1e-14 keeps λ below Î so that the Fisher, not the ridge, shapes D
OPTIONS = [
    {},
    {"ridge_lambda": 1e-14},
    {"ridge_lambda": 1e-14, "variant": "signed"},
    {"ridge_lambda": 1e-14, "variant": "symmetric", "aggregate": "mean"},
    {"ridge_lambda": 1e-14, "variant": "fisher_weighted"},
    {"ridge_lambda": 1e-14, "fisher_source": "a", "gj_norm": "l2"},
    {"ridge_lambda": 1e-14, "fisher_source": "b", "ridge_lambda_rel": 1e-1},
]


def _brute_block(family_run, opts, block):
    """Float64 brute-force scores [n_a, n_b, L, H] of one block under metric options."""
    family, dims, model, fc, cfg, ref, fisher = family_run
    F = {"pooled": {n: (fisher["math"][n] + fisher["code"][n]) / 2 for n in fisher["math"]},
         "a": fisher["math"], "b": fisher["code"]}[opts.get("fisher_source", "pooled")]
    return brute_scores(family, dims, ref[("math", "scored")], ref[("code", "scored")], F,
                        block, list(range(dims["L"])), list(range(dims["H"])),
                        variant=opts.get("variant", "qkov"),
                        aggregate=opts.get("aggregate", "sum"),
                        gj_norm=opts.get("gj_norm", "none"),
                        ridge_lambda_rel=opts.get("ridge_lambda_rel", 0.0),
                        ridge_lambda=opts.get("ridge_lambda", 1e-8), fisher_a=fisher["math"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_heatmap_matches_float64_brute_force(family_run, opts, backend):
    """Both contraction backends (the fused Triton kernel runs in Triton's interpreter on a
    machine without a GPU) against the float64 brute force."""
    family, dims, model, fc, cfg, ref, fisher = family_run
    if backend == "triton" and not triton_available(torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("triton is not installed")
    # tf32x3 (2^-21 per term) on a GPU: these tiny models sum few terms, so bf16x3's 2^-16
    # per term is not averaged away (it is checked in test_contraction.py)
    metric = QKOVInterferenceMetric(cfg, fc, backend=backend, precision="tf32x3", **opts)
    heat = metric.compute_heatmap("math", "code")
    for block in "QKVO":
        want = _brute_block(family_run, opts, block)
        got = heat[block]["scores"]
        assert got.shape == want.shape == (3, 4, dims["L"], dims["H"])
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-5, (block, err)
        np.testing.assert_allclose(heat[block]["layer_head_avg"], want.mean(axis=(0, 1)),
                                   rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_layer_head_average_without_pairs_matches_brute_force(family_run, opts):
    """layer_head_average (means of the operands, no pairwise products) equals the mean
    over pairs of the float64 brute-force scores."""
    family, dims, model, fc, cfg, ref, fisher = family_run
    avg = QKOVInterferenceMetric(cfg, fc, backend="torch", **opts).layer_head_average(
        "math", "code")
    for block in "QKVO":
        want = _brute_block(family_run, opts, block).mean(axis=(0, 1))
        assert avg[block].shape == want.shape
        assert np.abs(avg[block] - want).max() <= 1e-5 * np.abs(want).max(), block


@pytest.mark.parametrize("variant", ["qkov", "fisher_weighted"])
def test_device_budget_scores_in_tiles_with_the_same_result(family_run, variant, monkeypatch):
    """device_memory_mb smaller than one block's operands: the block is scored in tiles of
    rows (more contractions, each within the budget) and the numbers do not change."""
    from interference.scores import metric as metric_mod

    family, dims, model, fc, cfg, ref, fisher = family_run
    opts = {"ridge_lambda": 1e-14, "variant": variant, "gj_norm": "l2", "backend": "torch"}
    full = QKOVInterferenceMetric(cfg, fc, **opts)
    calls = []
    real = metric_mod.contract
    monkeypatch.setattr(metric_mod, "contract", lambda *a, **k: calls.append(a[1].shape[0])
                        or real(*a, **k))
    want = full.compute_heatmap("math", "code")
    n_full = len(calls)
    _, n_heads, size = fc.gradient_manager.entries[(0, "Q")]
    tiny = QKOVInterferenceMetric(cfg, fc, device_memory_mb=2.5 * n_heads * size * 4 / 2 ** 20,
                                  **opts)                  # 1 Q row of each task per tile
    calls.clear()
    got = tiny.compute_heatmap("math", "code")
    assert len(calls) > n_full and max(calls) <= 2     # K/V rows of GQA are smaller
    avg = tiny.layer_head_average("math", "code")
    for block in "QKVO":
        np.testing.assert_allclose(got[block]["scores"], want[block]["scores"], rtol=1e-6,
                                   atol=1e-7 * np.abs(want[block]["scores"]).max())
        np.testing.assert_allclose(avg[block], want[block]["layer_head_avg"], rtol=1e-6)
    with pytest.raises(ValueError, match="device_memory_mb"):
        QKOVInterferenceMetric(cfg, fc, device_memory_mb=0)


@pytest.mark.parametrize("budget_rows", [None, 3.0, 1e6])
def test_prefetched_operands_give_the_float64_scores(family_run, budget_rows):
    """The overlapped path (the next (layer, block)'s operands loaded in a worker thread
    while the current one is scored; threaded here on the CPU as on CUDA) against the
    float64 brute force, with no budget, with a budget that fits one block's operands
    but not two (those blocks are scored alone, the rest prefetched), and with one that
    holds both tasks' whole rows (read once, every block a view of them). Every
    (layer, block)'s operands are made once either way."""
    family, dims, model, fc, cfg, ref, fisher = family_run
    opts = {"ridge_lambda": 1e-14, "gj_norm": "l2"}
    _, n_heads, size = fc.gradient_manager.entries[(0, "Q")]
    # two blocks' operands of 7 rows need 4 · 7 rows of budget (see _rows_per_tile): with
    # 3 · 7 Q rows, Q and O are scored alone; GQA's K/V rows (half as long) are prefetched
    mb = None if budget_rows is None else budget_rows * 7 * n_heads * size * 4 / 2 ** 20
    metric = QKOVInterferenceMetric(cfg, fc, backend="torch", device_memory_mb=mb, **opts)
    assert metric.prefetch is False                 # the default on the CPU
    metric.prefetch = True
    loads = []
    real = metric._operands
    metric._operands = lambda *a: loads.append(a[4]) or real(*a)     # a[4]: the block
    reads = []
    store = fc.gradient_manager
    real_columns = store.columns
    store.columns = lambda task, ids, *a: (reads.append(task) if not a else None) or \
        real_columns(task, ids, *a)                 # whole rows: no column range
    try:
        heat = metric.compute_heatmap("math", "code")
    finally:
        del store.columns
    assert reads == (["math", "code"] if budget_rows == 1e6 else [])
    # with 3 rows of budget Q and O fit once but not twice: made when their turn comes
    assert sorted(loads) == sorted(["Q", "K", "V", "O"] * dims["L"])
    for block in "QKVO":
        want = _brute_block(family_run, opts, block)
        err = np.abs(heat[block]["scores"] - want).max() / np.abs(want).max()
        assert err <= 1e-5, (block, err)
    assert heat["meta"]["compute"]["device_memory_mb"] == mb


def test_prefetched_yields_in_order_threaded_or_not():
    from interference.device import prefetched

    seen = []
    for threaded in (False, True):
        got = list(prefetched(range(5), lambda j: (seen.append(j), torch.full((2,), j))[1],
                              "cpu", threaded))
        assert [j for j, _ in got] == list(range(5))
        assert [int(t[0]) for _, t in got] == list(range(5))
    assert seen == list(range(5)) * 2


def test_memory_budget_settings():
    from interference.device import memory_budget_mb

    assert memory_budget_mb("auto", "cpu") is None      # no device budget on the CPU
    assert memory_budget_mb(None, "cpu") is None
    assert memory_budget_mb("512", "cpu") == 512.0
    for bad in (0, -1, "lots"):
        with pytest.raises(ValueError, match="device_memory_mb"):
            memory_budget_mb(bad, "cpu")


def test_tf32_sums_only_for_low_precision_cuda_activations():
    """The hooks engine allows TF32 only where it is exact (bfloat16/float16 inputs on CUDA)
    and restores the global flag afterwards; float32 models keep float32 matmuls."""
    from interference.gradients.kernels import tf32_if_exact as _tf32_if_exact

    flag = torch.backends.cuda.matmul
    before = flag.allow_tf32
    try:
        flag.allow_tf32 = False
        with _tf32_if_exact(torch.bfloat16, torch.bfloat16, True):
            assert flag.allow_tf32
        assert not flag.allow_tf32
        for args in [(torch.float32, torch.float32, True), (torch.bfloat16, torch.float32, True),
                     (torch.float16, torch.float16, False)]:
            with _tf32_if_exact(*args):
                assert not flag.allow_tf32, args
    finally:
        flag.allow_tf32 = before


def test_gradients_match_brute_force_and_are_batch_independent(family_run):
    family, dims, model, fc, cfg, ref, fisher = family_run
    idx = QKOVIndexer(model, cfg)
    for sid, g in ref[("math", "scored")].items():
        want = idx.flatten(g).double()
        got = fc.gradient_manager.vector("math", sid)
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max())
    # the same sample alone and inside two other batches
    b = padded_batch(6, 12, 9, "x")
    one = {k: v[2:3] if hasattr(v, "shape") else v[2:3] for k, v in b.items()}
    mixed = {k: (v[[4, 2, 0]] if hasattr(v, "shape") else [v[4], v[2], v[0]]) for k, v in b.items()}
    out = {}
    for name, batch in [("alone", one), ("full", b), ("mixed", mixed)]:
        c = FisherCollector(enable_cross_task_analysis=True, config=cfg)
        c.collect_fisher(model, batch, task="t", role="scored")
        out[name] = c.gradient_manager.vector("t", "x:2")
    assert torch.allclose(out["alone"], out["full"], rtol=1e-5, atol=1e-7)
    assert torch.allclose(out["alone"], out["mixed"], rtol=1e-5, atol=1e-7)


def assert_brute_force(fc, idx, model, fisher_b, scored_b):
    """Task 't' of ``fc``: its Fisher (mean of fisher_b) and its stored rows (scored_b)
    equal the float64 brute force of each sample alone through ``model``."""
    want_f = idx.flatten(fisher_mean(brute_grads(model, fisher_b))).double()
    torch.testing.assert_close(fc.fisher.get("t").double(), want_f, rtol=1e-4,
                               atol=1e-7 * float(want_f.max()))
    for sid, g in brute_grads(model, scored_b).items():
        want = idx.flatten(g).double()
        got = fc.gradient_manager.vector("t", sid).double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("gradient_format", ["dense", "factored"])
def test_sdpa_attention_gives_the_float64_brute_force_gradients(monkeypatch, gradient_format):
    """torch's fused attention (the default model's, conf/model/smollm2.yaml): right-padded
    batches of a causal model run unmasked through sdpa; the stored rows and the Fisher
    equal the float64 eager brute force of each sample alone."""
    from interference.gradients.per_sample import padding_of

    model, eager = tiny_llama(), tiny_llama()
    model.config._attn_implementation = "sdpa"
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: (calls.append(k.get("attn_mask")), sdpa(*a, **k))[1])
    assert padding_of(model) == "causal"
    cfg = QKOVConfig.from_model(model)
    idx = QKOVIndexer(model, cfg)
    fisher_b, scored_b = padded_batch(5, 12, 3, "f"), padded_batch(5, 12, 4, "s")
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg,
                         gradient_format=gradient_format)
    calls.clear()
    fc.collect_fisher(model, fisher_b, task="t", mode="mean", role="fisher")
    fc.collect_fisher(model, scored_b, task="t", role="scored")
    assert len(calls) == 2 * cfg.num_layers and all(m is None for m in calls)
    assert_brute_force(fc, idx, eager, fisher_b, scored_b)


@pytest.mark.parametrize("gradient_format", ["dense", "factored"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_micro_batches_padded_to_a_multiple_give_the_float64_brute_force_gradients(
        monkeypatch, gradient_format, family):
    """On a GPU each micro-batch is right-padded to a multiple of PAD_MULTIPLE tokens (fewer
    batch lengths), never beyond the call's longest sample. The rule forced on the CPU
    (multiple 4, micro-batches of 2): the batch lengths are as the rule says, and the stored
    rows and the Fisher still equal the float64 brute force of each sample alone."""
    from interference.gradients import per_sample

    monkeypatch.setitem(per_sample.PAD_MULTIPLE, "cpu", 4)
    seen, pad = [], per_sample._right_pad
    monkeypatch.setattr(per_sample, "_right_pad",
                        lambda *a: (lambda b: (seen.append(b["input_ids"].shape[1]), b)[1])(pad(*a)))
    model = tiny_llama() if family == "llama" else tiny_gpt2()
    cfg = QKOVConfig.from_model(model)
    idx = QKOVIndexer(model, cfg)
    order = [2, 5, 0, 1, 4, 3]      # lengths 10, 10 | 14, 12 | 12, 14
    fisher_b, scored_b = ({k: (v[order] if hasattr(v, "shape") else [v[i] for i in order])
                           for k, v in padded_batch(6, 14, seed, p).items()}
                          for seed, p in ((3, "f"), (4, "s")))
    fc = FisherCollector(enable_cross_task_analysis=True, config=cfg, micro_batch=2,
                         gradient_format=gradient_format)
    fc.collect_fisher(model, fisher_b, task="t", mode="mean", role="fisher")
    fc.collect_fisher(model, scored_b, task="t", role="scored")
    assert seen == [12, 14, 14] * 2     # 10 -> 12; 14 stays; 12 -> 16 is beyond 14: 14
    assert_brute_force(fc, idx, model, fisher_b, scored_b)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gram_norms_of_wide_projections_give_the_float64_brute_force_norms(monkeypatch, family):
    """On a GPU a wide projection's per-sample squared norm, all a factored store keeps of
    its g, comes from float64 Gram matrices (Σ_{t,s} (δ_t·δ_s)(x_t·x_s)) instead of the
    formed g. The rule forced on the CPU for every projection (LLaMA: q/k/v share one x and
    its Gram; GPT-2: fused Conv1D with biases; padded batches): the stored norms equal the
    float64 brute force of each sample alone, and the formed-gradient path's within float32
    rounding; the Gram path was taken for every weight the indexer covers once."""
    from interference.gradients import per_sample

    model = tiny_llama() if family == "llama" else tiny_gpt2()
    cfg = QKOVConfig.from_model(model)
    idx = QKOVIndexer(model, cfg)
    fisher_b, scored_b = padded_batch(4, 14, 3, "f"), padded_batch(5, 14, 4, "s")

    def norms(gram: bool):
        if gram:
            monkeypatch.setattr(per_sample, "GRAM_NORM_DEVICES", {"cpu"})
            monkeypatch.setattr(per_sample, "GRAM_NORM_RATIO", 0)
        fc = FisherCollector(enable_cross_task_analysis=True, config=cfg, micro_batch=2,
                             gradient_format="factored")
        fc.collect_fisher(model, fisher_b, task="t", mode="mean", role="fisher")
        fc.collect_fisher(model, scored_b, task="t", role="scored")
        monkeypatch.undo()
        return fc.gradient_manager.grad_norms("t", scored_b["sample_ids"])

    formed = norms(False)
    calls, gram_norm2 = [], per_sample._HookCapture._gram_norm2
    monkeypatch.setattr(per_sample._HookCapture, "_gram_norm2",
                        lambda self, x, d: (calls.append(d.shape[-1]), gram_norm2(self, x, d))[1])
    gram = norms(True)
    covered = per_sample._coverage(idx)
    once = [n for n in idx.param_names if n.endswith(".weight") and covered[n] is None]
    assert once and len(calls) == len(once) * 3      # every such weight, 3 micro-batches
    want = np.array([float(idx.flatten(g).double().norm())
                     for g in brute_grads(model, scored_b).values()])
    np.testing.assert_allclose(gram, want, rtol=1e-5)
    np.testing.assert_allclose(formed, want, rtol=1e-5)
    np.testing.assert_allclose(gram, formed, rtol=1e-6)
    # a g beyond float32's range (formed: inf) is reported infinite too, not its float64 norm
    cap = object.__new__(per_sample._HookCapture)
    cap._x_grams = {}
    x = torch.full((2, 2, 3), 1e20)
    x[1] = 1.0
    n2 = cap._gram_norm2(x, x.clone())
    assert torch.isinf(torch.einsum("nto,nti->noi", x, x)[0]).all()
    assert n2[0] == torch.inf and n2[1] == 36.0      # 9 entries of (1 + 1)^2


def test_stored_norms_from_row_norms_give_the_float64_norm():
    """A formed per-sample weight gradient's squared norm on the CPU (ROW_NORM_DEVICES):
    the float64 sum of its rows' float32 norms, within 3e-8 of the float64 norm of the
    whole over magnitudes spread by 10^6 (the bound is 2 ulp of a float32 square); a bias
    keeps the float64 norm; a row whose float32 norm overflows although g is finite falls
    back to the float64 norm (finite, as before), and a NaN stays NaN."""
    from interference.gradients import per_sample

    assert "cpu" in per_sample.ROW_NORM_DEVICES
    cap = object.__new__(per_sample._HookCapture)
    cap.reduce, cap.covered, cap.keep, cap.norm2, cap.grads = "norms", {}, set(), {}, {}
    g = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 24)
    huge = g.clone()
    huge[1, 5] = 1e30                              # finite; its row's float32 norm is not
    nan = g.clone()
    nan[2, 0, 0] = float("nan")
    for name, t in (("w", g), ("huge", huge), ("nan", nan), ("b", g[:, 0])):
        cap._keep(name, t)
    want = lambda t: t.double().flatten(1).square().sum(1)   # noqa: E731
    np.testing.assert_allclose(cap.norm2["w"].numpy(), want(g).numpy(), rtol=3e-8)
    np.testing.assert_allclose(cap.norm2["b"].numpy(), want(g[:, 0]).numpy(), rtol=1e-14)
    assert per_sample._row_norms2(huge) is None
    assert torch.isfinite(cap.norm2["huge"]).all()
    np.testing.assert_allclose(cap.norm2["huge"].numpy(), want(huge).numpy(), rtol=1e-14)
    assert torch.isnan(cap.norm2["nan"][2]) and torch.isfinite(cap.norm2["nan"][:2]).all()
    assert cap.norm2["w"].dtype == torch.float64


def test_the_padded_length_rounds_up_within_the_longest_sample():
    from interference.gradients.per_sample import PAD_MULTIPLE, padded_length

    assert PAD_MULTIPLE.get("cpu", 1) == 1 and PAD_MULTIPLE["cuda"] > 1
    assert [padded_length(t, "cpu") for t in (1, 7, 250)] == [1, 7, 250]
    m = PAD_MULTIPLE["cuda"]
    assert padded_length(m + 1, "cuda") == 2 * m and padded_length(m, "cuda") == m
    assert padded_length(m + 1, "cuda", longest=m + 5) == m + 5      # capped
    assert padded_length(m + 5, "cuda", longest=m + 5) == m + 5


def test_fisher_ema_and_mean_modes(llama_model):
    cfg = QKOVConfig.from_model(llama_model)
    batches = [padded_batch(3, 10, s, f"m:{s}") for s in range(3)]
    ref = [brute_grads(llama_model, b) for b in batches]
    idx = QKOVIndexer(llama_model, cfg)
    mean_c = [torch.stack([idx.flatten(g).double() ** 2 for g in r.values()]).mean(0) for r in ref]
    beta = 0.9
    ema = FisherCollector(ema_decay=beta, config=cfg)
    for b in batches:
        ema.collect_fisher(llama_model, b, task="m", mode="ema", role="fisher")
    F_t = torch.zeros_like(mean_c[0])
    for m in mean_c:
        F_t = beta * F_t + (1 - beta) * m
    want = F_t / (1 - beta ** 3)
    assert torch.allclose(ema.fisher.get("m").double(), want, rtol=1e-4, atol=1e-12)
    # one call on n samples gives the plain mean of their C_i
    one = FisherCollector(config=cfg)
    one.collect_fisher(llama_model, batches[0], task="m", mode="ema", role="fisher")
    assert torch.allclose(one.fisher.get("m").double(), mean_c[0], rtol=1e-4, atol=1e-12)
    # mean mode is independent of call order
    a, b = FisherCollector(config=cfg), FisherCollector(config=cfg)
    for bt in batches:
        a.collect_fisher(llama_model, bt, task="m", mode="mean", role="fisher")
    for bt in reversed(batches):
        b.collect_fisher(llama_model, bt, task="m", mode="mean", role="fisher")
    assert torch.allclose(a.fisher.get("m"), b.fisher.get("m"), rtol=1e-6)
    assert torch.allclose(a.fisher.get("m").double(), torch.stack(mean_c).mean(0), rtol=1e-4,
                          atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2_bias", "llama_bias"])
@pytest.mark.parametrize("micro_batch", [1, 6])
def test_fisher_squares_summed_one_sample_or_all_at_once_match_the_brute_force(
        family, micro_batch, monkeypatch):
    """The hooks engine's float64 Σ_k g_k² (micro-batches of one sample or of all six)
    against the float64 brute force of each sample alone, on split q/k/v (GQA), a fused
    c_attn with its bias in the Q/K/V slices, and split q/k/v with biases; a micro-batch's
    sum is bitwise the exact float64 squares added in sample order. Each (layer, block)
    goes into the sum once its parameters are formed: the squares of at most one module's
    parameters are held at a time, never those of the whole model."""
    from interference.gradients import per_sample
    model = {"llama": tiny_llama, "gpt2_bias": tiny_gpt2,
             "llama_bias": lambda: tiny_llama(bias=True)}[family]()
    cfg = QKOVConfig.from_model(model, include_bias=family != "llama")
    idx = QKOVIndexer(model, cfg)
    b = padded_batch(6, 10, 7, "m:s")
    want = torch.stack([idx.flatten(g).double() ** 2
                        for g in brute_grads(model, b).values()]).mean(0)
    held, keep = [], per_sample._HookCapture._keep

    def counting(self, name, g):
        keep(self, name, g)
        held.append(len(self.sq))
        want_sq = torch.zeros(g.shape[1:], dtype=torch.float64)
        for gk in g:                               # exact squares, added in sample order
            want_sq = want_sq + gk.double() ** 2
        assert torch.equal(self.sq[name], want_sq), name
    monkeypatch.setattr(per_sample._HookCapture, "_keep", counting)
    fc = FisherCollector(config=cfg, micro_batch=micro_batch)
    fc.collect_fisher(model, b, task="m", mode="mean", role="fisher")
    torch.testing.assert_close(fc.fisher.get("m").double(), want, rtol=1e-4,
                               atol=1e-7 * float(want.max()))
    per_module = 1 if family == "llama" else 2       # weight, and bias where included
    n_batches = -(-6 // micro_batch)
    assert len(held) == n_batches * len(idx.param_names) and max(held) == per_module


def test_fisher_sums_added_into_the_state_equal_a_calls_total_and_survive_a_failed_call(
        llama_model, monkeypatch):
    """On the CPU a call of one micro-batch adds its squares straight into the Fisher
    state (TaskFisher.sink): bitwise what a [P] total per call added by update() gives.
    A call that fails on a non-finite gradient leaves the state and its count as they were,
    and the collector takes the next call."""
    from interference.gradients import NonFiniteGradientError, per_sample
    from interference.gradients.fisher import TaskFisher

    cfg = QKOVConfig.from_model(llama_model)
    batches = [padded_batch(3, 10, s, f"m{s}") for s in range(3)]
    sunk = []
    monkeypatch.setattr(TaskFisher, "added", lambda self, n, ids, real=TaskFisher.added: (
        sunk.append(n), real(self, n, ids)))

    def run(**kw):
        fc = FisherCollector(config=cfg, micro_batch=3, **kw)
        for b in batches:
            fc.collect_fisher(llama_model, b, task="m", mode="mean", role="fisher")
        return fc
    direct = run()
    assert sunk == [3, 3, 3]
    with monkeypatch.context() as m:
        m.setattr(TaskFisher, "sink", lambda self, device: None)
        via_total = run()
    assert sunk == [3, 3, 3]
    assert torch.equal(direct.fisher.tasks["m"].state, via_total.fisher.tasks["m"].state)
    assert torch.equal(direct.fisher.get("m"), via_total.fisher.get("m"))

    before = direct.fisher.tasks["m"].state.clone()
    real = per_sample._HookCapture._keep

    def poisoned(self, n, g):
        if n == "model.layers.1.self_attn.v_proj.weight":
            g = g.clone()
            g[1, 0, 0] = float("nan")
        return real(self, n, g)
    with monkeypatch.context() as m:
        m.setattr(per_sample._HookCapture, "_keep", poisoned)
        with pytest.raises(NonFiniteGradientError, match="sample 'bad:1'"):
            direct.collect_fisher(llama_model, padded_batch(3, 10, 9, "bad"), task="m",
                                  mode="mean", role="fisher")
    tf = direct.fisher.tasks["m"]
    assert torch.equal(tf.state, before) and tf.count == 9
    direct.collect_fisher(llama_model, padded_batch(3, 10, 9, "good"), task="m", mode="mean",
                          role="fisher")
    assert tf.count == 12 and torch.isfinite(direct.fisher.get("m")).all()


def test_fisher_sums_held_on_the_gpu_equal_host_sums_bitwise():
    """TaskFisher's GPU-side pending sum (forced here with defer=True, as a GPU's batches
    of a large host state are handled) folds into the same float64 state as adding each
    call's sum on the host, also with a flush (the collector's turn to stored roles) or a
    read in between; the EMA and shard partials never pend."""
    from interference.gradients.fisher import TaskFisher

    g = torch.Generator().manual_seed(0)
    sums = [torch.rand(64, dtype=torch.float64, generator=g) * 10.0 ** k for k in range(-3, 4)]
    for cut in (None, 2, 5):                  # flush after this many calls (None: at the end)
        host = TaskFisher(64, "mean", 0.99, defer=False)
        held = TaskFisher(64, "mean", 0.99, defer=True)
        want = torch.zeros(64, dtype=torch.float64)
        for k, s in enumerate(sums):
            host.update(s.clone(), 2, [f"a:{k}"])
            held.update(s.clone(), 2, [f"a:{k}"])
            want = want + s
            if k + 1 == cut:
                assert held.pending is not None
                held.flush()
        assert torch.equal(held.value(), host.value())
        assert torch.equal(held.state, host.state) and torch.equal(host.state, want)
        assert held.pending is None and held.count == host.count == 2 * len(sums)
    ema = TaskFisher(64, "ema", 0.9, defer=True)
    ema.update(sums[0].clone(), 2, ["e"])
    assert ema.pending is None
    shard = TaskFisher(64, "mean", 0.9, keep_partials=True, defer=True)
    shard.update(sums[0].clone(), 2, ["s"])
    assert shard.pending is None and len(shard.partials) == 1


def test_dropped_fisher_sums_give_the_same_value_and_refuse_more_samples(tmp_path):
    """keep_sums=False (a layer chunk's collector): the flush that makes Î from the
    GPU-held sums drops them instead of copying them to the host; Î is bitwise the kept
    one's, and a later update or save is refused with a message naming the setting."""
    from interference.gradients.fisher import TaskFisher, _save_fisher

    g = torch.Generator().manual_seed(1)
    sums = [torch.rand(64, dtype=torch.float64, generator=g) * 10.0 ** k for k in range(-2, 3)]
    kept = TaskFisher(64, "mean", 0.99, defer=True)
    dropped = TaskFisher(64, "mean", 0.99, defer=True, keep_sums=False)
    for k, s in enumerate(sums):
        kept.update(s.clone(), 2, [f"a:{k}"])
        dropped.update(s.clone(), 2, [f"a:{k}"])
    # no host state is made while the sums pend (a chunk's GPU sums are their only copy;
    # 10 GB of host zeros per task for 19 LLaMA-7B layers), nor when they are dropped
    assert dropped._state is None and kept._state is None
    dropped.flush()
    assert dropped._state is None and dropped.state is None and dropped.pending is None
    assert torch.equal(dropped.value(), kept.value())
    with pytest.raises(ValueError, match="keep_fisher_sums=False"):
        dropped.update(sums[0].clone(), 2, ["a:late"])
    with pytest.raises(ValueError, match="keep_fisher_sums=False"):
        _save_fisher(tmp_path / "f.safetensors", dropped)
    host = TaskFisher(64, "mean", 0.99, keep_sums=False)     # nothing pends on the host:
    host.update(sums[0].clone(), 2, ["h"])                    # the flag changes nothing
    host.flush()
    assert torch.equal(host.state, sums[0])


def test_median_by_selection_equals_numpy_bitwise():
    from interference.scores.metric import median

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 11, 1000, 1001, 4096):
        for x in (rng.exponential(size=n) * 10.0 ** rng.integers(-12, 3),
                  rng.integers(0, 4, size=n).astype(float)):          # ties
            assert median(torch.from_numpy(x)) == float(np.median(x))
            assert median(torch.from_numpy(x), by_sort=True) == float(np.median(x))  # CUDA's way


def test_metric_reused_after_more_fisher_samples_equals_a_fresh_one(llama_model):
    """The metric caches the normalising Fisher and each (layer, block)'s ridge λ; both are
    keyed by the Fisher's values, so a collector that gathers more Fisher samples after a
    heatmap gives the next heatmap of a fresh metric."""
    fc, cfg, _ = _collect(llama_model)
    kw = {"ridge_lambda_rel": 1e-1, "device": "cpu"}
    reused = QKOVInterferenceMetric(cfg, fc, **kw)
    before = reused.compute_heatmap("math", "code")
    again = reused.compute_heatmap("math", "code")
    assert all(np.array_equal(before[b]["scores"], again[b]["scores"]) for b in "QKVO")
    fc.collect_fisher(llama_model, padded_batch(3, 12, 9, "math:f2"), task="math",
                      mode="mean", role="fisher")
    after = reused.compute_heatmap("math", "code")
    fresh = QKOVInterferenceMetric(cfg, fc, **kw).compute_heatmap("math", "code")
    for b in "QKVO":
        assert np.array_equal(after[b]["scores"], fresh[b]["scores"])
        assert not np.array_equal(after[b]["scores"], before[b]["scores"])
    assert after["meta"]["ridge"] == fresh["meta"]["ridge"] != before["meta"]["ridge"]


def test_memory_budget_spills_to_disk_with_identical_results(llama_model):
    full, cfg, _ = _collect(llama_model, memory_mb=100.0)
    tiny, _, _ = _collect(llama_model, memory_mb=0.001)
    use = tiny.gradient_manager.get_memory_usage()
    assert use["ram_mb"] <= 0.001 and use["n_on_disk"] == use["n_samples"] == 7
    assert full.gradient_manager.get_memory_usage()["n_on_disk"] == 0
    h1 = QKOVInterferenceMetric(cfg, full).compute_heatmap("math", "code")
    h2 = QKOVInterferenceMetric(cfg, tiny).compute_heatmap("math", "code")
    for b in "QKVO":
        assert np.array_equal(h1[b]["scores"], h2[b]["scores"])


def test_a_calls_rows_are_read_back_as_one_view_with_the_values_stored_one_by_one(
        llama_model, monkeypatch):
    """collect_fisher reserves one buffer for the rows of a call that the budget holds, so
    they are read back (and scored on a GPU) in place: a view, not a copy. The values,
    the heatmap and the rows of a budget that holds only part of a call are those of a
    store that copies each row on its own."""
    from interference.gradients.store import GradientStore

    fc, cfg, _ = _collect(llama_model)
    store = fc.gradient_manager
    ids = store.ids("code", "scored")
    rows = store.columns("code", ids)
    assert rows.data_ptr() == store.shards[("code", "scored")]._buffers[0].data_ptr()
    backwards = store.columns("code", ids[::-1])          # not in buffer order: a copy
    assert backwards.data_ptr() != rows.data_ptr()
    assert torch.equal(backwards, rows.flip(0))
    row_mb = store.size * 4 / 2 ** 20
    part, _, _ = _collect(llama_model, memory_mb=5.5 * row_mb)  # 3 + 2 of the 3 + 4 rows
    use = part.gradient_manager.get_memory_usage()
    assert use["n_on_disk"] == 2 and use["ram_mb"] == pytest.approx(5 * row_mb)
    assert [len(b) for b in part.gradient_manager.shards[("code", "scored")]._buffers] == [2]
    monkeypatch.setattr(GradientStore, "reserve", lambda *a: None)
    one_by_one, _, _ = _collect(llama_model)
    for task in ("math", "code"):
        ids = store.ids(task, "scored")
        assert torch.equal(store.columns(task, ids),
                           one_by_one.gradient_manager.columns(task, ids))
        assert torch.equal(part.gradient_manager.columns(task, ids),
                           one_by_one.gradient_manager.columns(task, ids))
    h1 = QKOVInterferenceMetric(cfg, fc).compute_heatmap("math", "code")
    h2 = QKOVInterferenceMetric(cfg, one_by_one).compute_heatmap("math", "code")
    for b in "QKVO":
        assert np.array_equal(h1[b]["scores"], h2[b]["scores"])


@pytest.mark.parametrize("opts", [{}, {"ridge_lambda": 1e-14}, {"ridge_lambda": 1e-6},
                                  {"variant": "signed"}])
def test_the_normaliser_made_at_once_equals_the_one_made_per_layer_and_block(
        family_run, opts, monkeypatch):
    """On CUDA 1 / D and the ridge table are made for every (layer, block) at once
    (``_weight_table``); forced here on the CPU, the heatmap, its means and its ridge
    table equal those made per (layer, block), bitwise. A relative ridge keeps the
    per-(layer, block) path."""
    from interference.scores import metric as metric_mod

    family, dims, model, fc, cfg, ref, fisher = family_run
    want = QKOVInterferenceMetric(cfg, fc, backend="torch", **opts).compute_heatmap(
        "math", "code")
    monkeypatch.setattr(metric_mod, "WEIGHT_TABLE_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(metric_mod, "WEIGHT_SPAN", 100)    # several spans
    metric = QKOVInterferenceMetric(cfg, fc, backend="torch", **opts)
    got = metric.compute_heatmap("math", "code")
    assert metric._weight_cache[1] is not None
    for b in "QKVO":
        assert np.array_equal(got[b]["scores"], want[b]["scores"])
        assert np.array_equal(got[b]["layer_head_avg"], want[b]["layer_head_avg"])
        np.testing.assert_allclose(got[b]["layer_head_avg"],
                                   want[b]["scores"].mean(axis=(0, 1)), rtol=1e-12)
    assert got["meta"]["ridge"] == want["meta"]["ridge"]
    rel = QKOVInterferenceMetric(cfg, fc, backend="torch", ridge_lambda_rel=0.1)
    rel.compute_heatmap("math", "code")
    assert rel._weight_cache == (rel._fisher_vector(("math", "code")), None)


def test_save_and_reload_gives_identical_heatmap(tmp_path, llama_model):
    fc, cfg, _ = _collect(llama_model)
    for t in ("math", "code"):
        fc.save_task(t, tmp_path / t)
    re = FisherCollector.from_saved([tmp_path / "math", tmp_path / "code"])
    h1 = QKOVInterferenceMetric(cfg, fc).compute_heatmap("math", "code")
    h2 = QKOVInterferenceMetric(re.config, re).compute_heatmap("math", "code")
    for b in "QKVO":
        assert np.array_equal(h1[b]["scores"], h2[b]["scores"])


def test_qwen2_style_biases_are_included_only_on_request():
    model = tiny_llama(bias=True)
    dims = {"L": 2, "H": 4, "Hkv": 2, "dk": 12, "dv": 12}
    fc, cfg, batches = _collect(model, include_bias=True)
    ref = {k: brute_grads(model, b) for k, b in batches.items()}
    F = {n: (a + b) / 2 for (n, a), b in zip(fisher_mean(ref[("math", "fisher")]).items(),
                                             fisher_mean(ref[("code", "fisher")]).values())}
    heat = QKOVInterferenceMetric(cfg, fc).compute_heatmap("math", "code")
    for block in "QKVO":
        want = brute_scores("llama", dims, ref[("math", "scored")], ref[("code", "scored")], F,
                            block, [0, 1], [0, 1, 2, 3], include_bias=True)
        assert np.abs(heat[block]["scores"] - want).max() / np.abs(want).max() <= 1e-5
    no_bias = QKOVIndexer(model, QKOVConfig.from_model(model))
    with_bias = QKOVIndexer(model, cfg)
    assert with_bias.entry(0, "Q").size == no_bias.entry(0, "Q").size + 12
    assert with_bias.entry(0, "O").size == no_bias.entry(0, "O").size  # O bias never per head


def test_gqa_kv_columns_repeat_per_group_and_top_conflicts_list_each_once(family_run):
    family, dims, model, fc, cfg, ref, fisher = family_run
    heat = QKOVInterferenceMetric(cfg, fc, top_k=1000).compute_heatmap("math", "code")
    group = dims["H"] // dims["Hkv"]
    for b in "KV":
        s = heat[b]["scores"]
        for h in range(dims["H"]):
            assert np.array_equal(s[..., h], s[..., (h // group) * group])
        cells = {(c["layer"], c["kv_head"], c["sample_a"], c["sample_b"])
                 for c in heat[b]["top_conflicts"]}
        assert len(cells) == len(heat[b]["top_conflicts"]) == 3 * 4 * dims["L"] * dims["Hkv"]
    top = heat["Q"]["top_conflicts"]
    assert [c["score"] for c in top] == sorted((c["score"] for c in top), reverse=True)
    assert top[0]["score"] == heat["Q"]["scores"].max()
    assert top[0]["sample_a"].startswith("math:s") and top[0]["sample_b"].startswith("code:s")


def test_compute_sample_pair_and_diagnostics(family_run):
    family, dims, model, fc, cfg, ref, fisher = family_run
    metric = QKOVInterferenceMetric(cfg, fc)
    heat = metric.compute_heatmap("math", "code")
    pair = metric.compute_sample_pair(task_a="math", sample_i=2, task_b="code", sample_j=1,
                                      layer=1, head=3)
    for b in "QKVO":
        assert pair[b] == pytest.approx(heat[b]["scores"][2, 1, 1, 3], rel=1e-6)
    score, diag = metric.compute_block_head_score("math", 0, "code", 0, 1, 2, "K")
    assert {"fisher_min", "contrib_norm", "grad_norm"} <= set(diag)
    assert diag["kv_head"] == 2 // (dims["H"] // dims["Hkv"])
    assert diag["sample_a"] == "math:s:0" and diag["sample_b"] == "code:s:0"


def test_layers_and_heads_subsets_keep_real_ids(family_run):
    family, dims, model, fc, cfg, ref, fisher = family_run
    metric = QKOVInterferenceMetric(cfg, fc)
    full = metric.compute_heatmap("math", "code")
    sub = metric.compute_heatmap("math", "code", layers=[1], heads=[3, 1], max_samples_per_task=2)
    assert sub["Q"]["layer_head_avg"].shape == (1, 2)
    assert sub["meta"]["layers"] == [1] and sub["meta"]["heads"] == [3, 1]
    assert np.allclose(sub["O"]["scores"], full["O"]["scores"][:2, :2][:, :, [1]][..., [3, 1]])
    for c in sub["Q"]["top_conflicts"]:
        assert c["layer"] == 1 and c["head"] in (3, 1)


def test_save_moves_spilled_rows_and_keeps_mixed_stores_intact(tmp_path, llama_model):
    """Budget for ~3 rows: the rest spill; save moves the spill file, appends RAM rows."""
    full, cfg, _ = _collect(llama_model, memory_mb=100.0)
    row_mb = full.gradient_manager.size * 4 / 2**20
    mixed, _, _ = _collect(llama_model, memory_mb=3.5 * row_mb)
    use = mixed.gradient_manager.get_memory_usage()
    assert 0 < use["n_on_disk"] < use["n_samples"]
    before = QKOVInterferenceMetric(cfg, mixed).compute_heatmap("math", "code")
    for t in ("math", "code"):
        mixed.save_task(t, tmp_path / t)
    after_save = QKOVInterferenceMetric(cfg, mixed).compute_heatmap("math", "code")
    reopened = FisherCollector.from_saved([tmp_path / "math", tmp_path / "code"])
    again = QKOVInterferenceMetric(reopened.config, reopened).compute_heatmap("math", "code")
    want = QKOVInterferenceMetric(cfg, full).compute_heatmap("math", "code")
    for b in "QKVO":
        for h in (before, after_save, again):
            assert np.array_equal(h[b]["scores"], want[b]["scores"])


def test_hooks_engine_names_the_sample_without_tokens_or_with_a_nan_loss(llama_model):
    """The batched engine checks a micro-batch after its backward (one host transfer) and
    still names the offending sample: no predicted tokens first, then a non-finite loss."""
    from interference.gradients import NonFiniteGradientError

    batch = padded_batch(3, 10, 0, "m")
    short = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    short["labels"][1, :] = -100                    # sample m:1 predicts nothing
    fc = FisherCollector(enable_cross_task_analysis=True, engine="hooks")
    with pytest.raises(ValueError, match=r"sample 'm:1': sample has no predicted tokens"):
        fc.collect_fisher(llama_model, short, task="m", role="scored")
    with torch.no_grad():
        dict(llama_model.named_parameters())["model.layers.1.self_attn.o_proj.weight"][0, 0] = \
            float("nan")
    fc = FisherCollector(enable_cross_task_analysis=True, engine="hooks")
    with pytest.raises(NonFiniteGradientError, match=r"sample 'm:0': loss is nan; non-finite "
                                                     r"weights in \['model\.layers\.1\."):
        fc.collect_fisher(llama_model, batch, task="m", role="scored")


@pytest.mark.parametrize("role", ["fisher", "scored"])
def test_hooks_engine_names_the_sample_with_a_nan_gradient(llama_model, monkeypatch, role):
    """A NaN in one sample's per-sample gradient (finite loss) names that sample, whether
    its rows are kept (scored) or only their squares summed (Fisher)."""
    from interference.gradients import NonFiniteGradientError
    from interference.gradients import per_sample

    real = per_sample._HookCapture._keep
    name = "model.layers.1.self_attn.v_proj.weight"

    def poisoned(self, n, g):
        if n == name:
            g = g.clone()
            g[1, 0, 0] = float("nan")
        return real(self, n, g)

    monkeypatch.setattr(per_sample._HookCapture, "_keep", poisoned)
    fc = FisherCollector(enable_cross_task_analysis=True, engine="hooks")
    where = name.replace(".", r"\.") if role == "fisher" else "layer 1 block V"
    with pytest.raises(NonFiniteGradientError, match=rf"sample 'm:1': non-finite gradient .*{where}"):
        fc.collect_fisher(llama_model, padded_batch(3, 10, 0, "m"), task="m", mode="mean",
                          role=role)


@pytest.mark.parametrize("variant", ["qkov", "signed"])
def test_top_conflicts_are_the_k_largest_with_ties_by_position(family_run, variant):
    """top_conflicts (k-th value found with topk, candidates sorted on the host) against a
    plain sort of every entry: largest first ('signed': smallest), ties by flat position."""
    family, dims, model, fc, cfg, ref, fisher = family_run
    metric = QKOVInterferenceMetric(cfg, fc, variant=variant, top_k=7)
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(3, 4, dims["L"], dims["H"])).astype(np.float64)
    heads, layers = list(range(dims["H"])), list(range(dims["L"]))
    got = metric.top_conflicts("Q", torch.as_tensor(scores, dtype=torch.float32), layers,
                               heads, [f"a{i}" for i in range(3)], [f"b{j}" for j in range(4)])
    flat = scores.reshape(-1)
    sign = 1 if variant == "signed" else -1
    want = sorted(range(flat.size), key=lambda t: (sign * flat[t], t))[:7]
    assert [(g["sample_a"], g["sample_b"], g["layer"], g["head"], g["score"]) for g in got] == [
        (f"a{i}", f"b{j}", layers[l], heads[h], flat[t])
        for t in want for i, j, l, h in [np.unravel_index(t, scores.shape)]]


def test_b6_benchmark_runs_on_the_cpu_and_matches_kronfluence():
    """benchmarks/bench_kronfluence.py at a tiny size: both sides run, and (when Kronfluence
    is installed: the 'bench' extra) the sum of our 'signed' scores over every layer, head
    and block equals Kronfluence's diagonal-Fisher pairwise score of the same pair."""
    import importlib.util
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import bench_kronfluence
    finally:
        sys.path.pop(0)
    args = ["--device", "cpu", "--layers", "2", "--heads", "2", "--width", "16", "--n", "4",
            "--tokens", "8", "--vocab", "64", "--warmup-n", "0"]
    if importlib.util.find_spec("kronfluence") is None:
        args.append("--skip-kronfluence")
    out = bench_kronfluence.main(args)
    assert out["plain_fwd_bwd_s"] > 0
    assert out["ours_s"]["total"] > 0 and out["heatmap_kernel_s"] > 0
    if "kronfluence_s" in out:
        assert out["kronfluence_scores_shape"] == [4, 4]
        assert out["signed_sum_vs_kronfluence_max_rel_diff"] < 1e-4   # ε floor, float32


def test_auto_micro_batch_is_8_on_the_cpu_and_the_largest_that_fits_on_a_gpu(monkeypatch,
                                                                             llama_model):
    """micro_batch='auto': 8 on the CPU (resolved at the first batch); on CUDA the largest
    of 32/16/8 whose 12 m P bytes fit a quarter of the free memory; bad values refused."""
    from interference.gradients import fisher

    fc = FisherCollector(enable_cross_task_analysis=True)
    assert fc.micro_batch == "auto"
    fc.collect_fisher(llama_model, padded_batch(3, 10, 1, "m:f"), task="m", role="fisher")
    assert fc.micro_batch == 8
    P = 10**6
    for free_mb, want in ((12 * 32 * P * 4 / 2**20, 32), (12 * 32 * P * 4 / 2**20 - 1, 16),
                          (12 * 16 * P * 4 / 2**20 - 1, 8), (1.0, 8)):
        monkeypatch.setattr("interference.device.free_memory_mb", lambda d, f=free_mb: f)
        assert fisher.auto_micro_batch(torch.device("cuda"), P) == want
    for bad in (0, -1, 2.5, "big"):
        with pytest.raises(ValueError, match="micro_batch"):
            FisherCollector(micro_batch=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_nll_and_its_gradient_equal_the_float64_log_softmax_row_by_row(dtype):
    """objectives.token_nll (row blocks, no [rows, V] log-probabilities kept) against a float64
    loop: -log(e^x_t / Σ e^x) per row, and its gradient w (softmax - onehot) of Σ w·nll.
    300 rows of 65,536 logits span three blocks (the last partial)."""
    from interference.gradients.objectives import _block_rows, token_nll

    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(300, 65536, generator=gen)).to(dtype).requires_grad_()
    t = torch.randint(0, 65536, (300,), generator=gen)
    w = torch.randn(300, generator=gen)
    assert len(x.detach().split(_block_rows(x))) == 3
    nll = token_nll(x, t)
    (nll * w.to(nll.dtype)).sum().backward()
    assert nll.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert x.grad.dtype == dtype
    want, want_grad = np.empty(300), np.empty((300, 65536))
    xs = x.detach().double().numpy()
    for r in range(300):
        e = np.exp(xs[r] - xs[r].max())
        p = e / e.sum()
        want[r] = -np.log(p[t[r]])
        p[t[r]] -= 1.0
        want_grad[r] = float(w[r]) * p
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}[dtype]
    np.testing.assert_allclose(nll.detach().double().numpy(), want, rtol=tol, atol=tol)
    # the gradient is rounded to the logits' dtype once
    gtol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float64: 1e-14}[dtype]
    np.testing.assert_allclose(x.grad.double().numpy(), want_grad, rtol=0, atol=gtol)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_head_token_nll_and_its_hidden_gradient_equal_a_float64_loop(dtype, bias):
    """objectives.head_token_nll (the output projection and the loss a block of rows at a
    time, no [rows, V] logits kept) against a float64 loop: nll_r = -log softmax(W h_r + b)[t_r]
    and the gradient of Σ w_r nll_r w.r.t. h_r, w_r (softmax - onehot) W. 300 rows over
    65,536 words span three blocks (the last partial)."""
    from interference.gradients.objectives import block_rows, head_token_nll

    gen = torch.Generator().manual_seed(1)
    V, d = 65536, 16
    head = torch.nn.Linear(d, V, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=gen) / 2)
        if bias:
            head.bias.copy_(torch.randn(V, generator=gen))
    head = head.to(dtype).requires_grad_(False)
    h = torch.randn(300, d, generator=gen).to(dtype).requires_grad_()
    t = torch.randint(0, V, (300,), generator=gen)
    w = torch.randn(300, generator=gen)
    assert -(-300 // block_rows(V, cuda=False)) == 3
    nll = head_token_nll(h, head, t)
    (nll * w.to(nll.dtype)).sum().backward()
    assert nll.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert h.grad.dtype == dtype
    W = head.weight.double().numpy()
    b = head.bias.double().numpy() if bias else np.zeros(V)
    hs = h.detach().double().numpy()
    want, want_grad = np.empty(300), np.empty((300, d))
    for r in range(300):
        x = W @ hs[r] + b
        e = np.exp(x - x.max())
        p = e / e.sum()
        want[r] = -np.log(p[t[r]])
        p[t[r]] -= 1.0
        want_grad[r] = float(w[r]) * (p @ W)
    # bfloat16: the logits are rounded to the model dtype, as the model's own head rounds them
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float64: 1e-10}[dtype]
    np.testing.assert_allclose(nll.detach().double().numpy(), want, rtol=0, atol=tol)
    gtol = {torch.float32: 1e-5, torch.bfloat16: 0.05, torch.float64: 1e-12}[dtype]
    scale = np.abs(want_grad).max()
    assert np.abs(h.grad.double().numpy() - want_grad).max() <= gtol * scale


def test_head_token_nll_refuses_a_head_that_wants_its_gradient():
    from interference.gradients.objectives import head_token_nll

    head = torch.nn.Linear(4, 9)
    with pytest.raises(ValueError, match="frozen output projection"):
        head_token_nll(torch.randn(3, 4), head, torch.zeros(3, dtype=torch.long))


def _tiny_granite():
    """A causal LM whose logits are the head's divided by ``logits_scaling``."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GraniteConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, logits_scaling=4.0,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.GraniteForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "granite"])
def test_hooks_engine_forms_no_logits_where_they_are_the_heads_and_equals_the_loop(
        family, monkeypatch):
    """Where a model's logits are its output projection's (plain_lm_head), the batched
    engine never calls the projection (no [n, T, V] logits); where they are scaled
    (Granite), it takes the logits from the model. Either way the per-sample gradients
    equal the one-sample-at-a-time loop's."""
    from interference.gradients.objectives import plain_lm_head

    model = _tiny_granite() if family == "granite" else FAMILIES[family][0]()
    head = model.get_output_embeddings()
    assert (plain_lm_head(model) is head) == (family != "granite")
    cfg = QKOVConfig.from_model(model)
    batch = padded_batch(7, 12, 5, "s")
    out = {}
    for engine in ("loop", "hooks"):
        if engine == "hooks" and family != "granite":
            def no_logits(*a, **k):
                raise AssertionError("the engine formed the [n, T, V] logits")
            monkeypatch.setattr(head, "forward", no_logits)
        fc = FisherCollector(enable_cross_task_analysis=True, config=cfg, engine=engine,
                             micro_batch=3)
        fc.collect_fisher(model, batch, task="t", role="scored")
        out[engine] = torch.stack([fc.gradient_manager.vector("t", f"s:{k}") for k in range(7)])
    scale = out["loop"].abs().max()
    assert (out["hooks"] - out["loop"]).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("fmt,role", [("factored", "fisher"), ("factored", "scored"),
                                      ("dense", "scored")])
def test_a_micro_batchs_capture_is_freed_before_the_next_forward(fmt, role, monkeypatch):
    """When a micro-batch's forward starts, no earlier micro-batch's capture (its x, δ, and
    per-sample squares or gradients) may still be alive: names left bound in the engine's
    generators or in the collector's loops held a whole micro-batch's buffers through the
    next forward (about 0.3 GB on the default run)."""
    import gc
    import weakref

    from interference.gradients import per_sample

    made, checked = [], []
    init, losses = per_sample._HookCapture.__init__, per_sample.PerSampleGradients._batch_losses

    def track(self, *a, **k):
        init(self, *a, **k)
        made.append(weakref.ref(self))

    def forward(self, b):
        gc.collect()
        alive = [r for r in made[:-1] if r() is not None]
        checked.append(len(alive))
        return losses(self, b)

    monkeypatch.setattr(per_sample._HookCapture, "__init__", track)
    monkeypatch.setattr(per_sample.PerSampleGradients, "_batch_losses", forward)
    model = tiny_llama()
    fc = FisherCollector(enable_cross_task_analysis=True, config=QKOVConfig.from_model(model),
                         gradient_format=fmt, micro_batch=2)
    fc.collect_fisher(model, padded_batch(7, 12, 5, "s"), task="t", role=role)
    assert len(checked) == 4 and checked == [0, 0, 0, 0]


def test_lagged_factored_reads_yield_the_same_samples_and_errors(llama_model, monkeypatch):
    """per_sample.LAG_DEVICES (CUDA): the factored engine yields a micro-batch's samples
    once the next micro-batch is queued. Run that way on the CPU, every SampleGradient
    (id, loss, tokens, norm, factors) equals the unlagged engine's, in order, and a NaN in
    a sample of the first of three micro-batches still names that sample."""
    from interference.gradients import CausalLMObjective, NonFiniteGradientError, PerSampleGradients
    from interference.gradients import per_sample

    idx = QKOVIndexer(llama_model, QKOVConfig.from_model(llama_model))
    batch = padded_batch(5, 10, 3, "m")

    def run():
        eng = PerSampleGradients(llama_model, idx, CausalLMObjective(), engine="hooks",
                                 micro_batch=2, factors=True, rows=False)
        return list(eng(batch, batch["sample_ids"]))

    plain = run()
    calls = []
    real = per_sample.PerSampleGradients._factored_samples

    def spy(self, ids, *rest):
        calls.append(list(ids))
        return real(self, ids, *rest)

    with monkeypatch.context() as m:
        m.setattr(per_sample, "LAG_DEVICES", {"cpu"})
        m.setattr(per_sample.PerSampleGradients, "_factored_samples", spy)
        lagged = run()
    assert calls == [["m:0", "m:1"], ["m:2", "m:3"], ["m:4"]]
    assert [g.sample_id for g in lagged] == [g.sample_id for g in plain] == batch["sample_ids"]
    for a, b in zip(lagged, plain):
        assert (a.loss, a.n_tokens, a.norm) == (b.loss, b.n_tokens, b.norm)
        assert a.factors["T"] == b.factors["T"] and a.factors["groups"] == b.factors["groups"]
        for kind in ("x", "delta"):
            assert all(torch.equal(a.factors[kind][k], b.factors[kind][k])
                       for k in b.factors[kind])

    keep = per_sample._HookCapture._keep

    def poisoned(self, n, g):
        if n.endswith("layers.1.self_attn.v_proj.weight") and g.shape[0] == 2:
            g = g.clone()
            g[1, 0, 0] = float("nan")
        return keep(self, n, g)
    monkeypatch.setattr(per_sample, "LAG_DEVICES", {"cpu"})
    monkeypatch.setattr(per_sample._HookCapture, "_keep", poisoned)
    got = []
    with pytest.raises(NonFiniteGradientError, match=r"sample 'm:1': non-finite gradient at "
                                                     r"layer 1 block V"):
        for g in PerSampleGradients(llama_model, idx, CausalLMObjective(), engine="hooks",
                                    micro_batch=2, factors=True, rows=False)(
                batch, batch["sample_ids"]):
            got.append(g.sample_id)
    assert got == ["m:0"]


def test_causal_lm_split_keeps_each_samples_masked_tokens_as_a_loop_does():
    """CausalLMObjective.split against a loop of boolean indexes per sample: right and left
    padding, an empty sample and a mask with a hole (not one run), with and without
    labels; the samples do not share memory with the caller's batch."""
    from interference.gradients import CausalLMObjective

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (6, 9), generator=g)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[1, 6:] = 0       # right padding
    mask[2, :3] = 0       # left padding
    mask[3] = 0           # no token
    labels = ids.clone()
    labels[0, 4] = -100
    for m in (mask[[0, 1, 2, 3, 5]], torch.ones(4, 9, dtype=torch.long), mask.clone()):
        if len(m) == 6:
            m[4, 2] = 0   # a hole: not one run of tokens
        for lab in (None, labels[:len(m)]):
            batch = {"input_ids": ids[:len(m)].clone(), "attention_mask": m}
            if lab is not None:
                batch["labels"] = lab
            got = CausalLMObjective().split(batch)
            assert len(got) == len(m)
            for k, s in enumerate(got):
                keep = m[k].bool()
                want_lab = (lab[k] if lab is not None else batch["input_ids"][k])[keep]
                assert torch.equal(s["input_ids"], batch["input_ids"][k][keep])
                assert torch.equal(s["labels"], want_lab)
            batch["input_ids"].fill_(0)
            assert all(s["input_ids"].numel() == 0 or s["input_ids"].min() > 0 for s in got)


def test_lagged_dense_rows_are_the_same_and_formed_after_the_previous_are_yielded(
        llama_model, monkeypatch):
    """per_sample.LAG_DEVICES (CUDA): the dense-rows engine checks and yields a
    micro-batch's rows once the next micro-batch's forward and backward are queued, and
    forms that one's gradients only after them (so its activations, not its gradients, live
    beside the previous rows: the memory plan's bytes). Run that way on the CPU: the same
    SampleGradients bitwise, in that order of events, and a NaN in a sample of the first of
    three micro-batches names the sample, layer and block after the second's forward."""
    from interference.gradients import CausalLMObjective, NonFiniteGradientError, PerSampleGradients
    from interference.gradients import per_sample

    idx = QKOVIndexer(llama_model, QKOVConfig.from_model(llama_model))
    batch = padded_batch(5, 10, 3, "m")
    events = []
    hook = llama_model.get_input_embeddings().register_forward_pre_hook(
        lambda mod, args: events.append("forward"))
    form_all = per_sample._HookCapture.form_all
    monkeypatch.setattr(per_sample._HookCapture, "form_all",
                        lambda self: (events.append("form"), form_all(self))[1])

    def run():
        events.clear()
        out = []
        for g in PerSampleGradients(llama_model, idx, CausalLMObjective(), engine="hooks",
                                    micro_batch=2)(batch, batch["sample_ids"]):
            events.append(g.sample_id)
            out.append(g)
        return out
    try:
        run()                 # the model's padding probe (its own forwards) runs once
        plain, plain_events = run(), list(events)
        monkeypatch.setattr(per_sample, "LAG_DEVICES", {"cpu"})
        lagged = run()
        assert plain_events == ["forward", "form", "m:0", "m:1", "forward", "form", "m:2",
                                "m:3", "forward", "form", "m:4"]
        assert events == ["forward", "form", "forward", "m:0", "m:1", "form", "forward",
                          "m:2", "m:3", "form", "m:4"]
        assert [g.sample_id for g in lagged] == batch["sample_ids"]
        for a, b in zip(lagged, plain):
            assert (a.loss, a.n_tokens) == (b.loss, b.n_tokens)
            assert torch.equal(a.vector, b.vector)

        keep = per_sample._HookCapture._keep

        def poisoned(self, n, g):
            if n.endswith("layers.1.self_attn.v_proj.weight") and not \
                    any(e.startswith("m:") for e in events):
                g = g.clone()
                g[1, 0, 0] = float("nan")
            return keep(self, n, g)
        monkeypatch.setattr(per_sample._HookCapture, "_keep", poisoned)
        with pytest.raises(NonFiniteGradientError, match=r"sample 'm:1': non-finite gradient "
                                                         r"at layer 1 block V"):
            run()
        assert events == ["forward", "form", "forward", "m:0"]
    finally:
        hook.remove()


def test_lagged_fisher_reads_give_the_same_sums_and_errors(llama_model, monkeypatch):
    """per_sample.LAG_DEVICES (CUDA): without ``into``, a Fisher micro-batch is checked on
    the host once the next one is queued, from each parameter's sum of squares (its capture
    is freed at once). Run that way on the CPU, the total is bitwise the unlagged one and
    the losses and tokens are the same; a NaN in a sample of the first of three
    micro-batches is found only after the second micro-batch has run, and named (sample and
    parameter) by running the first again; a NaN the second run does not reproduce names
    the micro-batch's samples, as does (unlagged) a sum of squares that overflows while
    every gradient is finite."""
    from interference.gradients import CausalLMObjective, NonFiniteGradientError, PerSampleGradients
    from interference.gradients import per_sample

    idx = QKOVIndexer(llama_model, QKOVConfig.from_model(llama_model))
    batch = padded_batch(5, 10, 3, "m")

    eng = PerSampleGradients(llama_model, idx, CausalLMObjective(), engine="hooks", micro_batch=2)
    plain = [(t.clone(), loss, tok) for t, loss, tok in eng.square_sums(batch, batch["sample_ids"])]
    monkeypatch.setattr(per_sample, "LAG_DEVICES", {"cpu"})
    eng = PerSampleGradients(llama_model, idx, CausalLMObjective(), engine="hooks", micro_batch=2)
    lagged = [(t, loss, tok) for t, loss, tok in eng.square_sums(batch, batch["sample_ids"])]
    assert [x[1:] for x in lagged] == [x[1:] for x in plain] and len(plain) == 3
    assert torch.equal(lagged[-1][0], plain[-1][0])

    m1 = CausalLMObjective().split(batch)[1]["input_ids"]
    seen = {}
    hook = llama_model.get_input_embeddings().register_forward_pre_hook(
        lambda mod, args: seen.update(ids=args[0]))
    keep, formed = per_sample._HookCapture._keep, []

    def poisoned(self, n, g, every_run):
        formed.append(g.shape[0])
        ids = seen["ids"]
        m1_second = ids.shape[0] > 1 and torch.equal(ids[1, :len(m1)], m1)
        if n.endswith("layers.1.self_attn.v_proj.weight") and m1_second and \
                (every_run or len(formed) <= len(idx.param_names)):
            g = g.clone()
            g[1, 0, 0] = float("nan")
        return keep(self, n, g)
    try:
        requires = llama_model.model.layers[0].self_attn.q_proj.weight.requires_grad
        monkeypatch.setattr(per_sample._HookCapture, "_keep",
                            lambda self, n, g: poisoned(self, n, g, True))
        eng = PerSampleGradients(llama_model, idx, CausalLMObjective(), engine="hooks",
                                 micro_batch=2)
        with pytest.raises(NonFiniteGradientError, match=r"sample 'm:1': non-finite gradient of "
                                                         r"model\.layers\.1\.self_attn\.v_proj"):
            list(eng.square_sums(batch, batch["sample_ids"]))
        # raised after the second micro-batch, having formed v_proj's gradients of the first again
        assert len(formed) == 2 * len(idx.param_names) + 1
        # the nested run left the model's gradient flags as they were
        assert llama_model.model.layers[0].self_attn.q_proj.weight.requires_grad == requires
        formed.clear()
        monkeypatch.setattr(per_sample._HookCapture, "_keep",
                            lambda self, n, g: poisoned(self, n, g, False))
        with pytest.raises(NonFiniteGradientError, match=r"v_proj\.weight's gradients in samples "
                                                         r"\['m:0', 'm:1'\] do not sum to a "
                                                         r"finite number, yet each sample's "
                                                         r"gradient is finite when"):
            list(eng.square_sums(batch, batch["sample_ids"]))
    finally:
        hook.remove()

    # every gradient finite but a sum of squares not (a float64 overflow): named as such
    monkeypatch.setattr(per_sample._HookCapture, "_keep", keep)
    monkeypatch.setattr(per_sample, "LAG_DEVICES", set())
    square_sum = per_sample.square_sum

    def overflowing(g):
        acc = square_sum(g)
        if g.shape[1:] == llama_model.model.layers[0].self_attn.o_proj.weight.shape:
            acc[0, 0] = float("inf")
        return acc
    monkeypatch.setattr(per_sample, "square_sum", overflowing)
    with pytest.raises(NonFiniteGradientError, match=r"in samples \['m:0', 'm:1'\] do not sum "
                                                     r"to a finite number, yet each sample's "
                                                     r"gradient is finite$"):
        list(eng.square_sums(batch, batch["sample_ids"]))
