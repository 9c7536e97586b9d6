"""A/B: load_smollm2_gguf with gguf's reader parsing from memory (this session) vs its
memory map (session 17), alternating, wall time, one thread, after one untimed load.

    python benchmarks/results/default_cpu/ab_gguf_s18.py      # from the repository root
"""
import sys, time, json
import torch
torch.set_num_threads(1)
sys.path.insert(0, "src")
from interference import models
from interference.models import load_smollm2_gguf, tokenizer_and_facts
import yaml
mcfg = yaml.safe_load(open("conf/model/smollm2.yaml"))

class Mapped:
    def __getattr__(self, k):
        import numpy; return getattr(numpy, k)
    @staticmethod
    def memmap(*a, **k):
        import numpy; return numpy.memmap(*a, **k)

def timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t

out = {"memory": {"build": [], "tokenizer": []}, "memmap": {"build": [], "tokenizer": []}}
real = models._NumpyReadingIntoMemory
load_smollm2_gguf("sdpa")  # warm the page cache and imports
for r in range(3):
    for kind in ("memmap", "memory"):
        models._NumpyReadingIntoMemory = Mapped if kind == "memmap" else real
        out[kind]["build"].append(round(timed(lambda: load_smollm2_gguf("sdpa")), 2))
        out[kind]["tokenizer"].append(round(timed(lambda: tokenizer_and_facts(mcfg)), 2))
models._NumpyReadingIntoMemory = real
print(json.dumps(out))
