"""interference.gradients.kernels against float64 loops: the Triton square-sum kernel runs
in Triton's CPU interpreter (conftest), the 16-bit float32-output matmul with a float64
stand-in on the CPU (the CUDA kernels themselves: benchmarks/check_cuda.py)."""
from __future__ import annotations

import pytest
import torch

from interference.architectures import QKOVConfig, QKOVIndexer
from interference.gradients import CausalLMObjective, FisherCollector, PerSampleGradients
from interference.gradients import kernels

from conftest import padded_batch, tiny_gpt2, tiny_llama


def _spread(shape, seed):
    """float32 values over 60 decades, with both signs: their squares' sums depend on the
    order they are added in."""
    g = torch.Generator().manual_seed(seed)
    mant = torch.randn(shape, generator=g, dtype=torch.float64)
    return (mant * 10.0 ** torch.randint(-30, 30, shape, generator=g)).float()


def _loop(g):
    """float64 Σ_k g_k² added in sample order, one sample at a time."""
    acc = torch.zeros(g.shape[1:], dtype=torch.float64)
    for gk in g:
        acc = acc + gk.double() * gk.double()
    return acc


def _spy_on_kernel(monkeypatch) -> list:
    """The grids the square-sum kernel is launched with, from now on."""
    from interference.gradients import triton_squares

    launched, real = [], triton_squares._square_sum_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]
    monkeypatch.setattr(triton_squares, "_square_sum_kernel", Spy())
    return launched


@pytest.mark.parametrize("shape", [(1, 7), (5, 3, 700), (16, 2100)])
def test_square_sum_kernel_is_bitwise_the_in_order_loop(monkeypatch, shape):
    """The Triton kernel (one program per 1024 entries, a ragged last one) and the
    multiply-add loop, whole or over blocks of entries (a ragged last one), all equal the
    float64 loop bitwise, NaN and Inf included."""
    g = _spread(shape, 0)
    g.view(-1)[3] = float("nan")
    g.view(-1)[-1] = float("inf")
    want = _loop(g)
    assert torch.equal(kernels.square_sum(g).isnan(), want.isnan())
    monkeypatch.setattr(kernels, "SQUARE_SUM_BLOCK_DEVICES", set())
    loop = kernels.square_sum(g)
    monkeypatch.setattr(kernels, "SQUARE_SUM_BLOCK_DEVICES", {"cpu"})
    monkeypatch.setattr(kernels, "SQUARE_SUM_CPU_BLOCK", max(1, 97 // torch.get_num_threads()))
    blocks = kernels.square_sum(g)
    monkeypatch.setattr(kernels, "SQUARE_SUM_DEVICES", {"cpu"})
    launched = _spy_on_kernel(monkeypatch)
    fused = kernels.square_sum(g)
    assert launched == [(-(-g[0].numel() // 1024),)]
    for got in (loop, blocks, fused):
        assert got.dtype == torch.float64 and got.shape == g.shape[1:]
        both_nan = got.isnan() & want.isnan()
        assert both_nan.sum() == want.isnan().sum()
        assert torch.equal(got[~both_nan], want[~both_nan])


def test_fisher_sums_by_the_kernel_equal_the_loops_bitwise(monkeypatch):
    """A Fisher collected with the square-sum kernel (GPT-2, biases included: weights
    [n, in, out] and biases [n, out]) is bitwise the one collected with the loop."""
    model = tiny_gpt2()
    cfg = QKOVConfig.from_model(model, include_bias=True)
    b = padded_batch(6, 10, 7, "m:s")

    def fisher():
        fc = FisherCollector(config=cfg, micro_batch=4)
        fc.collect_fisher(model, b, task="m", mode="mean", role="fisher")
        return fc.fisher.get("m")
    loop = fisher()
    monkeypatch.setattr(kernels, "SQUARE_SUM_DEVICES", {"cpu"})
    launched = _spy_on_kernel(monkeypatch)
    assert torch.equal(fisher(), loop)
    # one launch per parameter and micro-batch (6 samples in micro-batches of 4)
    assert len(launched) == 2 * len(QKOVIndexer(model, cfg).param_names)


def test_sixteen_bit_weight_grads_by_a_float32_output_matmul_in_both_layouts(monkeypatch):
    """Where 16-bit matmuls write float32 (kernels.LOWP_OUT_DEVICES: CUDA), δᵀx is one
    such product; with a float64 stand-in for it on the CPU, [n, out, in] and GPT-2's
    transposed [n, in, out] equal the float64 einsum within float32 rounding, and the
    stand-in sees the bfloat16 factors themselves (no float32 copies)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 5, generator=g).bfloat16()
    d = torch.randn(3, 9, 4, generator=g).bfloat16()
    want = torch.einsum("nto,nti->noi", d.double(), x.double())
    seen = []

    def product(a, b):
        seen.append((a.dtype, b.dtype))
        return torch.bmm(a.double(), b.double()).float()
    monkeypatch.setattr(kernels, "LOWP_OUT_DEVICES", {"cpu"})
    monkeypatch.setattr(kernels, "_LOWP_OK", {})
    monkeypatch.setattr(kernels, "lowp_bmm", product)
    assert kernels.lowp_ok(x.device, x.dtype)    # probed once, with the product itself
    seen.clear()
    for transposed in (False, True):
        got = kernels.weight_grads(x, d, transposed=transposed)
        ref = want.transpose(1, 2) if transposed else want
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
    # float32 and mixed factors take the einsum of their float32 copies
    seen.clear()
    kernels.weight_grads(x.float(), d.float())
    kernels.weight_grads(x, d.float())
    assert seen == []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_bf16_models_rows_by_the_float32_output_matmul_equal_the_einsums(monkeypatch, family):
    """The hooks engine on a bfloat16 model (LLaMA GQA; GPT-2 with Conv1D and biases): rows
    formed through the float32-output product (float64 stand-in) equal the TF32-free
    einsum's within float32 rounding, sample by sample."""
    model = (tiny_llama() if family == "llama" else tiny_gpt2()).bfloat16()
    idx = QKOVIndexer(model, QKOVConfig.from_model(model, include_bias=family == "gpt2"))
    b = padded_batch(5, 10, 3, "s")

    def rows():
        eng = PerSampleGradients(model, idx, CausalLMObjective(), engine="hooks", micro_batch=3)
        return torch.stack([s.vector for s in eng(b, b["sample_ids"])])
    want = rows()
    calls = []
    monkeypatch.setattr(kernels, "LOWP_OUT_DEVICES", {"cpu"})
    monkeypatch.setattr(kernels, "_LOWP_OK", {})
    monkeypatch.setattr(kernels, "lowp_bmm", lambda a, c: calls.append(a.dtype) or
                        torch.bmm(a.double(), c.double()).float())
    got = rows()
    assert calls and set(calls) == {torch.bfloat16}
    scale = want.abs().amax(1, keepdim=True)
    assert float(((got - want).abs() / scale).max()) <= 1e-5


def test_collecting_gradients_imports_no_triton():
    """The square-sum kernel's module (and triton, about 0.25 s) is imported only where the
    kernel runs: not by a CPU job that collects gradients."""
    import subprocess
    import sys

    code = ("import sys, interference.gradients.fisher, interference.gradients.per_sample; "
            "print(sorted(m for m in ('triton', 'interference.gradients.triton_squares') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
