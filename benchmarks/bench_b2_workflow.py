"""B2 through the workflow: the 7B-shape experiment (conf/experiment/b2_7b.yaml) end to end,
and in the same run one plain forward+backward over the same samples.

    python benchmarks/bench_b2_workflow.py WORKDIR [--gpus 1] [--experiment b2_7b]
        [--overrides '...'] [--device cuda]
    python benchmarks/bench_b2_workflow.py WORKDIR --dry-plan [--gpu-gib 139.8]

1. Runs ``snakemake --cores all --config experiment=b2_7b --resources gpu=N`` (the host's
   cores: the chunk jobs of random weights run beside prepare_model) up to the pair's
   cells.csv (model, data, chunk_scores, scores, stats, tables: gradients -> map ->
   permutations; figures and summary left out) in WORKDIR, timing it.
2. Reads what the chunk jobs recorded (heatmap.json ``extra.layer_chunks``): device, passes,
   seconds loading the model, collecting and scoring, peak GPU memory; and every job's peak
   resident memory (Snakemake's benchmark files, max_rss).
3. Loads the same model (``load_prepared``: random weights built on the GPU) and the same
   prepared samples (every role of both tasks), and times ONE plain forward+backward over
   them: micro-batch 8 as the workflow, only the attention weights trainable, mean token
   loss, no per-sample anything (after one untimed warm-up micro-batch); once with the
   attention mask and once without it (right padding of a causal model needs none, and
   the workflow drops it where it probes the model causal). The ratio is to the faster.
Prints one JSON line and a table: end to end (model load excluded: the chunks' load time
on the critical path subtracted), plain forward+backward, their ratio, per-chunk times,
peak host and GPU memory, disk of the results folder, and two measures of the host's
speed (a fresh import of torch and transformers; a fixed Python loop), so runs on different
machines can be compared. B2 bar: <= 60 s end to end on one H200.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MICRO_BATCH = 8


def run_workflow(work: Path, exp: str, gpus: int, overrides: str, extra: list[str]) -> tuple[float, Path]:
    """Snakemake up to the pair's cells.csv; returns (seconds, cells.csv path)."""
    sys.path.insert(0, str(ROOT / "src"))
    from qkov_pipeline import plan as qp

    ov = [o.strip() for o in overrides.strip("[]").split(",") if o.strip()]
    plan = qp.build_plan(ROOT / "conf", ROOT / "workflow" / "schemas" / "config.schema.yaml",
                         [exp], ov)
    targets = [f"{plan.analysis_dir(e, m, p)}/cells.csv" for (e, m, p) in plan.analyses]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
           "--cores", "all", "--resources", f"gpu={gpus}",
           "--config", f"experiment={exp}", f"overrides=[{', '.join(ov)}]", *extra,
           "--", *targets]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    with open(work / "snakemake.log", "w") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode:
        print((work / "snakemake.log").read_text()[-6000:], file=sys.stderr)
        sys.exit(f"workflow failed ({res.returncode}); log: {work / 'snakemake.log'}")
    return seconds, work / targets[0]


def job_stats(results: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(rule -> the largest max_rss in MB of its jobs, rule -> the longest wall seconds of
    its jobs), from Snakemake's benchmark files."""
    rss, secs = {}, {}
    for tsv in (results / "benchmarks").rglob("*.tsv"):
        rule = tsv.relative_to(results / "benchmarks").parts[0]
        head, row = tsv.read_text().splitlines()[:2]
        rec = dict(zip(head.split("\t"), row.split("\t")))
        for out, key in ((rss, "max_rss"), (secs, "s")):
            try:
                out[rule] = max(out.get(rule, 0.0), float(rec[key]))
            except (KeyError, ValueError):
                pass
    return rss, secs


def attention_trainable(model) -> None:
    """Only the attention projections require gradients (as in the engine's passes)."""
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in ("q_proj", "k_proj", "v_proj", "o_proj")))


