"""B3: per-sample gradient throughput vs an ordinary batched forward + backward.

GPT-2-small shape (12 layers, 12 heads, d = 768, vocab 50257), random init, 256 tokens.

    python benchmarks/bench_gradients.py --device cuda --dtype bfloat16 --n 64
    python benchmarks/bench_gradients.py --device cpu --n 4 --threads 2

Each side runs one untimed pass over the same micro-batches first (kernel selection and
library set-up at the timed shapes; before session 17 the engines warmed up on 2 samples
only, so their timed pass paid those first-use costs while the ordinary step's did not),
then ``--repeat`` timed rounds of one ordinary pass followed by one engine pass: an
engine's rate is the median of its passes, its ratio the median of the rounds' ratios (and
their range), the ordinary rate the median of all its passes. Session 18 on an H200: one
timed pass of each, the ordinary one first, varied by up to 25% between runs of the same
code on one machine (the host, which issues the kernels, sets the pace of both sides).
Prints one JSON line with samples/s of: the ordinary step (all parameters, one batched
backward), and each per-sample engine (attention weights only): ``hooks`` and ``loop`` form
every sample's canonical row [P]; ``factored`` is what the workflow's collect does for the
stored samples of a factored store (x and δ of each projection kept, each per-sample
gradient reduced to its squared norm; ``gradient_format: auto`` picks it at 256 tokens
here); ``fisher`` what it does for the Fisher samples (Σ_k g_k², ``square_sums``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import transformers as T

from interference.architectures import QKOVConfig, QKOVIndexer
from interference.gradients import CausalLMObjective, PerSampleGradients


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def profile(name, fn, device, rows):
    """Print the ``rows`` ops with the most self time (device time on CUDA) of one fn()."""
    from torch.profiler import ProfilerActivity, profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with prof(activities=acts) as p:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"== {name}: top {rows} ops by {key}")
    print(p.key_averages().table(sort_by=key, row_limit=rows))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=5,
                    help="timed rounds per engine, each an ordinary pass then an engine pass; "
                         "the medians are reported (before session 18: one pass each)")
    ap.add_argument("--engines", default="hooks,loop")
    ap.add_argument("--profile", type=int, default=0,
                    help="also print the N ops taking most device (CUDA) or CPU time in one "
                         "pass of each engine and of the ordinary step (torch.profiler)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    cfg._attn_implementation = "sdpa"
    model = T.GPT2LMHeadModel(cfg).to(args.device, dtype).eval()
    ids = torch.randint(0, 50257, (args.n, args.tokens), device=args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = {"benchmark": "B3 per-sample gradients", "n": args.n, "tokens": args.tokens,
           "dtype": args.dtype, "threads": torch.get_num_threads(), "repeat": args.repeat,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()}

    def ordinary():
        for s in range(0, args.n, args.batch):
            x = ids[s:s + args.batch]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
    def seconds(fn):
        t0 = time.perf_counter()
        fn()
        sync(args.device)
        return time.perf_counter() - t0

    ordinary()                     # warm-up at the timed shapes
    sync(args.device)
    ordinary_times = []
    indexer = QKOVIndexer(model, QKOVConfig.from_model(model))
    sample_ids = [f"s:{k}" for k in range(args.n)]
    for engine in args.engines.split(","):
        kind = {"factored": dict(engine="hooks", factors=True, rows=False),
                "fisher": dict(engine="hooks")}.get(engine, dict(engine=engine))
        eng = PerSampleGradients(model, indexer, CausalLMObjective(), micro_batch=args.batch,
                                 **kind)
        run = eng.square_sums if engine == "fisher" else eng
        passes = lambda: [None for _ in run(batch, sample_ids)]  # noqa: E731
        seconds(passes)            # warm-up at the timed shapes, as ordinary()'s
        rounds = [(seconds(ordinary), seconds(passes)) for _ in range(args.repeat)]
        ordinary_times += [o for o, _ in rounds]
        out[f"{engine}_samples_per_s"] = args.n / statistics.median(e for _, e in rounds)
        out[f"{engine}_over_ordinary"] = statistics.median(o / e for o, e in rounds)
        out[f"{engine}_over_ordinary_range"] = [min(o / e for o, e in rounds),
                                                max(o / e for o, e in rounds)]
        if args.profile:
            profile(f"engine {engine}", passes, args.device, args.profile)
    out["ordinary_samples_per_s"] = args.n / statistics.median(ordinary_times)
    if args.profile:
        profile("ordinary step", ordinary, args.device, args.profile)
    out["torch"] = torch.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
