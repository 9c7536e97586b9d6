"""Session 16 probe: what a process's first forward+backward per batch shape costs, and why.

    python probe_shapes.py MODE [--mask] [--layers 4]

A 4-layer LLaMA-2-7B-shaped model (random bf16 weights on cuda:0, attention projections
trainable), micro-batches of 8 samples at 7 lengths (256 ... 64), two rounds in one
process: per length the first and the second fwd+bwd (synchronised). Also one bf16 GEMM
(8T x 4096 @ 4096 x 4096) per length, first and second call. Prints one JSON line with
the allocator's device allocations. MODE is a label (the environment decides the rest).
"""
import json
import os
import sys
import time

import torch
import yaml

sys.path.insert(0, "src")
from interference.models import random_config, random_model  # noqa: E402

mode = sys.argv[1]
mask = "--mask" in sys.argv
mcfg = yaml.safe_load(open("conf/model/llama2_7b.yaml"))
mcfg["overrides"] = dict(mcfg["overrides"], num_hidden_layers=4)
dev = "cuda:0"
t0 = time.perf_counter()
model = random_model(random_config(mcfg), 0, torch.bfloat16, dev)
torch.cuda.synchronize()
build = time.perf_counter() - t0
for p in model.parameters():
    p.requires_grad_(False)
for layer in model.model.layers:
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(layer.self_attn, proj).weight.requires_grad_(True)
Ts = [256, 224, 192, 160, 128, 96, 64]
gen = torch.Generator(device=dev).manual_seed(0)


def sync_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def step(T):
    x = torch.randint(1, 512, (8, T), device=dev, generator=gen)
    kw = {}
    if mask:
        m = torch.ones_like(x)
        m[1::2, T - T // 4:] = 0          # half the rows right-padded
        kw["attention_mask"] = m
    def run():
        out = model(input_ids=x, labels=x, **kw)
        out.loss.backward()
    return sync_time(run)


def gemm(T):
    a = torch.randn(8 * T, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    return sync_time(lambda: a @ w.T)


warm = step(32)        # CUDA context, kernels of a first shape
res = {T: [] for T in Ts}
for rnd in range(2):
    for T in Ts:
        res[T].append(round(step(T), 4))
gem = {T: [] for T in Ts}
for rnd in range(2):
    for T in Ts:
        gem[T].append(round(gemm(T + 1), 5))   # lengths not used above
st = torch.cuda.memory_stats(0)
print(json.dumps({"mode": mode, "mask": mask, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                  "build_s": round(build, 2), "warm_s": round(warm, 3),
                  "first_total": round(sum(v[0] for v in res.values()), 3),
                  "second_total": round(sum(v[1] for v in res.values()), 3),
                  "fwdbwd": res, "gemm": gem,
                  "num_device_alloc": st.get("num_device_alloc"),
                  "reserved_gib": round(torch.cuda.memory_reserved(0) / 2**30, 2)}))
