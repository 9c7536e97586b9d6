"""Where B6's three stages spend their time on a GPU: wall seconds, GPU busy seconds (the
sum of kernel times), kernel launches, the ops with most CPU and GPU time, a cProfile of
``compute_heatmap``, and one plain forward+backward over the same 300 samples (the floor).
Same model and samples as ``bench_kronfluence.py`` (whose functions it reuses); every stage
is run once at the same shapes first (untimed), then profiled alone.

    python benchmarks/profile_b6_gpu.py            # one CUDA card; prints tables + a JSON line
"""
from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kronfluence as b6  # noqa: E402


def gpu_busy(prof) -> tuple[float, int]:
    """(seconds of kernel time, number of kernels) in a profile."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e6, len(kernels)


def stage(name, fn, device, out: dict, rows: int = 25):
    """Run ``fn`` once under torch.profiler and cProfile: wall, GPU busy, kernels, tables."""
    pr = cProfile.Profile()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        b6.sync(device)
        t0 = time.perf_counter()
        pr.enable()
        result = fn()
        b6.sync(device)
        pr.disable()
        wall = time.perf_counter() - t0
    busy, kernels = gpu_busy(prof)
    out[name] = {"wall_s": wall, "gpu_busy_s": busy, "kernels": kernels}
    print(f"\n===== {name}: wall {wall:.3f} s, GPU busy {busy:.3f} s, {kernels} kernels")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(rows)
    print(s.getvalue())
    return result


def main():
    ap = b6.shape_parser(__doc__.split("\n")[0])
    args = ap.parse_args()
    from interference.gradients import FisherCollector
    from interference.scores import QKOVInterferenceMetric

    model = b6.build_model(args)
    sets = b6.make_sets(args)
    out = {"warm_up_s": b6.run_ours(model, sets, args)["seconds"]}    # full shapes, untimed
    out["plain_fwd_bwd_s"] = min(b6.plain_seconds(model, sets, args) for _ in range(2))
    stage("plain", lambda: b6.plain_seconds(model, sets, args), args.device, out, 10)
    half = args.n // 2
    fc = FisherCollector(enable_cross_task_analysis=True, micro_batch=args.micro_batch)

    def fisher():
        fc.collect_fisher(model, b6.batch_of(sets["fisher"][:half], "a:f"), task="a", role="fisher")
        fc.collect_fisher(model, b6.batch_of(sets["fisher"][half:], "b:f"), task="b", role="fisher")

    def scored():
        fc.collect_fisher(model, b6.batch_of(sets["a"], "a:s"), task="a", role="scored")
        fc.collect_fisher(model, b6.batch_of(sets["b"], "b:s"), task="b", role="scored")

    stage("fisher", fisher, args.device, out)
    stage("scored", scored, args.device, out)
    stage("heatmap_first", lambda: QKOVInterferenceMetric(fc.config, fc).compute_heatmap("a", "b"),
          args.device, out)
    stage("heatmap_again", lambda: QKOVInterferenceMetric(fc.config, fc).compute_heatmap("a", "b"),
          args.device, out)
    out["store"] = {"device": str(fc.gradient_manager.device),
                    "layout": fc.gradient_manager.layout is not None}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
