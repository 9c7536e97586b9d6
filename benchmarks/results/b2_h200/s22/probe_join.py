"""Session 22: one B2-sized arm through the chunk job's save path (join_heatmaps of one
part, then save_heatmap) on random scores, timed, with a cProfile by own time.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/results/b2_h200/s22/probe_join.py
"""
import cProfile
import pstats
import shutil
import tempfile
import time

import numpy as np
import torch

from interference._tables import BLOCKS
from interference.architectures import QKOVConfig
from interference.results import save_heatmap
from interference.scores.layerwise import join_heatmaps

torch.set_num_threads(2)
rng = np.random.default_rng(0)
L = H = 32
n = 100
heat = {b: {"scores": rng.random((n, n, L, H)), "layer_head_avg": np.zeros((L, H))}
        for b in BLOCKS}
heat["meta"] = {"sample_ids_a": [f"a{i}" for i in range(n)],
                "sample_ids_b": [f"b{i}" for i in range(n)], "heads": list(range(H)),
                "settings": {}, "fisher_tasks": [], "layers": list(range(L)), "ridge": {}}
ref = {b: rng.random((n, n, L, H)) for b in BLOCKS}
config = QKOVConfig(num_layers=L, num_heads=H, head_dim=128, hidden_dim=4096)
folder = tempfile.mkdtemp()
profile = cProfile.Profile()
profile.enable()
t0 = time.perf_counter()
joined, joined_ref = join_heatmaps([heat], [ref], config, 20)
t1 = time.perf_counter()
save_heatmap(f"{folder}/main", joined, reference_scores=joined_ref, extra={})
t2 = time.perf_counter()
profile.disable()
shutil.rmtree(folder)
print(f"join {t1 - t0:.2f} s, save {t2 - t1:.2f} s")
pstats.Stats(profile).sort_stats("tottime").print_stats(12)
