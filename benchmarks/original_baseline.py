"""A faithful re-implementation of the ORIGINAL scoring algorithm, kept only as a baseline.

The system the seed came from scored one (pair, layer, head, block) at a time in Python:
for every pair it fetched the two samples' per-parameter dictionaries, sliced the weight
gradient of the block at each step, divided by the Fisher slice and summed, on the CPU
(SPEC section 8, last item). The math is the same M^B_{ij,l,h}; only the loop structure
differs. Do not use this for anything but timing.
"""
from __future__ import annotations

import torch


def original_pairwise_scores(grads_a, grads_b, fisher, n_layers, n_heads, head_dim,
                             epsilon=1e-10, ridge_lambda=1e-8):
    """grads_*: list of dicts 'L{l}.{B}' -> weight gradient [d, d] (Linear convention);
    fisher: dict of the same. Returns {(i, j, l, h, B): score}."""
    out = {}
    for i, ga in enumerate(grads_a):
        for j, gb in enumerate(grads_b):
            for layer in range(n_layers):
                for head in range(n_heads):
                    for block in "QKVO":
                        key = f"L{layer}.{block}"
                        rows = slice(head * head_dim, (head + 1) * head_dim)
                        if block == "O":
                            c = ga[key][:, rows] ** 2
                            f = fisher[key][:, rows]
                            g = gb[key][:, rows].abs()
                        else:
                            c = ga[key][rows] ** 2
                            f = fisher[key][rows]
                            g = gb[key][rows].abs()
                        out[(i, j, layer, head, block)] = float(
                            (c / (f.clamp_min(epsilon) + ridge_lambda) * g).sum())
    return out
