"""The one contraction behind every score: per head h,

    out[a, b, h] = Σ_s  f(left[a, h, s]) · w[h, s] · g(right[b, h, s])

with f ∈ {square, identity, abs} applied to task A's gradients (C_i = g_i², SPEC 5),
w = 1 / D the Fisher normaliser, and g ∈ {abs, identity} applied to task B's.

Two implementations, equal to float32 rounding at the default precision
(tests/test_contraction.py):

- ``torch``: forms f(left)·w and g(right) as tensors, then one batched GEMM over
  (head, slice chunk) (``head_contraction``). Any device.
- ``triton``: one fused kernel on CUDA. Each program loads a tile of task-A rows, a tile of
  task-B rows and the matching slice of w, applies f, w and g in registers and feeds the
  tensor cores, so the operands are read from memory once and nothing else is written
  (B1 in benchmarks/RESULTS.md). Each program sums one chunk of the slice axis into its own
  partial; the partials are added in a fixed order, so results are deterministic.

``contract(..., backend='auto')`` takes triton on CUDA when it is importable, else torch.
Measured on an H200 for the B1 map (100 x 100 pairs, GPT-2-small attention): torch 47 ms,
triton 'bf16x3' (the default) 8.9 ms and 'tf32x3' 13.0 ms, both within 7e-7 of float64
(largest cell error relative to the block's largest score); the memory-bandwidth floor is
5.3 ms (benchmarks/RESULTS.md).

Triton's CPU interpreter mis-handles bfloat16 dots, so there 'bf16x3' runs as 'ieee'; the
kernel's 'bf16x3' is checked against float64 on a GPU (benchmarks/check_cuda.py,
tests/test_contraction.py) and its arithmetic on the CPU by ``emulate_bf16x3``.
"""
from __future__ import annotations

import functools

import torch

from ..device import triton_available

LEFT_OPS = ("square", "identity", "abs")
RIGHT_OPS = ("abs", "identity")
PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16x3")

try:  # Triton is optional: present with CUDA builds of torch, and in the dev extras
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - absent, or broken (no compiler): torch path
    triton = None


