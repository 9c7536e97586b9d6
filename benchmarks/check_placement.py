"""A model placed over several devices gives the one-device results (run on a GPU machine).

    python benchmarks/check_placement.py

On a one-GPU host the devices are the CPU and cuda:0: a block placed on the CPU computes
there (it is not offloaded to the GPU), so every cross-device step a model over several
GPUs takes (inputs moved between blocks, each layer's x and δ on its own device, the
Fisher sums and rows of several devices joined, the loss on the head's device) is taken
here. Tiny LLaMA-GQA and GPT-2, 4 layers of width 128, float32: the Fisher, the factored and dense
per-sample gradients and the heatmap of the placed model against the same weights on
cuda:0 alone, also with the collector restricted to the layers of one device (a layer
chunk); random weights made over [cpu, cuda:0] against those made on cuda:0 alone (equal
where a module is on the GPU both times); factored rows kept in host memory against rows
kept on the card (the same heatmap to the bit). Prints one JSON line.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import padded_batch, tiny_gpt2, tiny_llama  # noqa: E402

from interference.architectures import QKOVConfig  # noqa: E402
from interference.gradients import FisherCollector  # noqa: E402
from interference.models import random_model, tiny_config  # noqa: E402
from interference.placement import place  # noqa: E402
from interference.scores import QKOVInterferenceMetric  # noqa: E402


def run(model, fmt, layers=None, store_device="auto"):
    fc = FisherCollector(enable_cross_task_analysis=True, config=QKOVConfig.from_model(model),
                         engine="hooks", gradient_format=fmt, layers=layers, micro_batch=4,
                         store_device=store_device)
    fc.collect_fisher(model, padded_batch(8, 24, 1, "a:f"), task="a", mode="mean", role="fisher")
    fc.collect_fisher(model, padded_batch(8, 24, 2, "b:f"), task="b", mode="mean", role="fisher")
    fc.collect_fisher(model, padded_batch(6, 24, 3, "a:s"), task="a", mode="mean", role="scored")
    fc.collect_fisher(model, padded_batch(6, 24, 4, "b:s"), task="b", mode="mean", role="scored")
    heat = QKOVInterferenceMetric(fc.config, fc, ridge_lambda=1e-14, device="cuda:0"
                                  ).compute_heatmap("a", "b")
    return heat, fc.fisher.get("a").cpu().double()


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def main():
    out = {"device": torch.cuda.get_device_name(0)}
    # width 128 and 24 tokens: the attention projections are stored factored (x and δ)
    for name, make in (("llama_gqa", lambda: tiny_llama(n_layer=4, hidden=128, head_dim=32)),
                       ("gpt2", lambda: tiny_gpt2(n_layer=4, n_embd=128))):
        base = make()
        one = copy.deepcopy(base).to("cuda:0")
        split = place(copy.deepcopy(base), ["cpu", "cuda:0"],
                      free_bytes={"cpu": 2**30, "cuda:0": 2**30})
        where = sorted(set(map(str, split.hf_device_map.values())))
        assert where == ["cpu", "cuda:0"], split.hf_device_map
        n_layers = QKOVConfig.from_model(base).num_layers
        for fmt in ("factored", "dense"):
            for layers in (None, [0, 1], [n_layers - 2, n_layers - 1]):
                h1, f1 = run(one, fmt, layers)
                h2, f2 = run(split, fmt, layers)
                key = f"{name}.{fmt}.{'all' if layers is None else layers}"
                out[key] = {"fisher_rel": rel(f2, f1),
                            "heat_rel": max(rel(torch.as_tensor(np.asarray(h2[b]["scores"])),
                                                torch.as_tensor(np.asarray(h1[b]["scores"])))
                                            for b in "QKVO")}
        out[f"{name}.placement"] = {k: str(v) for k, v in split.hf_device_map.items()}
        # a chunk job's factored rows kept in host memory (layerwise.plan_chunk's
        # rows_on_host): the same heatmap as rows kept on the card, to the bit
        h1, _ = run(one, "factored", None, "cuda:0")
        h2, _ = run(one, "factored", None, "cpu")
        out[f"{name}.rows_on_host_equal"] = all(
            np.array_equal(np.asarray(h1[b]["scores"]), np.asarray(h2[b]["scores"]))
            for b in "QKVO")
    # random weights: per module, wherever it is made
    cfg = tiny_config("llama", num_hidden_layers=4)
    one = random_model(cfg, 7, torch.float32, "cuda:0")
    split = random_model(cfg, 7, torch.float32, ["cpu", "cuda:0"])
    a, b = dict(one.named_parameters()), dict(split.named_parameters())
    on_gpu = [n for n, p in b.items() if p.device.type == "cuda"]
    out["random.on_gpu_equal"] = all(torch.equal(a[n], b[n]) for n in on_gpu)
    out["random.n_on_gpu"], out["random.n"] = len(on_gpu), len(b)
    print(json.dumps(out))
    worst = max(max(v.values()) for k, v in out.items()
                if isinstance(v, dict) and "fisher_rel" in v)
    ok = worst < 1e-4 and out["random.on_gpu_equal"] and 0 < len(on_gpu) < len(b) and all(
        v for k, v in out.items() if k.endswith("rows_on_host_equal"))
    print(f"worst relative difference {worst:.2e}: {'OK' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