def timed_passes(model, batches: list[dict]) -> float:
    """Seconds of one forward+backward, ``model(**b).loss.backward()``, per batch, after
    one untimed warm-up on the first (the GPU synchronised around the timed ones)."""
    import torch

    cuda = next(model.parameters()).is_cuda

    def run(bs):
        for b in bs:
            model(**b).loss.backward()
        if cuda:
            torch.cuda.synchronize()
    run(batches[:1])
    t0 = time.perf_counter()
    run(batches)
    return time.perf_counter() - t0


def plain_forward_backward(results: Path, device: str) -> dict:
    """One batched forward+backward over every prepared sample (attention weights
    trainable), timed after one untimed warm-up micro-batch."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from interference.data import load_task_batches
    from interference.models import load_prepared

    import yaml

    model_dir = next((results / "_models").glob("*/model.json")).parent
    mcfg = yaml.safe_load((model_dir / "config.prepare_model.yaml").read_text())
    mcfg = _find(mcfg, "model")
    t0 = time.perf_counter()
    model, _ = load_prepared(model_dir, mcfg, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_load = time.perf_counter() - t0
    attention_trainable(model)
    batches = []
    for manifest in sorted((results / "_data").glob("*/manifest.json")):
        by_role, _, _ = load_task_batches(manifest.parent)
        for b in by_role.values():
            n = len(b["sample_ids"])
            batches += [{k: b[k][a:a + MICRO_BATCH].to(device)
                         for k in ("input_ids", "attention_mask", "labels")}
                        for a in range(0, n, MICRO_BATCH)]

    masked = timed_passes(model, batches)
    unmasked = timed_passes(model, [{k: b[k] for k in ("input_ids", "labels")} for b in batches])
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    return {"plain_fwd_bwd_s": min(masked, unmasked), "plain_masked_s": masked,
            "plain_unmasked_s": unmasked, "plain_samples": n, "plain_model_load_s": t_load}


def _find(doc, key):
    """The first value of ``key`` in a nested dict (the model section of a resolved config)."""
    if isinstance(doc, dict):
        if key in doc and isinstance(doc[key], dict) and "source" in doc[key]:
            return doc[key]
        for v in doc.values():
            got = _find(v, key)
            if got is not None:
                return got
    return None


def host_speed() -> dict:
    """Two measures of the host's speed, taken after the workflow, to tell a slow machine
    from a slow workflow when B2 runs are compared (session 17: the same code took 52.7 s
    on one H200 machine and 68.2 s on another whose CPU-side jobs were 20-30% slower):
    ``host_import_s``, a fresh interpreter importing torch and transformers and making a
    LLaMA config (what each job of the workflow pays before its work), and
    ``host_python_s``, a fixed single-threaded pure-Python loop."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers; transformers.LlamaConfig"],
                   check=True, capture_output=True)
    t1 = time.perf_counter()
    sum(k * k for k in range(3_000_000))
    return {"host_import_s": t1 - t0, "host_python_s": time.perf_counter() - t1}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--experiment", default="b2_7b")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--overrides", default="++tracking.mode=off")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smk-args", default="", help="extra snakemake arguments")
    ap.add_argument("--dry-plan", action="store_true",
                    help="print the chunk jobs' passes, micro-batch and predicted peak memory "
                         "per pass, run nothing")
    ap.add_argument("--gpu-gib", type=float, default=139.8,
                    help="the GPU's memory for --dry-plan (H200: 139.8)")
    args = ap.parse_args(argv)
    if args.dry_plan:           # also `qkov plan` (qkov_pipeline.dry_plan)
        sys.path.insert(0, str(ROOT / "src"))
        from qkov_pipeline.dry_plan import dry_plan, print_dry_plan

        ov = [o.strip() for o in args.overrides.strip("[]").split(",") if o.strip()]
        print_dry_plan(dry_plan(args.experiment, ov, args.gpu_gib))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    wall, cells = run_workflow(args.work, args.experiment, args.gpus, args.overrides,
                               args.smk_args.split())
    results = args.work / "results"
    heat = json.loads((cells.parent / "split0" / "heatmap.json").read_text())
    chunks = heat["extra"].get("layer_chunks") or []
    # the chunks' model loads on the critical path: all of them on one GPU (one after the
    # other), the slowest per GPU otherwise
    by_gpu: dict[str, float] = {}
    for c in chunks:
        by_gpu[c["device"]] = by_gpu.get(c["device"], 0.0) + (c["seconds_load"] or 0.0)
    load = max(by_gpu.values()) if by_gpu else 0.0
    plain = plain_forward_backward(results, args.device)
    end_to_end = wall - load
    peaks, seconds = job_stats(results)
    speed = host_speed()
    row = {"benchmark": "B2 through the workflow", "experiment": args.experiment,
           "gpus": args.gpus, "workflow_wall_s": wall, "model_load_s": load,
           "end_to_end_s": end_to_end, **plain,
           "ratio_end_to_end_to_plain": end_to_end / plain["plain_fwd_bwd_s"],
           "chunks": [{k: c[k] for k in ("index", "device", "passes", "seconds_load",
                                         "seconds_collect_and_score", "estimate_s",
                                         "peak_device_bytes")}
                      | {k: c.get(k) for k in ("micro_batch", "predicted_peak_bytes")}
                      for c in chunks],
           "peak_host_rss_mb": max(peaks.values()) if peaks else None, "peak_rss_by_rule_mb": peaks,
           "seconds_by_rule": seconds,
           "results_disk_bytes": du(results), "cells": str(cells), **speed}
    try:
        import torch

        row.update(torch=torch.__version__, device_name=torch.cuda.get_device_name()
                   if args.device.startswith("cuda") else "cpu")
    except Exception:       # noqa: BLE001 (a report, not a result)
        pass
    print(json.dumps(row))
    say = lambda *a: print(*a, file=sys.stderr)  # noqa: E731 (the table; JSON on stdout)
    say(f"\nB2 through the workflow ({args.experiment}, {args.gpus} GPU(s))")
    say(f"  workflow wall time            {wall:8.1f} s")
    say(f"  model load (critical path)    {load:8.1f} s")
    say(f"  end to end, load excluded     {end_to_end:8.1f} s   (bar: <= 60 s)")
    say(f"  plain forward+backward        {plain['plain_fwd_bwd_s']:8.1f} s   "
          f"({plain['plain_samples']} samples, micro-batch {MICRO_BATCH}; masked "
          f"{plain['plain_masked_s']:.1f} s, unmasked {plain['plain_unmasked_s']:.1f} s)")
    say(f"  ratio                         {row['ratio_end_to_end_to_plain']:8.2f}")
    for c in row["chunks"]:
        peak = c["peak_device_bytes"]
        say(f"  chunk {c['index']} on {c['device']}: {len(c['passes'])} pass(es), load "
              f"{c['seconds_load'] or 0:.1f} s, collect+score {c['seconds_collect_and_score']:.1f} s "
              f"(estimate {c['estimate_s']:.0f} s), micro-batch {c['micro_batch']}, peak GPU "
              f"{(peak or 0) / 2**30:.1f} GiB (predicted beyond the model "
              f"{(c['predicted_peak_bytes'] or 0) / 2**30:.1f} GiB)")
    say("  longest job per rule (s):     " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    say(f"  peak host resident memory     {row['peak_host_rss_mb'] or 0:8.0f} MB (largest job)")
    say(f"  results on disk               {row['results_disk_bytes'] / 2**20:8.1f} MB")
    say(f"  host speed                    {speed['host_import_s']:8.1f} s to import torch and "
        f"transformers afresh, {speed['host_python_s']:.2f} s of a fixed Python loop")


if __name__ == "__main__":
    main()