def _split_factor(size: int, target: int = 4096) -> int:
    """Largest c with size % c == 0 and size / c >= target (1 when size is small)."""
    for c in range(max(1, size // target), 0, -1):
        if size % c == 0:
            return c
    return 1


def head_contraction(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """einsum('ahs,bhs->abh') as one batched GEMM over (head, slice chunk).

    left [a, h, s], right [b, h, s] -> [a, b, h]. The slice axis s (up to 10^5..10^6) is
    split into c chunks so the GEMM has h·c independent [a x s/c] @ [s/c x b] products
    (a 100 x 100 output per head alone leaves most of a GPU idle), then summed over c.
    """
    a, h, s = left.shape
    b = right.shape[0]
    c = _split_factor(s)
    lhs = left.reshape(a, h * c, s // c).transpose(0, 1)            # [h·c, a, s/c]
    rhs = right.reshape(b, h * c, s // c).permute(1, 2, 0)          # [h·c, s/c, b]
    return torch.bmm(lhs, rhs).view(h, c, a, b).sum(1).permute(1, 2, 0)


def apply_op(op: str, x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """f or g of the contraction: 'square', 'abs' or 'identity' of x; ``in_place``: written
    over x (the same values, no second tensor of x's size)."""
    if in_place:
        return {"square": torch.Tensor.square_, "abs": torch.Tensor.abs_,
                "identity": lambda t: t}[op](x)
    return {"square": torch.square, "abs": torch.abs, "identity": lambda t: t}[op](x)


def weighted_left(left, weight, left_op="square", in_place: bool = False) -> torch.Tensor:
    """f(left)·w [a, h, s]: the torch path's task-A operand (``in_place``: in left's memory)."""
    if in_place:
        return apply_op(left_op, left, in_place=True).mul_(weight)
    return apply_op(left_op, left) * weight


def contract_torch(left, right, weight, left_op="square", right_op="abs") -> torch.Tensor:
    """Reference path: [a, h, s], [b, h, s], [h, s] -> [a, b, h] float32."""
    return head_contraction(weighted_left(left, weight, left_op), apply_op(right_op, right))


if triton is not None:
    @triton.jit
    def _contract_kernel(A, B, W, OUT, n_a, n_b, n_h, s, chunk,
                         stride_an, stride_ah, stride_bn, stride_bh, stride_wh,
                         LEFT_OP: tl.constexpr, RIGHT_OP: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # grid: (tiles of the a x b output, heads, chunks of the slice axis)
        tile, h, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tiles_n = tl.cdiv(n_b, BLOCK_N)
        rm = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_rows = A + h.to(tl.int64) * stride_ah + rm.to(tl.int64)[:, None] * stride_an
        b_rows = B + h.to(tl.int64) * stride_bh + rn.to(tl.int64)[:, None] * stride_bn
        w_row = W + h.to(tl.int64) * stride_wh
        k_start = c * chunk
        k_stop = tl.minimum(k_start + chunk, s)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_start, k_stop, BLOCK_K):
            kk = k + rk
            in_k = kk < k_stop
            x = tl.load(a_rows + kk[None, :], mask=(rm[:, None] < n_a) & in_k[None, :], other=0.0)
            y = tl.load(b_rows + kk[None, :], mask=(rn[:, None] < n_b) & in_k[None, :], other=0.0)
            w = tl.load(w_row + kk, mask=in_k, other=0.0)
            x = x.to(tl.float32)
            y = y.to(tl.float32)
            if LEFT_OP == 0:
                x = x * x
            elif LEFT_OP == 2:
                x = tl.abs(x)
            if RIGHT_OP == 0:
                y = tl.abs(y)
            x = x * w[None, :]
            if PRECISION == "bf16x3":
                # x ≈ x_hi + x_lo in bfloat16 (16 significant bits); the small cross terms
                # first, x_lo·y_lo (~2^-16 relative) dropped
                x_hi = x.to(tl.bfloat16)
                x_lo = (x - x_hi.to(tl.float32)).to(tl.bfloat16)
                y_hi = y.to(tl.bfloat16)
                y_lo = (y - y_hi.to(tl.float32)).to(tl.bfloat16)
                # the tensor cores accumulate one step only; the running sum is an IEEE
                # float32 add (passing acc into the bfloat16 MMAs lost ~2^-11 over 10^5 terms)
                part = tl.dot(x_lo, tl.trans(y_hi))
                part = tl.dot(x_hi, tl.trans(y_lo), part)
                acc += tl.dot(x_hi, tl.trans(y_hi), part)
            else:
                acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
        out = OUT + ((c * n_h + h).to(tl.int64) * n_a + rm[:, None]) * n_b + rn[None, :]
        tl.store(out, acc, mask=(rm[:, None] < n_a) & (rn[None, :] < n_b))


def _num_chunks(s: int, block_k: int, programs_per_chunk: int, target_programs: int) -> int:
    """Chunks of the slice axis so the grid has about ``target_programs`` programs."""
    want = max(1, target_programs // max(programs_per_chunk, 1))
    return max(1, min(want, triton.cdiv(s, block_k)))


def contract_triton(left, right, weight, left_op="square", right_op="abs",
                    precision: str = "bf16x3", tiles: dict | None = None) -> torch.Tensor:
    """Fused kernel: [a, h, s], [b, h, s], [h, s] -> [a, b, h] float32.

    ``precision``: how tl.dot multiplies the float32 operands: 'bf16x3' (each operand split
    into two bfloat16 parts, three products: 16 significant bits per operand, at most
    2^-16 relative per term; the fastest accurate choice), 'tf32x3' (the same with TF32
    parts: 2^-21 per term, 1.6x slower), 'ieee' (float32 FMA, no tensor cores) or 'tf32'
    (one TF32 product, ~1e-3 relative: not for results).
    ``tiles``: overrides of the launch configuration (keys block_m, block_n, block_k,
    num_warps, num_stages, waves), for benchmarks/tune_contraction.py."""
    if triton is None:
        raise RuntimeError("the triton backend needs the triton package")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not left.is_cuda and precision == "bf16x3":
        precision = "ieee"   # Triton's CPU interpreter computes bfloat16 dots wrongly
    n_a, n_h, s = left.shape
    n_b = right.shape[0]
    left, right, weight = (t if t.stride(-1) == 1 else t.contiguous()
                           for t in (left, right, weight))
    cfg, n_tiles, chunks, chunk = _launch(n_a, n_b, n_h, s, _multiprocessors(left.device),
                                          tuple(sorted((tiles or {}).items())))
    partial = torch.empty((chunks, n_h, n_a, n_b), dtype=torch.float32, device=left.device)
    _contract_kernel[(n_tiles, n_h, chunks)](
        left, right, weight, partial, n_a, n_b, n_h, s, chunk,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), weight.stride(0),
        LEFT_OP=LEFT_OPS.index(left_op), RIGHT_OP=RIGHT_OPS.index(right_op),
        PRECISION=precision, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (partial[0] if chunks == 1 else partial.sum(0)).permute(1, 2, 0)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """The card's multiprocessors (1 in the interpreter, TRITON_INTERPRET=1: few programs
    keep it quick)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1024)   # the same shapes come once per (layer, block)
def _launch(n_a: int, n_b: int, n_h: int, s: int, sms: int, tiles: tuple = ()
            ) -> tuple[dict, int, int, int]:
    """(tile configuration, output tiles, chunks of the slice axis, chunk length) of one
    contraction; ``tiles``: (key, value) overrides of the configuration. Read-only: the
    dictionary is shared between calls."""
    cfg = {"block_m": min(128, max(16, triton.next_power_of_2(n_a))),
           "block_n": min(128, max(16, triton.next_power_of_2(n_b))),
           "block_k": 64, "num_stages": 3, "waves": 1}   # tuned on an H200 (RESULTS.md)
    cfg["num_warps"] = 8 if cfg["block_m"] * cfg["block_n"] >= 128 * 128 else 4
    cfg.update(dict(tiles))
    n_tiles = triton.cdiv(n_a, cfg["block_m"]) * triton.cdiv(n_b, cfg["block_n"])
    chunks = _num_chunks(s, cfg["block_k"], n_tiles * n_h, cfg["waves"] * sms)
    chunk = triton.cdiv(triton.cdiv(s, chunks), cfg["block_k"]) * cfg["block_k"]
    return cfg, n_tiles, triton.cdiv(s, chunk), chunk


def emulate_bf16x3(left, right, weight, left_op="square", right_op="abs") -> torch.Tensor:
    """What the kernel's 'bf16x3' computes, in plain torch: x = f(left)·w and y = g(right)
    split into bfloat16 hi + lo parts, hi·hi + hi·lo + lo·hi summed in float64."""
    x = apply_op(left_op, left.float()) * weight.float()
    y = apply_op(right_op, right.float())
    parts = []
    for t in (x, y):
        hi = t.to(torch.bfloat16).float()
        parts.append((hi.double(), (t - hi).to(torch.bfloat16).double()))
    (xh, xl), (yh, yl) = parts
    e = "ahs,bhs->abh"
    return (torch.einsum(e, xh, yh) + torch.einsum(e, xh, yl) + torch.einsum(e, xl, yh)).float()


def contract(left, right, weight, left_op="square", right_op="abs", backend="auto",
             precision="bf16x3") -> torch.Tensor:
    """out[a, b, h] = Σ_s f(left[a,h,s]) · weight[h,s] · g(right[b,h,s]), float32.

    left [a, h, s] (a may be 1), right [b, h, s], weight [h, s], all on one device.
    backend: 'auto' (triton on CUDA when available, else torch), 'torch' or 'triton'."""
    _check(left, right, weight, left_op, right_op)
    backend = _backend(left, backend)
    if backend == "triton":
        if not triton_available(left.device):
            raise RuntimeError("backend='triton' needs CUDA (or TRITON_INTERPRET=1) and triton")
        return contract_triton(left, right, weight, left_op, right_op, precision)
    if backend != "torch":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return contract_torch(left.float(), right.float(), weight.float(), left_op, right_op)


def contract_sets(left, rights, weight, left_op="square", backend="auto",
                  precision="bf16x3", overwrite: bool = False) -> list[torch.Tensor]:
    """[contract(left, right, weight, left_op, right_op, ...) for (right, right_op) in
    rights]: task A's rows against several sets of rows (B, A', R). The torch path forms
    f(left)·w once for all of them instead of once per set (the same values: each result
    is bitwise its own call's; on the default run's stores, 2 CPU threads, both arms and
    the reference 28.0-28.5 -> 22.6-23.3 s); the fused kernel applies f and w in
    registers per call anyway.

    ``overwrite``: the caller gives up the float32 operands (rows rebuilt for this call):
    the torch path writes f(left)·w and g(right) over them instead of into new tensors,
    the same values without a second pass of fresh memory per operand (on the default
    run's rows, 2 CPU threads: |right| 32 -> 7 ms for 144 rows of Q)."""
    for right, right_op in rights:
        _check(left, right, weight, left_op, right_op)
    if _backend(left, backend) != "torch":
        return [contract(left, right, weight, left_op, right_op, backend, precision)
                for right, right_op in rights]
    def mine(t):                 # operands written over: float32 ones the caller gave up
        return overwrite and t.dtype == torch.float32

    x = weighted_left(left.float(), weight.float(), left_op, in_place=mine(left))
    return [head_contraction(x, apply_op(right_op, right.float(), in_place=mine(right)))
            for right, right_op in rights]


def _check(left, right, weight, left_op: str, right_op: str) -> None:
    """ValueError for an unknown f or g, or operands whose (head, slice) shapes differ."""
    if left_op not in LEFT_OPS or right_op not in RIGHT_OPS:
        raise ValueError(f"left_op in {LEFT_OPS}, right_op in {RIGHT_OPS}; got "
                         f"{left_op!r}, {right_op!r}")
    if left.shape[1:] != right.shape[1:] or weight.shape != left.shape[1:]:
        raise ValueError(f"shapes do not match: left {tuple(left.shape)}, right "
                         f"{tuple(right.shape)}, weight {tuple(weight.shape)}")


def warm_up(device: torch.device, n_a: int, n_bs, head_counts, left_op="square",
            right_op="abs", backend="auto", precision="bf16x3") -> None:
    """Compile the fused kernel for the contractions of ``n_a`` left rows against ``n_b``
    right rows (each of ``n_bs``) with ``n_h`` heads (each of ``head_counts``), so that the
    first real ones find it compiled: Triton compiles one kernel per class of the integer
    arguments (1, divisible by 16, other) and per tile sizes (set by n_a and n_b), which
    these operands of 64 entries a head share with any slice length divisible by 16.
    Nothing to do where :func:`contract` runs no kernel."""
    if _backend(torch.empty(0, device=device), backend) != "triton" or \
            not triton_available(device):
        return
    for n_h in sorted(set(head_counts)):
        weight = torch.zeros(n_h, 64, device=device)
        left = torch.zeros(n_a, n_h, 64, device=device)
        for n_b in sorted(set(n_bs)):
            contract_triton(left, torch.zeros(n_b, n_h, 64, device=device), weight,
                            left_op, right_op, precision)


def _backend(left, backend: str) -> str:
    """'auto' resolved: triton on CUDA when it is importable, else torch."""
    if backend == "auto":
        return "triton" if (left.is_cuda and triton is not None) else "torch"
    return backend
