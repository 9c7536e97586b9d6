"""B4: 10^5 permutations over all distinct cells of SmolLM2-135M (30 layers, 9 query heads,
3 KV heads: 30 x (9 + 9 + 3 + 3) = 720 cells) with 64 disruptors per group.

    python benchmarks/bench_stats.py            # permutations only, then the whole test_scores

Prints one JSON line (seconds, best of --repeats).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from interference.stats import QKOVStatistics
from interference.stats.permutation import permutation_test_matrix


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--permutations", type=int, default=100_000)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    m = 30 * (9 + 9 + 3 + 3)
    x_b, x_r = rng.gamma(2.0, size=(args.n, m)), rng.gamma(2.0, size=(args.n, m))
    perm = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        permutation_test_matrix(x_b, x_r, n_permutations=args.permutations, seed=1)
        perm.append(time.perf_counter() - t0)
    # the whole test from score tensors: n_a = 64 task-A samples, SmolLM2 geometry
    layers, heads = list(range(30)), list(range(9))
    kv = [h // 3 for h in heads]
    def cube(n):
        out = {}
        for b in "QKVO":
            s = rng.gamma(2.0, size=(64, n, 30, 9))
            if b in "KV":
                s = s[..., [0, 0, 0, 3, 3, 3, 6, 6, 6]]
            out[b] = s
        return out
    sb, sr = cube(args.n), cube(args.n)
    t0 = time.perf_counter()
    res = QKOVStatistics(n_permutations=args.permutations, n_bootstrap=1000).test_scores(
        sb, sr, layers, heads, kv)
    whole = time.perf_counter() - t0
    print(json.dumps({"benchmark": "B4 statistics", "cells": m, "n_per_group": args.n,
                      "permutations": args.permutations, "permutation_s": min(perm),
                      "test_scores_s": whole, "n_cells_tested": int(len(res["cells"])),
                      "cpu": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
