"""Seconds to make LLaMA-2-7B-shaped random bfloat16 weights on cuda:0, twice per process
(session 25; results/placement/check_placement_h100_s25.txt):

    PYTHONPATH=<tree>/src python benchmarks/results/checkpoint/random_build_s25.py
"""
import time

import torch
import yaml

from interference.models import random_config, random_model

mcfg = yaml.safe_load(open("conf/model/llama2_7b.yaml"))
cfg = random_config(mcfg)
for k in range(2):
    torch.cuda.synchronize()
    t = time.time()
    m = random_model(cfg, 0, torch.bfloat16, "cuda:0")
    torch.cuda.synchronize()
    print("7B random build s", round(time.time() - t, 2), torch.cuda.memory_allocated() / 2**30)
    del m
    torch.cuda.empty_cache()
