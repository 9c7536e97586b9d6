"""One B2 layer chunk on one GPU without the workflow: the planner's predicted peak
(collect.pass_memory) against torch.cuda.max_memory_allocated, and its time estimate
against the wall time of collecting and scoring.

    python benchmarks/check_b2_pass.py [--chunk 0] [--chunks 2] [--tokens 256]
        [--micro-batch M] [--profile out.pstats] [--metric-default]

``--micro-batch`` forces the micro-batch (the plan's otherwise); ``--profile`` runs the
collect-and-score call under cProfile, writes its stats and prints the 40 functions of
most cumulative and most own time to stderr (the passes' phase seconds are logged too).

The LLaMA-2-7B shape with random bfloat16 weights (conf/model/llama2_7b.yaml) on cuda:0,
the B2 sizes of conf/experiment/b2_7b.yaml (per task 32 Fisher + 100 scored samples, 100
task-A reference samples), every sample ``--tokens`` random tokens (the worst case the plan
assumes), budget 80% of the free memory after the model as a chunk job takes it. Prints one
JSON line. Needs torch (CUDA), transformers, numpy, scipy, pyyaml, safetensors, tqdm.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def batch(n: int, tokens: int, vocab: int, prefix: str, gen, min_tokens: int = 0) -> dict:
    """n samples of ``tokens`` random tokens, or of lengths drawn uniformly from
    [min_tokens, tokens] (right-padded) when ``min_tokens`` is set."""
    import torch

    ids = torch.randint(1, vocab, (n, tokens), generator=gen)
    mask = torch.ones_like(ids)
    if min_tokens:
        lengths = torch.randint(min_tokens, tokens + 1, (n,), generator=gen)
        mask = (torch.arange(tokens)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
            "sample_ids": [f"{prefix}:{k}" for k in range(n)]}


def main(argv=None):
    import torch
    import yaml

    sys.path.insert(0, str(ROOT / "src"))
    from interference.architectures import QKOVConfig, QKOVIndexer
    from interference.gradients.collect import make_collector, stored_format
    from interference.models import DTYPES, random_config, random_model
    from interference.scores.layerwise import chunk_layers, plan_chunk, score_layers

    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--min-tokens", type=int, default=0,
                    help="sample lengths uniform in [min-tokens, tokens] (as real data "
                         "varies), not all --tokens")
    ap.add_argument("--metric-default", action="store_true",
                    help="the workflow's metric settings (conf/metric/default.yaml: relative "
                         "ridge from each (layer, block)'s Fisher median), not the library's")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--phase-times", action="store_true",
                    help="synchronised seconds spent in each step of the per-micro-batch "
                         "loop (forward, backward, forming, records, store, scoring), "
                         "printed as a 'phase_seconds' entry of the JSON line")
    ap.add_argument("--torch-profile", default=None,
                    help="write torch.profiler's tables (self CUDA / self CPU time) and the "
                         "GPU's busy seconds to this file (slow to tabulate: a 4-layer chunk's "
                         "trace took over 100 s; use --chunks 32, one layer)")
    ap.add_argument("--torch-profile-run", type=int, default=1,
                    help="which run of --repeat the torch profiler records (1: the first, "
                         "with the process's one-time costs)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="collect and score this many times in one process; the last run's "
                         "seconds and phases are reported (the first ones carry one-time "
                         "costs: lazy kernel loading, library handles, probes)")
    ap.add_argument("--plain", action="store_true",
                    help="then time one plain forward+backward of the same samples in this "
                         "process (micro-batches of 8 cut to their longest sample, unmasked, "
                         "attention projections trainable), after one warm-up micro-batch")
    ap.add_argument("--reserve-gib", type=float, default=0.0,
                    help="allocate and free this many GiB (1 GiB pieces) before the runs, so "
                         "the caching allocator holds them; its seconds are printed")
    ap.add_argument("--no-gram-norms", action="store_true",
                    help="form each stored sample's gradient for its norm, as before session "
                         "14, instead of per_sample's Gram matrices (an A/B of that change)")
    ap.add_argument("--pad-multiple", type=int, default=None,
                    help="right-pad each micro-batch to a multiple of this many tokens on "
                         "the GPU (per_sample.PAD_MULTIPLE['cuda'], 32): fewer batch shapes, "
                         "whose first use costs a process about half a second each "
                         "(RESULTS.md, B2 session 15)")
    ap.add_argument("--sdpa", default=None, choices=["flash", "efficient", "cudnn"],
                    help="only this fused attention backend (torch.nn.attention.sdpa_kernel); "
                         "default: torch's choice")
    args = ap.parse_args(argv)
    if args.no_gram_norms:
        from interference.gradients import per_sample
        per_sample.GRAM_NORM_DEVICES = set()
    if args.pad_multiple:
        from interference.gradients import per_sample
        per_sample.PAD_MULTIPLE["cuda"] = args.pad_multiple
    if args.sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[args.sdpa]
        sdpa_kernel([backend]).__enter__()   # for the whole run
    mcfg = yaml.safe_load((ROOT / "conf" / "model" / "llama2_7b.yaml").read_text())
    data = yaml.safe_load((ROOT / "conf" / "experiment" / "b2_7b.yaml").read_text())["data"]
    dev = "cuda:0"
    t0 = time.perf_counter()
    model = random_model(random_config(mcfg), mcfg["seed"], DTYPES[mcfg["dtype"]], dev)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    qcfg = QKOVConfig.from_model(model)
    indexer = QKOVIndexer(model, qcfg)
    gen = torch.Generator().manual_seed(0)
    V, T = 512, args.tokens
    lo = args.min_tokens
    batches = {t: {"fisher": batch(data["n_fisher"], T, V, f"{t}:f", gen, lo),
                   "scored": batch(data["n_scored"], T, V, f"{t}:s", gen, lo)}
               for t in ("math", "code")}
    batches["math"]["reference"] = batch(data["n_reference"], T, V, "math:r", gen, lo)
    sizes = [len(b["sample_ids"]) for by in batches.values() for b in by.values()]
    stored = [T] * (sum(sizes) - 2 * data["n_fisher"])
    budget = 0.8 * torch.cuda.mem_get_info(0)[0]
    base = torch.cuda.memory_allocated(0)
    layers = chunk_layers(indexer.layers, args.chunks)[args.chunk]
    fmt = stored_format(model, "auto")
    plan = plan_chunk(model, indexer, layers, stored, [T] * sum(sizes), sizes, "float32", fmt,
                      mcfg["dtype"], budget, "cuda", 4, 8, n_tasks=2,
                      score_rows=data["n_scored"] + max(data["n_scored"], data["n_reference"]),
                      score_rows_all=len(stored))
    fisher = {"ema_decay": 0.99, "store_dtype": "float32", "loss_reduction": "mean"}
    m = args.micro_batch or plan["micro_batch"]
    held = {"gradient_memory_mb": (budget - plan["memory"][0]["transient"]) / 2**20,
            "gradient_format": "auto"}

    def make(ls):
        return make_collector(fisher, held, qcfg, Path("/tmp/b2check_spill"), False, m,
                              layers=ls, store_device=dev, keep_fisher_sums=False)

    torch.cuda.reset_peak_memory_stats(0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    metric_kwargs = {"device": dev}
    if args.metric_default:
        metric_kwargs.update(yaml.safe_load((ROOT / "conf" / "metric" / "default.yaml").read_text()))
    phases = _install_phase_timers() if args.phase_times else None
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    tprof = None
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile
        tprof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    reserve_s = None
    if args.reserve_gib:
        t0 = time.perf_counter()
        pieces = [torch.empty(2**30, dtype=torch.uint8, device=dev)
                  for _ in range(int(args.reserve_gib))]
        torch.cuda.synchronize()
        del pieces
        reserve_s = time.perf_counter() - t0
    runs, run_phases = [], []       # each run's seconds and phases; the last one is reported
    for run in range(1, args.repeat + 1):
        if tprof is not None and run == args.torch_profile_run:
            tprof.__enter__()
        t0 = time.perf_counter()
        if phases is not None:
            phases.clear()
        score_layers(model, batches, "math", "code", plan["passes"], make,
                     metric_kwargs=metric_kwargs, fisher_mode="mean", micro_batch=m,
                     progress=False)
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
        if tprof is not None and run == args.torch_profile_run:
            tprof.__exit__(None, None, None)
            profiled = runs[-1]
        if phases is not None:
            run_phases.append({k: round(v, 3) for k, v in phases.items()})
    wall = runs[-1]
    earlier = run_phases[:-1]
    if tprof is not None:
        kernels = [e for e in tprof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        table = tprof.key_averages()
        Path(args.torch_profile).write_text(
            f"run {args.torch_profile_run}: wall {profiled:.2f} s, GPU busy {sum(e.device_time for e in kernels) / 1e6:.2f} s, "
            f"{len(kernels)} kernels\n"
            + table.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
            + table.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    if prof:
        prof.disable()
        prof.dump_stats(args.profile)
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof, stream=sys.stderr).sort_stats(key).print_stats(40)
    peak = torch.cuda.max_memory_allocated(0) - base
    gib = 2**30
    print(json.dumps({
        "chunk": args.chunk, "layers": layers, "passes": plan["passes"], "micro_batch": m,
        "format": fmt, "budget_gib": budget / gib, "model_gib": base / gib,
        "predicted_peak_gib": max(plan["peaks"]) / gib, "measured_peak_gib": peak / gib,
        "reserved_peak_gib": torch.cuda.max_memory_reserved(0) / gib,
        "allocator": {k: torch.cuda.memory_stats(0).get(k) for k in (
            "num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")},
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "memory_terms_gib": {k: v / gib for k, v in plan["memory"][0].items()},
        "estimate_s": plan["estimate_s"], "collect_and_score_s": wall, "model_build_s": load_s,
        "runs_s": runs, "reserve_s": reserve_s, **({"plain_s": plain_pass(model, batches)} if args.plain else {}),
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sdpa": args.sdpa,
        "gram_norms": not args.no_gram_norms, "pad_multiple": args.pad_multiple,
        **({"phase_seconds": run_phases[-1]} if run_phases else {}),
        **({"phase_seconds_earlier_runs": earlier} if earlier else {})}))


def plain_pass(model, batches: dict) -> float:
    """Seconds of one plain forward+backward over every sample of ``batches``
    (bench_b2_workflow.timed_passes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from bench_b2_workflow import attention_trainable, timed_passes

    ids = torch.cat([b["input_ids"] for by in batches.values() for b in by.values()])
    lengths = torch.cat([b["attention_mask"].sum(1) for by in batches.values()
                         for b in by.values()])
    device = next(model.parameters()).device
    parts = [ids[k:k + 8, :int(lengths[k:k + 8].max())].to(device)
             for k in range(0, len(ids), 8)]
    attention_trainable(model)
    seconds = timed_passes(model, [{"input_ids": x, "labels": x} for x in parts])
    model.zero_grad(set_to_none=True)
    return seconds


def _install_phase_timers() -> dict:
    """Wrap the steps of the collection loop with timers that synchronise the GPU before
    and after (so each step's kernels count to it): name -> seconds, filled as they run.
    Nested wrapped calls count to both (forward inside the losses, forming inside the
    records' norms)."""
    import functools

    import torch

    from interference.architectures.indexer import QKOVIndexer
    from interference.gradients import collect, fisher, per_sample, store
    from interference.gradients.factored import FactorLayout
    from interference.scores import layerwise

    seconds: dict[str, float] = {}

    def wrap(owner, name, label):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.synchronize()
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - t
        setattr(owner, name, timed)

    wrap(per_sample.PerSampleGradients, "_batch_losses", "forward (losses)")
    wrap(per_sample._HookCapture, "backward", "backward (deltas)")
    wrap(per_sample._HookCapture, "form_all", "form per-sample grads (norms / squares)")
    wrap(per_sample.PerSampleGradients, "_factors_of", "factors_of")
    wrap(per_sample, "_right_pad", "right_pad (to device)")
    wrap(store.GradientStore, "add", "store.add (records)")
    wrap(FactorLayout, "rebuild", "rebuild rows")
    wrap(fisher.FisherCollector, "collect_fisher", "collect_fisher (all of a call)")
    wrap(fisher.FisherCollector, "_coverage", "collector._coverage")
    wrap(fisher.FisherCollector, "_check_roles", "collector._check_roles")
    wrap(fisher.TaskFisher, "update", "TaskFisher.update")
    wrap(fisher.TaskFisher, "flush", "TaskFisher.flush")
    wrap(per_sample.PerSampleGradients, "__init__", "PerSampleGradients.__init__")
    wrap(per_sample._HookCapture, "__init__", "_HookCapture.__init__")
    wrap(QKOVIndexer, "gather", "indexer.gather (Fisher squares)")
    wrap(collect, "take", "collect.take (slice a batch)")
    wrap(layerwise, "arm_results", "arm_results (scoring)")
    return seconds


if __name__ == "__main__":
    main()
