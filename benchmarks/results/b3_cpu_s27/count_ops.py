"""Operator calls of one Fisher pass (PerSampleGradients.square_sums) on the CPU, by kind:
a device-free proxy for the kernel launches of B3's Fisher path (every aten op that does
work launches at least one kernel on a GPU).

GPT-2 small's layout (12 layers, 12 heads, fused c_attn Conv1D, biases) at width 192, 64
samples of 64 tokens in micro-batches of 16, float32.

    PYTHONPATH=<tree>/src python benchmarks/results/b3_cpu_s27/count_ops.py
"""
import collections

import torch
import transformers as T
from torch.profiler import ProfilerActivity, profile

from interference.architectures import QKOVConfig, QKOVIndexer
from interference.gradients import CausalLMObjective, PerSampleGradients

torch.manual_seed(0)
cfg = T.GPT2Config(n_layer=12, n_head=12, n_embd=192, vocab_size=512, n_positions=128)
model = T.GPT2LMHeadModel(cfg).eval()
n, mb = 64, 16
ids = torch.randint(0, 512, (n, 64))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
indexer = QKOVIndexer(model, QKOVConfig.from_model(model, include_bias=True))
eng = PerSampleGradients(model, indexer, CausalLMObjective(), micro_batch=mb, engine="hooks")
sid = [f"s:{k}" for k in range(n)]
total = None
for total, _, _ in eng.square_sums(batch, sid):
    pass
with profile(activities=[ProfilerActivity.CPU]) as p:
    for total, _, _ in eng.square_sums(batch, sid):
        pass
calls = collections.Counter({e.key: e.count for e in p.key_averages() if e.key.startswith("aten::")})
per = n // mb
print(f"Fisher pass, {n} samples in {per} micro-batches: {sum(calls.values())} aten calls "
      f"({sum(calls.values()) / per:.0f} per micro-batch)")
for k in ("aten::copy_", "aten::cat", "aten::add_", "aten::index_select", "aten::clone"):
    print(f"  {k:20s} {calls.get(k, 0):6d}")
print(f"sum of the total: {float(total.sum()):.17g}")
