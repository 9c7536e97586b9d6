"""The Triton kernel of :func:`interference.gradients.kernels.square_sum`, in a module of its
own: it is imported only where the kernel runs (importing triton takes about 0.25 s, which
every CPU job would otherwise pay)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _square_sum_kernel(G, OUT, n, m, stride_n, BLOCK: tl.constexpr):
    # each program: BLOCK entries, their float64 squares added over the n samples in order
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < m
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for k in range(0, n):
        g = tl.load(G + k * stride_n + cols, mask=inside, other=0.0).to(tl.float64)
        acc += g * g
    tl.store(OUT + cols, acc, mask=inside)


def square_sum(g: torch.Tensor) -> torch.Tensor:
    """Σ_k g_k ⊙ g_k [*shape] float64 of float32 ``g`` [n, *shape], in one launch."""
    n, shape = g.shape[0], g.shape[1:]
    flat = g.reshape(n, -1)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape[1], dtype=torch.float64, device=g.device)
    _square_sum_kernel[(triton.cdiv(flat.shape[1], BLOCK),)](
        flat, out, n, flat.shape[1], flat.stride(0), BLOCK=BLOCK)
    return out.view(shape)
