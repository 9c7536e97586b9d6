"""The dense arithmetic of per-sample gradients, shared by the engine and the factored store.

- :func:`weight_grads`: per-sample weight gradients Σ_t δ_t x_tᵀ [n, out, in] in float32
  from a projection's inputs x [n, T, in] and output gradients δ [n, T, out], as the hooks
  engine forms them (the factored store rebuilds its parts of them, in head-major layouts,
  with the same :func:`lowp_bmm` and :func:`tf32_if_exact`). From bfloat16/float16 factors
  every product is exact in float32 and the sums accumulate in float32, on CUDA in one
  tensor-core matmul writing float32 (``torch.bmm(out_dtype=)``).
- :func:`square_sum`: Σ_k g_k² [*shape] in float64 of per-sample gradients g [n, *shape]
  added in sample order (the Fisher samples' sums), on CUDA in one Triton kernel
  (``triton_squares``) instead of one launch per sample.
"""
from __future__ import annotations

import contextlib

import torch

from ..device import triton_available
from .objectives import upcast

LOW = (torch.bfloat16, torch.float16)
# devices whose 16-bit matmuls can write float32 (torch.bmm(..., out_dtype=)): a product
# of two bfloat16/float16 values is exact in float32 and the sums accumulate in float32, as
# in the TF32 matmul of their float32 copies, without making the copies (B2, session 17)
LOWP_OUT_DEVICES = {"cuda"}
_LOWP_OK: dict[tuple[str, torch.dtype], bool] = {}
# devices where square_sum runs as one Triton kernel (else a multiply-add per sample, over
# blocks on SQUARE_SUM_BLOCK_DEVICES)
SQUARE_SUM_DEVICES = {"cuda"}
# devices where square_sum's loop runs over blocks of SQUARE_SUM_CPU_BLOCK entries a thread,
# all samples added into a block before the next, so that its float64 sums and copies stay
# in the thread's cache rather than travel to memory once a sample
# (benchmarks/results/default_cpu/square_sum_blocks_s28.py)
SQUARE_SUM_BLOCK_DEVICES = {"cpu"}
SQUARE_SUM_CPU_BLOCK = 1 << 16


def lowp_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 [n, i, j] = a [n, i, t] @ b [n, t, j] of 16-bit operands."""
    return torch.bmm(a, b, out_dtype=torch.float32)


def lowp_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`lowp_bmm` runs for ``dtype`` on ``device`` (probed once: the
    ``out_dtype`` argument is recent and CUDA-only)."""
    if device.type not in LOWP_OUT_DEVICES or dtype not in LOW:
        return False
    key = (device.type, dtype)
    if key not in _LOWP_OK:
        one = torch.ones(1, 1, 1, dtype=dtype, device=device)
        try:
            _LOWP_OK[key] = lowp_bmm(one, one).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _LOWP_OK[key] = False
    return _LOWP_OK[key]


@contextlib.contextmanager
def tf32_if_exact(x_dtype: torch.dtype, d_dtype: torch.dtype, cuda: bool):
    """Allow TF32 tensor-core matmuls while forming Σ_t δ_t x_tᵀ from the float32 copies of
    bfloat16/float16 activations: every such value is exact in TF32 (8-bit exponent, 10-bit
    mantissa), so the products are exact and the sum accumulates in float32 as before, at
    tensor-core speed (B3 in benchmarks/RESULTS.md). Float32 models keep float32 matmuls."""
    if not (cuda and x_dtype in LOW and d_dtype in LOW):
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def weight_grads(x: torch.Tensor, delta: torch.Tensor, transposed: bool = False
                 ) -> torch.Tensor:
    """Per-sample Σ_t δ_t x_tᵀ: [n, out, in] (``transposed``: [n, in, out], the layout of
    GPT-2's Conv1D weights) in float32 (float64 for float64 factors), from x [n, T, in] and
    δ [n, T, out] of one dtype or two."""
    if x.dtype == delta.dtype and lowp_ok(x.device, x.dtype):
        return lowp_bmm(x.transpose(1, 2), delta) if transposed \
            else lowp_bmm(delta.transpose(1, 2), x)
    xf, df = upcast(x), upcast(delta)
    with tf32_if_exact(x.dtype, delta.dtype, x.is_cuda):
        return torch.einsum("nti,nto->nio", xf, df) if transposed \
            else torch.einsum("nto,nti->noi", df, xf)


def square_sum(g: torch.Tensor) -> torch.Tensor:
    """Σ_k g_k ⊙ g_k [*shape] float64 of ``g`` [n, *shape] (float32 or float64), the squares
    added in sample order: the square of a float32 value is exact in float64, so each step
    rounds once, and the result is bitwise the loop ``acc.addcmul_(g_k, g_k)`` over k (no
    float64 copy of ``g``). On a device of SQUARE_SUM_DEVICES with triton (or in triton's
    CPU interpreter, TRITON_INTERPRET=1, for tests), one kernel; else that loop, on a
    device of SQUARE_SUM_BLOCK_DEVICES over blocks of entries."""
    if g.dtype == torch.float32 and g.device.type in SQUARE_SUM_DEVICES and \
            triton_available(g.device):
        from . import triton_squares
        return triton_squares.square_sum(g)
    acc = torch.zeros(g.shape[1:], dtype=torch.float64, device=g.device)
    if g.device.type not in SQUARE_SUM_BLOCK_DEVICES:      # one launch a sample
        for gk in g:
            acc.addcmul_(gk, gk)
        return acc
    flat, out = g.reshape(len(g), -1), acc.view(-1)
    step = SQUARE_SUM_CPU_BLOCK * torch.get_num_threads()
    wide = torch.empty(min(step, out.numel()), dtype=torch.float64, device=g.device)
    for start in range(0, out.numel(), step):
        block = out[start:start + step]
        gk64 = wide[:block.numel()]      # each g_k in float64 once, into one buffer
        for gk in flat[:, start:start + step]:
            gk64.copy_(gk)
            block.addcmul_(gk64, gk64)
    return acc


def warm_up_square_sum(device: torch.device, micro_batch: int) -> None:
    """Compile the square-sum kernel for micro-batches of ``micro_batch`` samples (Triton
    compiles a kernel per class of its integer arguments: 1, divisible by 16, other), on 16
    entries, so that a collection's first Fisher micro-batch finds it compiled. Nothing to
    do where :func:`square_sum` runs no kernel."""
    square_sum(torch.zeros(micro_batch, 16, device=device))
