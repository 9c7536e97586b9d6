"""B1: scoring speed. 100 x 100 pairs, all 4 blocks and heads of a GPT-2-small-shaped
attention stack (12 layers, 12 heads, d = 768: 28.3M attention weights), from per-sample
gradients resident on the device; forming C_i / D and |g_j| is included.

    python benchmarks/bench_scoring.py --device cuda            # the B1 target (GPU)
    python benchmarks/bench_scoring.py --device cpu --n 16      # CPU, smaller n

Prints one JSON line: the time of each contraction path (the fused Triton kernel at each
precision, the unfused torch path in float32 and TF32), each one's error against a float64
computation of the same map, the memory-bandwidth floor, and the original algorithm's
per-pair time measured on the CPU on the same inputs with its extrapolation to n x n.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from original_baseline import original_pairwise_scores  # noqa: E402

from interference.device import triton_available  # noqa: E402
from interference.scores.contraction import contract  # noqa: E402


def make_inputs(n, layers, heads, head_dim, device, seed=0):
    """Head-major per-(layer, block) operands, as the gradient store hands them out:
    g [n, H, s] with s = head_dim * d."""
    d = heads * head_dim
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (layers, 4, n, heads, head_dim * d)
    ga = torch.randn(shape, generator=g).mul_(1e-3).to(device)
    gb = torch.randn(shape, generator=g).mul_(1e-3).to(device)
    fisher = torch.rand((layers, 4, heads, head_dim * d), generator=g).mul_(1e-6).to(device)
    return ga, gb, fisher


def ours(ga, gb, fisher, eps=1e-10, lam=1e-8, backend="auto", precision="bf16x3",
         dtype=torch.float32):
    """The library's contraction per (layer, block): Σ_s g_a² / D · |g_b| -> [L·4, a, b, H].
    dtype float64: the reference (torch path, float64 throughout)."""
    out = []
    for layer in range(ga.shape[0]):
        for b in range(4):
            w = (fisher[layer, b].to(dtype).clamp_min(eps) + lam).reciprocal()
            out.append(contract(ga[layer, b].to(dtype), gb[layer, b].to(dtype), w,
                                backend=backend, precision=precision)
                       if dtype == torch.float32 else
                       torch.einsum("ahs,hs,bhs->abh", ga[layer, b].to(dtype).square(), w,
                                    gb[layer, b].to(dtype).abs()))
    return torch.stack(out)


def timed(fn, device, repeats=5):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return min(times)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--baseline-pairs", type=int, default=2)
    ap.add_argument("--bandwidth-gbs", type=float, default=None,
                    help="measured device copy bandwidth (GB/s, read+write) for the floor")
    args = ap.parse_args(argv)
    L, H, dh, n = args.layers, args.heads, args.head_dim, args.n
    ga, gb, fisher = make_inputs(n, L, H, dh, args.device)
    P = L * 4 * H * dh * H * dh
    paths = {"torch_fp32": ("torch", "ieee", False), "torch_tf32": ("torch", "ieee", True)}
    if triton_available(torch.device(args.device)):
        paths.update({f"triton_{p}": ("triton", p, False)
                      for p in ("bf16x3", "tf32x3", "ieee", "tf32")})
    ref = ours(ga[:, :, :8], gb, fisher, dtype=torch.float64)   # 8 x n rows: a float64 check
    times, errors = {}, {}
    for name, (backend, precision, tf32) in paths.items():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        times[name] = timed(lambda: ours(ga, gb, fisher, backend=backend, precision=precision),
                            args.device)
        got = ours(ga[:, :, :8], gb, fisher, backend=backend, precision=precision).double()
        errors[name] = float(((got - ref).abs().amax(dim=(1, 2, 3)) /
                              ref.abs().amax(dim=(1, 2, 3))).max())
    torch.backends.cuda.matmul.allow_tf32 = False
    default = "triton_bf16x3" if "triton_bf16x3" in times else "torch_fp32"
    t_ours = times[default]

    # bandwidth: a device-to-device copy of the operands
    if args.bandwidth_gbs is None:
        t_copy = timed(lambda: ga.clone(), args.device)
        bw = 2 * ga.numel() * 4 / t_copy / 1e9
    else:
        bw = args.bandwidth_gbs
    # floor: read g_A, g_B, Î once (the minimum any implementation must touch)
    floor_bytes = (2 * n * P + P) * 4
    floor = floor_bytes / (bw * 1e9)

    # correctness of ours vs the original loop on a few pairs, and its per-pair time
    k = args.baseline_pairs
    d = H * dh
    def dicts(g, i):
        return {f"L{l}.{B}": (g[l, b, i].reshape(H * dh, d).cpu() if B != "O" else
                              g[l, b, i].reshape(H, dh, d).permute(2, 0, 1).reshape(d, H * dh).cpu())
                for l in range(L) for b, B in enumerate("QKVO")}
    fdict = {f"L{l}.{B}": (fisher[l, b].reshape(H * dh, d).cpu() if B != "O" else
                           fisher[l, b].reshape(H, dh, d).permute(2, 0, 1).reshape(d, H * dh).cpu())
             for l in range(L) for b, B in enumerate("QKVO")}
    A = [dicts(ga, i) for i in range(k)]
    B = [dicts(gb, j) for j in range(1)]
    t0 = time.perf_counter()
    base = original_pairwise_scores(A, B, fdict, L, H, dh)
    t_pair = (time.perf_counter() - t0) / (k * 1)
    res = ours(ga[:, :, :k], gb[:, :, :1], fisher, backend="torch").cpu()
    err = max(abs(res[l * 4 + b, i, 0, h].item() - base[(i, 0, l, h, Bk)]) /
              abs(base[(i, 0, l, h, Bk)]) for i in range(k) for l in range(L)
              for b, Bk in enumerate("QKVO") for h in range(H))
    t_base = t_pair * n * n
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    print(json.dumps({
        "benchmark": "B1 scoring", "device": dev_name, "n": n, "attention_weights": P,
        "default_path": default, "ours_s": t_ours, "times_s": times,
        "max_rel_err_vs_float64": errors, "bandwidth_GBps": bw, "floor_s": floor,
        "ours_over_floor": t_ours / floor, "baseline_per_pair_s": t_pair,
        "baseline_extrapolated_s": t_base, "speedup": t_base / t_ours,
        "max_rel_err_vs_baseline": err, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
