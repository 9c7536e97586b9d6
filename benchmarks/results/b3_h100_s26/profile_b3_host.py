"""B3 host vs device time per engine (CUDA bf16, GPT-2 small, 256 tokens, 128 samples in
micro-batches of 16).

    PYTHONPATH=src python benchmarks/results/b3_h100_s26/profile_b3_host.py [ROWS]
    PYTHONPATH=src python benchmarks/results/b3_h100_s26/profile_b3_host.py --syncs

Default: three timed rounds, then one profiled pass of each (the ordinary step and the
engines) with its device time, host (self CPU) time, kernel launches and the ROWS ops of
most host and device time (profile_b3_host.txt). ``--syncs``: where each engine waits for
the device, the memcpy and synchronize calls of one profiled pass (sync_b3.txt; run in
session 26 as a script of its own with this same set-up).
"""
import sys
import time

import torch
import transformers as T
from torch.profiler import ProfilerActivity, profile

from interference.architectures import QKOVConfig, QKOVIndexer
from interference.gradients import CausalLMObjective, PerSampleGradients

dev, dtype = "cuda", torch.bfloat16
torch.manual_seed(0)
cfg = T.GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
cfg._attn_implementation = "sdpa"
model = T.GPT2LMHeadModel(cfg).to(dev, dtype).eval()
n, mb = 128, 16
ids = torch.randint(0, 50257, (n, 256), device=dev)
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
indexer = QKOVIndexer(model, QKOVConfig.from_model(model))
sid = [f"s:{k}" for k in range(n)]
KINDS = {"hooks": dict(engine="hooks"), "factored": dict(engine="hooks", factors=True, rows=False),
         "fisher": dict(engine="hooks")}


def ordinary():
    for s in range(0, n, mb):
        x = ids[s:s + mb]
        model(input_ids=x, labels=x).loss.backward()
        model.zero_grad(set_to_none=True)


def engine_pass(engine):
    eng = PerSampleGradients(model, indexer, CausalLMObjective(), micro_batch=mb, **KINDS[engine])
    run = eng.square_sums if engine == "fisher" else eng
    return lambda: [None for _ in run(batch, sid)]


def wall(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def syncs():
    for engine in KINDS:
        fn = engine_pass(engine)
        fn()
        fn()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     with_stack=True) as p:
            fn()
            torch.cuda.synchronize()
        print(f"===== {engine}")
        for e in p.key_averages(group_by_stack_n=12):
            if any(s in e.key for s in ("Memcpy", "Synchronize", "cudaHostAlloc", "cudaMalloc",
                                        "cudaFree")):
                print(f"{e.key} calls={e.count} cpu_total={e.cpu_time_total / 1e3:.1f}ms")


def times_and_profiles(rows):
    fns = {"ordinary": ordinary, **{engine: engine_pass(engine) for engine in KINDS}}
    for fn in fns.values():
        fn()
        fn()
    for r in range(3):
        print("round", r, {k: round(wall(fn) * 1e3, 1) for k, fn in fns.items()}, flush=True)
    for k, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
        ev = p.key_averages()
        dev_total = sum(e.self_device_time_total for e in ev) / 1e3
        cpu_total = sum(e.self_cpu_time_total for e in ev) / 1e3
        launches = sum(e.count for e in ev
                       if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        print(f"== {k}: device {dev_total:.1f} ms, self cpu {cpu_total:.1f} ms, "
              f"launches {launches}")
        print(ev.table(sort_by="self_cpu_time_total", row_limit=rows))
        print(ev.table(sort_by="self_device_time_total", row_limit=12))


if __name__ == "__main__":
    if "--syncs" in sys.argv:
        syncs()
    else:
        times_and_profiles(int(sys.argv[1]) if len(sys.argv) > 1 else 25)
