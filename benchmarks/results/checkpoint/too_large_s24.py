"""Session 24: a model larger than its GPU through a job's load (models.load_prepared of
random weights in LLaMA-2-70B's shape, bfloat16): the CUDA out-of-memory error while the
weights are made becomes ModelDoesNotFitError, with the size counted from the shapes.

    PYTHONPATH=src python benchmarks/results/checkpoint/too_large_s24.py
"""
import time

import torch
import yaml

from interference.models import ModelDoesNotFitError, load_prepared

mcfg = yaml.safe_load(open("conf/model/llama2_7b.yaml"))
mcfg["overrides"].update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8)
t0 = time.perf_counter()
try:
    load_prepared(None, mcfg, "cuda")
    print("loaded: it fits")
except ModelDoesNotFitError as err:
    print(f"refused after {time.perf_counter() - t0:.1f} s: {err}")
print(f"memory allocated after the refusal: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
