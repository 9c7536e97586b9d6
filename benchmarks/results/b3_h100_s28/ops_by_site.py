"""Operator calls per Fisher micro-batch and where they come from (a TorchDispatchMode
counting every non-view aten call), against an ordinary step: GPT-2 layout at width 192,
12 layers, 32 samples of 64 tokens in micro-batches of 16, float32, CPU.

    PYTHONPATH=<tree>/src python benchmarks/results/b3_h100_s28/ops_by_site.py

ops_by_site.txt: 11c548e (session 27), f4df6cd (session 28's finiteness change) and 012e7d7
(its CPU square-sum over blocks: a copy and a multiply-add per sample and block, CPU only).
"""
import collections, sys, traceback
import torch, transformers as T
from torch.utils._python_dispatch import TorchDispatchMode
from interference.architectures import QKOVConfig, QKOVIndexer
from interference.gradients import CausalLMObjective, PerSampleGradients

VIEWS = {"view", "_unsafe_view", "as_strided", "transpose", "t", "permute", "expand", "slice", "select",
         "unsqueeze", "squeeze", "reshape", "alias", "detach", "unbind", "split", "split_with_sizes",
         "_reshape_alias", "empty", "empty_strided", "unfold", "narrow", "view_as", "lift_fresh", "chunk", "diagonal"}
class Count(TorchDispatchMode):
    def __init__(s): super().__init__(); s.c = collections.Counter(); s.site = collections.Counter()
    def __torch_dispatch__(s, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in VIEWS:
            s.c[name] += 1
            st = traceback.extract_stack()
            fr = [f for f in st if "interference" in f.filename]
            tf = [f for f in st if "transformers" in f.filename]
            where = (f"{fr[-1].filename.split('/')[-1]}:{fr[-1].lineno} {fr[-1].name}" if fr else "-") 
            s.site[(name, where)] += 1
        return func(*args, **(kwargs or {}))

torch.manual_seed(0)
cfg = T.GPT2Config(n_layer=12, n_head=12, n_embd=192, vocab_size=512, n_positions=128)
cfg._attn_implementation = "sdpa"
model = T.GPT2LMHeadModel(cfg).eval()
n, mb = 32, 16
ids = torch.randint(0, 512, (n, 64))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
indexer = QKOVIndexer(model, QKOVConfig.from_model(model))
eng = PerSampleGradients(model, indexer, CausalLMObjective(), micro_batch=mb, engine="hooks")
sid = [f"s:{k}" for k in range(n)]
def fisher():
    for _ in eng.square_sums(batch, sid): pass
def ordinary():
    for s in range(0, n, mb):
        x = ids[s:s+mb]; model(input_ids=x, labels=x).loss.backward(); model.zero_grad(set_to_none=True)
for name, fn in (("ordinary", ordinary), ("fisher", fisher)):
    fn()
    with Count() as c: fn()
    print("==", name, sum(c.c.values()) / (n // mb), "ops per micro-batch")
    for k, v in c.c.most_common(25): print(f"   {k:30s} {v/(n//mb):7.1f}")
    if name == "fisher":
        for (k, w), v in sorted(c.site.items(), key=lambda kv: -kv[1])[:50]:
            print(f"   {k:24s} {v/(n//mb):7.1f}  {w}")
