"""A model larger than one GPU, placed over a GPU and the host, collected and scored (run
on a one-GPU machine: the CPU stands in for a second card).

    python benchmarks/check_placement_large.py [--layers 48] [--cpu-gib 9]

LLaMA-2-70B's shape cut to ``--layers`` decoder layers (48: 41.6e9 parameters, 77.5 GiB in
bfloat16, more than an 80 GB card holds beside anything else), random weights made where
each block lives (interference.placement: the embeddings and the first layers within
``--cpu-gib`` on the host, the rest on cuda:0), then the Fisher and per-sample gradients
of the last two layers of two tasks (4 Fisher and 2 scored samples each, 32 tokens) and
their heatmap on the GPU. There is no one-device reference at this size: the correctness of
the cross-device paths is benchmarks/check_placement.py's; this run shows that no step
gathers the model's weights on one device, and what it costs. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import padded_batch  # noqa: E402

from interference.architectures import QKOVConfig  # noqa: E402
from interference.gradients import FisherCollector  # noqa: E402
from interference.models import random_config  # noqa: E402
from interference.placement import dispatch, make_random_weights, plan_placement  # noqa: E402
from interference.scores import QKOVInterferenceMetric  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--cpu-gib", type=float, default=9.0)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    from accelerate import init_empty_weights
    import transformers

    mcfg = yaml.safe_load((ROOT / "conf" / "model" / "llama2_70b.yaml").read_text())
    mcfg["overrides"]["num_hidden_layers"] = args.layers
    mcfg["attn_implementation"] = "sdpa"
    config = random_config(mcfg)
    t0 = time.time()
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    free = {"cpu": args.cpu_gib * 2**30 / 0.9,
            "cuda:0": torch.cuda.mem_get_info(0)[0]}
    device_map = plan_placement(model, ["cpu", "cuda:0"], torch.bfloat16, free)
    make_random_weights(model, 0, device_map)
    model = dispatch(model, device_map).eval()
    torch.cuda.synchronize()
    held = {d: sum(p.numel() * 2 for p in model.parameters() if str(p.device) == d) / 2**30
            for d in ("cpu", "cuda:0")}
    out = {"device": torch.cuda.get_device_name(0), "layers": args.layers, "n_params": n,
           "weights_gib": n * 2 / 2**30, "card_gib": torch.cuda.mem_get_info(0)[1] / 2**30,
           "held_gib": held, "build_s": time.time() - t0,
           "cuda_layers": sum(1 for k, v in device_map.items()
                              if k.startswith("model.layers.") and v == "cuda:0")}
    last = [args.layers - 2, args.layers - 1]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    fc = FisherCollector(enable_cross_task_analysis=True, config=QKOVConfig.from_model(model),
                         engine="hooks", layers=last, micro_batch=2, gradient_format="factored",
                         store_device="cuda:0")
    T = args.tokens
    for k, (task, role, m) in enumerate([("a", "fisher", 4), ("b", "fisher", 4),
                                         ("a", "scored", 2), ("b", "scored", 2)]):
        batch = padded_batch(m, T, k, f"{task}:{role}")
        fc.collect_fisher(model, batch, task=task, mode="mean", role=role)
    out["collect_s"] = time.time() - t0
    t0 = time.time()
    heat = QKOVInterferenceMetric(fc.config, fc, ridge_lambda=1e-6, device="cuda:0"
                                  ).compute_heatmap("a", "b")
    out["heatmap_s"] = time.time() - t0
    out["heat_finite"] = all(bool(torch.isfinite(torch.as_tensor(heat[b]["scores"])).all())
                             for b in "QKVO")
    out["heat_shape"] = list(torch.as_tensor(heat["Q"]["scores"]).shape)
    out["peak_cuda_gib"] = torch.cuda.max_memory_allocated(0) / 2**30
    print(json.dumps(out))


if __name__ == "__main__":
    main()
