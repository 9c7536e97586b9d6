"""Session 29: two rates of this CPU behind issue 15's notes, in one process (2 threads).

1. float32 ``bmm`` of the scoring job's rebuild shape: 48 samples x 106 tokens, a 576 x 576
   projection (δᵀ x), best of 3, in GFLOP/s; and the same product in bfloat16 (AMX), whose
   output is rounded to bfloat16 (torch 2.13 has no CPU ``bmm``/``mm`` with ``out_dtype``).
2. Copying 16 rows of 113 MB (a B6-model dense row, float32) into a freshly allocated
   buffer (every page touched for the first time) and then into the same buffer again.

    PYTHONPATH=src python benchmarks/results/default_cpu/cpu_rates_s29.py
"""
import time

import torch

torch.set_num_threads(2)
n, T, d_out, d_in = 48, 106, 576, 576
d, x = torch.randn(n, T, d_out), torch.randn(n, T, d_in)


def best(fn, r=3):
    fn()
    out = float("inf")
    for _ in range(r):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


flops = 2 * n * T * d_out * d_in
s32 = best(lambda: torch.bmm(d.transpose(1, 2), x))
db, xb = d.bfloat16(), x.bfloat16()
s16 = best(lambda: torch.bmm(db.transpose(1, 2), xb))
try:
    torch.bmm(db.transpose(1, 2), xb, out_dtype=torch.float32)
    out_dtype = "works"
except Exception as err:      # noqa: BLE001 - reported, not handled
    out_dtype = type(err).__name__
print(f"float32 bmm {flops / s32 / 1e9:.0f} GFLOP/s ({s32 * 1e3:.1f} ms); bfloat16 bmm "
      f"(bfloat16 output) {flops / s16 / 1e9:.0f} GFLOP/s ({s32 / s16:.1f}x); "
      f"bmm out_dtype=float32 on the CPU: {out_dtype}")

row = torch.randn(28_311_552)
rows = 16
t0 = time.perf_counter()
buf = torch.empty(rows, row.numel())
for i in range(rows):
    buf[i].copy_(row)
t1 = time.perf_counter()
for i in range(rows):
    buf[i].copy_(row)
t2 = time.perf_counter()
gb = rows * row.numel() * 4 / 1e9
print(f"copy into fresh memory {gb / (t1 - t0):.2f} GB/s; into memory already touched "
      f"{gb / (t2 - t1):.2f} GB/s ({gb:.1f} GB)")
