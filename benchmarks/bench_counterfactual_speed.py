"""V2: the cost of one per-cell counterfactual and one fine-tuning step, and what skipping
the unchanged blocks below a cell saves. A random-weight LLaMA of SmolLM2-135M's shape
(30 layers, width 576, 9 heads, 3 KV heads, vocabulary 49,152): the cost depends on the
shape only, so no weights need to travel.

    python benchmarks/bench_counterfactual_speed.py --device cuda --n-eval 48 --cells 30
    python benchmarks/bench_counterfactual_speed.py --device cpu --threads 2 --n-eval 8 --cells 6

Prints JSON: seconds per cell (full forward passes vs skipping the blocks below the cell,
the same cells, results checked equal), per forward pass over the eval set, and per
fine-tuning step (batch 8), one step of `--runs` runs trained together (validation.ensemble),
and on a GPU the same counterfactuals with TF32 matmuls (time, error against float32); the
floor is one forward pass over both eval sets per cell.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--cells", type=int, default=30)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--runs", type=int, default=22, help="fine-tuning runs trained together")
    args = ap.parse_args()

    import numpy as np
    import torch

    from interference.architectures import QKOVIndexer
    from interference.gradients.objectives import default_objective
    from interference.models import tiny_model
    from interference.validation import CellParams, StepRule, distinct_cells, measure
    from interference.validation.losses import sample_losses

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    model = tiny_model("llama", vocab_size=49152, seed=0, hidden_size=576,
                       num_hidden_layers=args.layers, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, intermediate_size=1536).to(dev).eval()
    obj = default_objective(model)
    params = CellParams(model, QKOVIndexer(model))
    cells_all = distinct_cells(params.indexer)
    step = max(1, len(cells_all) // args.cells)
    cells = cells_all[::step][:args.cells]
    gen = torch.Generator().manual_seed(0)
    g = {c: torch.randn(params.size(c), generator=gen) * 1e-3 for c in cells}
    sq = {c: v * v + 1e-8 for c, v in g.items()}
    ids = torch.randint(0, 49152, (args.n_eval, args.tokens), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    mb = args.n_eval
    sample_losses(model, obj, batch, mb)          # warm-up
    sync()
    t = time.time()
    for _ in range(3):
        sample_losses(model, obj, batch, mb)
    sync()
    forward = (time.time() - t) / 3
    rule = StepRule("relative")
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "n_eval": args.n_eval, "tokens": args.tokens, "layers": args.layers,
           "cells": len(cells), "forward_s": forward}
    res = {}
    for skip in (False, True):
        sync()
        t = time.time()
        res[skip] = measure(model, obj, params, cells, rule, g, sq, batch, batch, mb, False, skip)
        sync()
        out[f"measure_s_skip_{skip}"] = time.time() - t
    out["equal"] = bool(np.allclose(res[True].delta_a, res[False].delta_a, rtol=1e-5,
                                    atol=1e-6))
    fixed = 2 * 3 * forward + 2 * forward          # two gradients (~3 passes) + two bases
    for skip in (False, True):
        out[f"per_cell_s_skip_{skip}"] = (out[f"measure_s_skip_{skip}"] - fixed) / len(cells)
    out["floor_per_cell_s"] = 2 * forward
    sub = {k: v[:8] for k, v in batch.items()}
    opt = torch.optim.AdamW([p for n, p in model.named_parameters()
                             if n in set(params.indexer.param_names)], lr=1e-4)
    for k in range(4):
        if k == 1:
            sync()
            t = time.time()
        opt.zero_grad()
        sample_losses(model, obj, sub, 8, grad=True).mean().backward()
        opt.step()
    sync()
    out["finetune_step_s"] = (time.time() - t) / 3
    out.update(_stacked(model, obj, params, cells_all, batch, args.runs, sync))
    if dev == "cuda":
        out.update(_tf32(model, obj, params, cells, rule, g, sq, batch, mb, res[True], sync))
    print(json.dumps(out, indent=1))


def _stacked(model, obj, params, cells, batch, runs, sync) -> dict:
    """One fine-tuning step of ``runs`` arms at once (validation.ensemble), each freezing
    a different 10% of the cells, against ``runs`` steps one at a time."""
    import time

    from interference.validation import FinetuneSettings
    from interference.validation.ensemble import finetune_stacked
    from interference.validation.intervention import trainable_names

    size = min(8, len(batch["input_ids"]))
    settings = FinetuneSettings(steps=3, batch_size=size)
    names = trainable_names(model, params, settings)
    k = max(1, len(cells) // 10)
    frozen = [cells[r * 7 % len(cells):][:k] for r in range(runs)]
    orders = [[list(range(size))] * settings.steps for _ in range(runs)]
    finetune_stacked(model, obj, batch, params, frozen[:1], orders[:1], names,
                     FinetuneSettings(steps=1, batch_size=size))         # warm-up
    sync()
    t = time.time()
    finetune_stacked(model, obj, batch, params, frozen, orders, names, settings)
    sync()
    step = (time.time() - t) / settings.steps
    return {"stacked_runs": runs, "stacked_step_s": step, "stacked_step_per_run_s": step / runs}


def _tf32(model, obj, params, cells, rule, g, sq, batch, mb, exact, sync) -> dict:
    """The same counterfactuals with TF32 matmuls: time and error against float32."""
    import time

    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from interference.validation import measure

    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        sync()
        t = time.time()
        fast = measure(model, obj, params, cells, rule, g, sq, batch, batch, mb, False, True)
        sync()
        seconds = time.time() - t
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    a, b = exact.delta_a.mean(1), fast.delta_a.mean(1)
    return {"tf32_measure_s": seconds, "tf32_max_abs_err": float(np.abs(a - b).max()),
            "float32_delta_a_sd": float(a.std()),
            "tf32_spearman_vs_float32": float(spearmanr(a, b)[0])}


if __name__ == "__main__":
    main()
