"""Session 29 probe: a dense store in host memory on CUDA, the dense rows read a micro-batch
late (per_sample.LAG_DEVICES = {'cuda'}, session 28) or not (set()), alternated in one
process. B6's model (GPT-2-small-shaped LLaMA, float32), 96 scored samples x 256 tokens,
micro-batch 8, store_device cpu, gradient_format dense. Prints seconds per round."""
import sys, time, json, statistics
import torch
sys.path.insert(0, "benchmarks")
from bench_kronfluence import build_model, batch_of
import argparse
from interference.gradients import FisherCollector, per_sample

import os
SMOKE = os.environ.get("SMOKE")
args = argparse.Namespace(width=64 if SMOKE else 768, layers=2 if SMOKE else 12, heads=4 if SMOKE else 12, vocab=32000, tokens=256, device="cpu" if SMOKE else "cuda")
if SMOKE:
    torch.cuda.synchronize = lambda: None
    torch.cuda.empty_cache = lambda: None
model = build_model(args)
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, 32000, (16 if SMOKE else 96, 256), generator=g)
fisher = torch.randint(0, 32000, (16, 256), generator=g)

def once(lag, store_device):
    per_sample.LAG_DEVICES = {"cuda"} if lag else set()
    fc = FisherCollector(enable_cross_task_analysis=True, micro_batch=8, store_device=store_device, gradient_format="dense",
                         gradient_memory_mb=1e6)
    fc.collect_fisher(model, batch_of(fisher, "a:f"), task="a", role="fisher")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fc.collect_fisher(model, batch_of(ids, "a:s"), task="a", role="scored")
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    dev = str(fc.gradient_manager.device)
    assert len(fc.gradient_manager.shards[("a", "scored")].where) == len(ids)
    del fc
    torch.cuda.empty_cache()
    return dt, dev

for lag in (True, False):
    once(lag, "cpu")
res = {}
for r in range(4):
    for lag in (True, False) if r % 2 == 0 else (False, True):
        for sd in (("cpu", "cpu") if SMOKE else ("cpu", "cuda")):
            dt, dev = once(lag, sd)
            res.setdefault(f"lag={lag} store={dev}", []).append(round(dt, 3))
for k, v in res.items():
    print(json.dumps({"case": k, "seconds": v, "median": statistics.median(v), "samples_per_s": round(96 / statistics.median(v), 1)}))
