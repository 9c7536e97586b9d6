"""square_sum on the CPU: the in-order loop over whole tensors (before session 28) against
the loop over blocks of SQUARE_SUM_CPU_BLOCK entries a thread, each g_k's block copied once
into a float64 buffer (kernels.square_sum now), on
the Fisher path's per-sample gradients of the default model (SmolLM2-135M: q/o_proj
576 x 576, k/v_proj 192 x 576) and GPT-2 small's c_attn (768 x 2304), micro-batches of 16
and 8; the results are checked bitwise equal. Medians of 15 calls, milliseconds.

    PYTHONPATH=src python benchmarks/results/default_cpu/square_sum_blocks_s28.py
"""
import platform
import statistics
import time

import torch

from interference.gradients.kernels import square_sum


def whole(g):
    acc = torch.zeros(g.shape[1:], dtype=torch.float64)
    for gk in g:
        acc.addcmul_(gk, gk)
    return acc


def ms(fn, g):
    fn(g)
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        fn(g)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


print(platform.processor() or platform.machine(), torch.__version__)
for threads in (1, 2):
    torch.set_num_threads(threads)
    for shape in [(16, 576, 576), (16, 192, 576), (8, 576, 576), (16, 768, 2304)]:
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        assert torch.equal(whole(g), square_sum(g))
        a, b = ms(whole, g), ms(square_sum, g)
        print(f"threads {threads}  g {str(shape):16s} whole {a:7.2f}  blocks {b:7.2f}  "
              f"({a / b:.1f}x)")
