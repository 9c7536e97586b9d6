"""The score contraction out[a,b,h] = Σ_s f(left)·w·g(right): both backends against a
float64 einsum. Without a GPU the Triton kernel runs in Triton's interpreter (conftest)."""
from __future__ import annotations

import pytest
import torch

from interference.device import triton_available
from interference.scores.contraction import (LEFT_OPS, RIGHT_OPS, apply_op, contract,
                                             contract_sets, contract_triton, emulate_bf16x3,
                                             head_contraction)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch"] + (["triton"] if triton_available(DEVICE) else [])
# the default 'bf16x3' keeps 16 bits per operand (<= 2^-16 relative per term); few terms
# average little, so on a GPU the kernel is held to 3e-5 (float32 paths: 1e-6)
TOL = {"torch": 1e-6, "triton": 3e-5 if DEVICE.type == "cuda" else 1e-6}
F64 = {"square": torch.square, "identity": lambda t: t, "abs": torch.abs}


def reference(left, right, weight, left_op, right_op):
    return torch.einsum("ahs,hs,bhs->abh", F64[left_op](left.double()), weight.double(),
                        F64[right_op](right.double()))


def operands(a, b, h, s, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(a, h, s, generator=g).to(dtype)
    right = torch.randn(b, h, s, generator=g).to(dtype)
    weight = torch.rand(h, s, generator=g) + 0.1
    return left.to(DEVICE), right.to(DEVICE), weight.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("left_op", LEFT_OPS)
@pytest.mark.parametrize("right_op", RIGHT_OPS)
# shapes: tile edges (a, b not multiples of the tile), one row (fisher_weighted), a slice
# axis split into several chunks with a short last chunk, a single head
@pytest.mark.parametrize("shape", [(5, 7, 3, 100), (1, 9, 2, 70), (33, 20, 2, 257), (3, 2, 1, 1000)])
def test_contraction_matches_float64(backend, left_op, right_op, shape):
    left, right, weight = operands(*shape)
    got = contract(left, right, weight, left_op, right_op, backend=backend).cpu().double()
    want = reference(left.cpu(), right.cpu(), weight.cpu(), left_op, right_op)
    assert got.shape == (shape[0], shape[1], shape[2])
    assert ((got - want).abs().max() / want.abs().max()).item() < TOL[backend]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("left_op", LEFT_OPS)
def test_contract_sets_is_each_sets_own_contraction_bitwise(backend, left_op):
    """Task A's rows against several sets (B, A', R; each with its own g): the torch path
    forms f(left)·w once, and every result equals its own contract() call bit for bit and
    the float64 reference; mismatched operands are refused as by contract()."""
    left, right, weight = operands(6, 7, 3, 150, seed=11)
    others = [operands(6, n, 3, 150, seed=12 + n)[1] for n in (4, 1)]
    rights = [(right, "abs"), (others[0], "identity"), (others[1], "abs")]
    got = contract_sets(left, rights, weight, left_op, backend=backend)
    for out, (r, g) in zip(got, rights):
        assert torch.equal(out, contract(left, r, weight, left_op, g, backend=backend))
        want = reference(left.cpu(), r.cpu(), weight.cpu(), left_op, g)
        assert ((out.cpu().double() - want).abs().max() / want.abs().max()).item() < TOL[backend]
    with pytest.raises(ValueError, match="shapes do not match"):
        contract_sets(left, [(right, "abs"), (right[:, :2], "abs")], weight, left_op,
                      backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("left_op", LEFT_OPS)
def test_contract_sets_writing_over_its_operands_gives_the_same_bits(backend, left_op):
    """overwrite=True (rows rebuilt for the call): every result is bitwise the one without
    it; the torch path leaves f(left)·w and g(right) in the operands' memory, the fused
    kernel reads them only."""
    left, right, weight = operands(6, 7, 3, 150, seed=11)
    other = operands(6, 4, 3, 150, seed=16)[1]
    want = contract_sets(left, [(right, "abs"), (other, "identity")], weight, left_op,
                         backend=backend)
    mine = [t.clone() for t in (left, right, other)]
    got = contract_sets(mine[0], [(mine[1], "abs"), (mine[2], "identity")], weight, left_op,
                        backend=backend, overwrite=True)
    for out, ref in zip(got, want):
        assert torch.equal(out, ref)
    if backend == "torch":
        assert torch.equal(mine[0], apply_op(left_op, left) * weight)
        assert torch.equal(mine[1], right.abs()) and torch.equal(mine[2], other)
    else:
        assert all(torch.equal(a, b) for a, b in zip(mine, (left, right, other)))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("waves", [1, 3, 8, 40])
def test_triton_chunks_of_the_slice_axis_add_up(waves):
    """More programs per SM split the slice axis into more chunks (the last one short, or
    more chunks than BLOCK_K steps): each chunk's partial covers its part exactly once."""
    left, right, weight = operands(3, 5, 1, 1000, seed=7)
    want = reference(left.cpu(), right.cpu(), weight.cpu(), "square", "abs")
    got = contract_triton(left, right, weight, tiles={"waves": waves, "block_k": 32})
    assert ((got.cpu().double() - want).abs().max() / want.abs().max()).item() < TOL["triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_contraction_takes_views_and_low_precision_storage(backend):
    """Non-contiguous views (a head slice of a bigger store) and bfloat16 stored gradients:
    the kernel upcasts on load, as the torch path does."""
    left, right, weight = operands(4, 6, 5, 96, seed=3)
    lv, rv, wv = left[:, 1:4], right[:, 1:4], weight[1:4]
    want = reference(lv.cpu(), rv.cpu(), wv.cpu(), "square", "abs")
    got = contract(lv, rv, wv, backend=backend).cpu().double()
    assert ((got - want).abs().max() / want.abs().max()).item() < TOL[backend]
    lb, rb = lv.to(torch.bfloat16), rv.to(torch.bfloat16)
    want_b = reference(lb.cpu().float(), rb.cpu().float(), wv.cpu(), "square", "abs")
    got_b = contract(lb, rb, wv, backend=backend).cpu().double()
    assert ((got_b - want_b).abs().max() / want_b.abs().max()).item() < TOL[backend]


@pytest.mark.parametrize("left_op", LEFT_OPS)
def test_bf16x3_arithmetic_is_accurate_to_about_1e5(left_op):
    """The 'bf16x3' split (two bfloat16 parts per operand, three products) against float64,
    on gradient-like heavy-tailed data; on a GPU the kernel itself is compared too."""
    g = torch.Generator().manual_seed(5)
    left = torch.randn(6, 3, 4096, generator=g) * torch.rand(6, 3, 4096, generator=g) ** 4
    right = torch.randn(5, 3, 4096, generator=g)
    weight = 1 / (torch.rand(3, 4096, generator=g) + 1e-3)
    want = reference(left, right, weight, left_op, "abs")
    got = emulate_bf16x3(left, right, weight, left_op, "abs").double()
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-5
    if DEVICE.type == "cuda":
        kern = contract(left.cuda(), right.cuda(), weight.cuda(), left_op, "abs",
                        backend="triton", precision="bf16x3").cpu().double()
        assert ((kern - want).abs().max() / want.abs().max()).item() < 3e-5


def test_split_gemm_equals_einsum():
    left, right, _ = operands(6, 5, 3, 3 * 4096, seed=1)     # s splits into 3 chunks
    want = torch.einsum("ahs,bhs->abh", left.double(), right.double())
    got = head_contraction(left, right).double()
    # signed terms cancel: float32 sums of 4096 of them carry ~1e-6 of the largest cell
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_bad_input_is_named():
    left, right, weight = operands(2, 3, 2, 10)
    with pytest.raises(ValueError, match="shapes do not match"):
        contract(left, right[:, :1], weight)
    with pytest.raises(ValueError, match="left_op"):
        contract(left, right, weight, left_op="cube")
    with pytest.raises(ValueError, match="backend"):
        contract(left, right, weight, backend="numpy")
