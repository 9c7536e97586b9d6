"""Where each B3 engine waits for the device (CUDA bf16, GPT-2 small): the memcpy and
synchronize calls of one profiled pass.

    PYTHONPATH=src python benchmarks/results/b3_h100_s26/sync_b3.py
"""

import torch, transformers as T
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
for engine in ["hooks", "factored", "fisher"]:
    kind = {"factored": dict(engine="hooks", factors=True, rows=False), "fisher": dict(engine="hooks")}.get(engine, dict(engine=engine))
    eng = PerSampleGradients(model, indexer, CausalLMObjective(), micro_batch=mb, **kind)
    run = eng.square_sums if engine == "fisher" else eng
    fn = lambda: [None for _ in run(batch, sid)]
    fn(); fn()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as p:
        fn(); torch.cuda.synchronize()
    print(f"===== {engine}")
    for e in p.key_averages(group_by_stack_n=12):
        if any(s in e.key for s in ("Memcpy", "Synchronize", "cudaHostAlloc", "cudaMalloc", "cudaFree")):
            st = [s for s in e.stack if "interference" in s or "transformers" in s or "bench" in s or "probe" in s][:6]
            print(f"{e.key} calls={e.count} cpu_total={e.cpu_time_total/1e3:.1f}ms")
            for s in st: print("     ", s)
