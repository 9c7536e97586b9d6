"""Launch configurations of the fused Triton contraction on the B1 inputs (GPT-2-small
attention stack, 100 x 100 pairs): time and error against float64 for each precision and
tile configuration. Used to pick the defaults in interference/scores/contraction.py.

    python benchmarks/tune_contraction.py            # one JSON line per configuration
    python benchmarks/tune_contraction.py --round 2  # around the first round's best
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import make_inputs, ours, timed  # noqa: E402

from interference.scores.contraction import contract_triton  # noqa: E402


def run(ga, gb, fisher, precision, tiles, eps=1e-10, lam=1e-8):
    out = []
    for layer in range(ga.shape[0]):
        for b in range(4):
            w = (fisher[layer, b].clamp_min(eps) + lam).reciprocal()
            out.append(contract_triton(ga[layer, b], gb[layer, b], w, precision=precision,
                                       tiles=tiles))
    return torch.stack(out)


def main():
    second = "--round" in sys.argv and sys.argv[-1] == "2"
    ga, gb, fisher = make_inputs(100, 12, 12, 64, "cuda")
    ref = ours(ga[:, :, :8], gb, fisher, dtype=torch.float64)
    grid = (itertools.product(("tf32x3", "bf16x3"), (64, 128), (8, 16), (2, 3), (1, 2))
            if second else
            itertools.product(("tf32x3", "bf16x3", "tf32"), (32, 64), (4, 8), (3, 4), (2, 4, 8)))
    for precision, bk, warps, stages, waves in grid:
        tiles = {"block_k": bk, "num_warps": warps, "num_stages": stages, "waves": waves}
        try:
            t = timed(lambda: run(ga, gb, fisher, precision, tiles), "cuda")
            got = run(ga[:, :, :8], gb, fisher, precision, tiles).double()
        except Exception as e:  # out of shared memory etc.
            print(json.dumps({"precision": precision, **tiles, "error": str(e)[:120]}))
            continue
        err = float(((got - ref).abs().amax(dim=(1, 2, 3)) / ref.abs().amax(dim=(1, 2, 3))).max())
        print(json.dumps({"precision": precision, **tiles, "ms": t * 1e3, "max_rel_err": err}),
              flush=True)


if __name__ == "__main__":
    main()
