"""B2 / B5: end to end at 7B scale on one GPU, by recomputing per layer chunk.

LLaMA-2-7B shape (32 layers, 32 heads, d = 4096, MLP 11008, vocab 32000), random init,
bfloat16; 100 + 100 scored samples, 100 reference samples and --fisher Fisher samples per
task, 256 tokens. Gradients, Fisher and scores through ``layerwise_heatmap`` (float32
accumulation), then the permutation test. Reports wall time per stage, peak GPU memory
and peak host resident memory.

    python benchmarks/bench_7b.py                      # the B2 target
    python benchmarks/bench_7b.py --layers 4 --n 16    # a scaled-down rehearsal
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import transformers as T

from interference.scores.layerwise import layerwise_heatmap
from interference.stats import QKOVStatistics


def batch(n, tokens, vocab, seed, prefix):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "sample_ids": [f"{prefix}:{k}" for k in range(n)]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--fisher", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--permutations", type=int, default=10_000)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--layers-per-chunk", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=4096, help="scale down for a CPU smoke run")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    heads = 32 if args.hidden == 4096 else 4
    cfg = T.LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=heads, num_key_value_heads=heads,
                        intermediate_size=args.hidden * 11008 // 4096, vocab_size=32000,
                        max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    with torch.device(args.device):
        model = T.LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32).eval()
    if cuda:
        torch.cuda.synchronize()
    t_model = time.perf_counter() - t0
    v = cfg.vocab_size
    batches = {"a": {"fisher": batch(args.fisher, args.tokens, v, 1, "a:f"),
                     "scored": batch(args.n, args.tokens, v, 2, "a:s"),
                     "reference": batch(args.n, args.tokens, v, 3, "a:r")},
               "b": {"fisher": batch(args.fisher, args.tokens, v, 4, "b:f"),
                     "scored": batch(args.n, args.tokens, v, 5, "b:s")}}
    t1 = time.perf_counter()
    heat, ref = layerwise_heatmap(model, batches, "a", "b",
                                  layers_per_chunk=args.layers_per_chunk,
                                  metric_kwargs={"ridge_lambda_rel": 1e-3}, engine="hooks",
                                  micro_batch=args.micro_batch, progress=True)
    if cuda:
        torch.cuda.synchronize()
    t_grad_scores = time.perf_counter() - t1
    t2 = time.perf_counter()
    meta = heat["meta"]
    res = QKOVStatistics(n_permutations=args.permutations, n_bootstrap=200).test_scores(
        {b: heat[b]["scores"] for b in "QKVO"}, ref, meta["layers"], meta["heads"],
        meta["kv_head_of"], variant=meta["variant"])
    t_stats = time.perf_counter() - t2
    print(json.dumps({
        "benchmark": "B2 7B end to end (layerwise recompute)", "device": torch.cuda.get_device_name() if cuda else "cpu",
        "layers": args.layers, "n_scored_each": args.n, "n_reference": args.n,
        "n_fisher_each": args.fisher, "tokens": args.tokens, "permutations": args.permutations,
        "model_init_s": t_model, "gradients_fisher_scores_s": t_grad_scores, "stats_s": t_stats,
        "total_s": time.perf_counter() - t0,
        "peak_gpu_GB": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "peak_host_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "n_cells": int(len(res["cells"])), "n_significant": int(res["cells"]["significant"].sum()),
        "torch": torch.__version__}))


if __name__ == "__main__":
    main()
