"""The default CPU run's engine work against plain forward+backward, with peak memory.

What the default workflow's collect and scores jobs do, through the same library calls, on
a random-weight model of SmolLM2-135M's shape (30 layers, width 576, 9 heads, 3 KV heads,
vocab 49152; ``--layers`` fewer for a quick run), random tokens:

1. ``collect`` (one fresh process per task): Fisher (mode mean), scored, reference and
   control samples (the last two for task A only) with the default collect settings
   (``gradient_format`` auto, ``gradient_memory_mb`` 0 or ``--gradient-memory-mb``,
   ``--store-dtype``, micro-batch 8), saved;
2. ``scores`` (one fresh process): both stores opened (``FisherCollector.from_saved``),
   the main and control heatmaps and the reference scores in one pass (``score_arms``, as
   the workflow's ``chunk_scores`` job);
3. ``plain``: batched forward+backward over the same samples (attention weights
   trainable, micro-batch 8), in a fresh process.

Each stage's wall time, CPU time (user + system) and peak resident memory (``ru_maxrss``
of its process), the stores' bytes on disk, and (collect + scores) / plain, of wall and of
CPU seconds. Prints one JSON line; ``--work DIR`` keeps the stores.

    python benchmarks/bench_default_run.py --threads 2                 # default sizes
    python benchmarks/bench_default_run.py --threads 1 --layers 2 --vocab 2048 \\
        --n-fisher 8 --n-scored 8 --tokens 32                          # quick
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {bench_dir!r})
import bench_default_run as b
args = b.parse({argv!r})
torch.set_num_threads(args.threads)
if not args.glibc_default_heap:   # as the workflow's job frame does for the rule
    from qkov_pipeline.jobs import set_freed_memory
    set_freed_memory("keep" if {stage!r} == "scores" else "return")
t0 = time.perf_counter()
ru = resource.getrusage(resource.RUSAGE_SELF)
cpu0 = ru.ru_utime + ru.ru_stime
extra = getattr(b, "stage_" + {stage!r})(args, {task!r})
ru = resource.getrusage(resource.RUSAGE_SELF)
print("RESULT " + json.dumps(dict(seconds=time.perf_counter() - t0,
      cpu_seconds=ru.ru_utime + ru.ru_stime - cpu0, peak_rss_mb=ru.ru_maxrss / 1024,
      **(extra or {{}}))))
"""


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--n-fisher", type=int, default=64)
    ap.add_argument("--n-scored", type=int, default=48, help="also reference and control")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--gradient-format", default="auto")
    ap.add_argument("--gradient-memory-mb", type=float, default=0,
                    help="the collect jobs' in-memory store budget (the workflow's default)")
    ap.add_argument("--store-dtype", default="float32", help="fisher.store_dtype")
    ap.add_argument("--glibc-default-heap", action="store_true",
                    help="leave glibc's dynamic mmap threshold as it is (before session 6), "
                         "not the job frame's jobs.set_freed_memory (the scores stage 'keep', "
                         "as resources.scores since session 19; the others 'return')")
    ap.add_argument("--masked-batches", action="store_true",
                    help="run the engine's right-padded batches with their attention mask even "
                         "where the model is causal (as before session 6): an A/B of "
                         "per_sample.padding_of")
    ap.add_argument("--work", default=None, help="folder for the stores (default: a temp one)")
    return ap.parse_args(argv)


def model_of(args):
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=576, num_hidden_layers=args.layers, num_attention_heads=9,
                        num_key_value_heads=3, intermediate_size=1536, vocab_size=args.vocab,
                        max_position_embeddings=2048, tie_word_embeddings=True)
    return T.LlamaForCausalLM(cfg).eval()


def roles_of(args, task: str) -> dict[str, int]:
    n = {"fisher": args.n_fisher, "scored": args.n_scored}
    if task == "a":
        n.update(reference=args.n_scored, control=args.n_scored)
    return n


def batch_of(args, task: str, role: str, n: int) -> dict:
    """Random tokens; lengths spread over [tokens/2, tokens] as truncated samples are."""
    import torch

    g = torch.Generator().manual_seed(hash((task, role)) % 2 ** 31)
    ids = torch.randint(0, args.vocab, (n, args.tokens), generator=g)
    mask = torch.zeros_like(ids)
    for k in range(n):
        mask[k, :args.tokens // 2 + (k * 7919) % (args.tokens // 2 + 1)] = 1
    return {"input_ids": ids * mask, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
            "sample_ids": [f"{task}:{role}:{k}" for k in range(n)]}


def stage_collect(args, task: str) -> dict:
    from interference.gradients import FisherCollector, per_sample

    if args.masked_batches:
        per_sample.padding_of = lambda model: "masked"

    model = model_of(args)
    fc = FisherCollector(enable_cross_task_analysis=True,
                         gradient_memory_mb=args.gradient_memory_mb,
                         micro_batch=args.micro_batch, gradient_format=args.gradient_format,
                         store_dtype=args.store_dtype, spill_dir=Path(args.work) / f".spill-{task}")
    for role, n in roles_of(args, task).items():
        batch = batch_of(args, task, role, n)
        step = args.micro_batch if role == "fisher" else n    # the Fisher one unit per call
        for a in range(0, n, step):
            part = {k: v[a:a + step] for k, v in batch.items()}
            fc.collect_fisher(model, part, task=task, mode="mean", role=role)
    fc.save_task(task, Path(args.work) / task)
    return {}


def stage_scores(args, task: str) -> dict:
    from interference.gradients import FisherCollector
    from interference.scores import QKOVInterferenceMetric
    from interference.scores.arms import score_arms

    fc = FisherCollector.from_saved([Path(args.work) / "a", Path(args.work) / "b"])
    metric = QKOVInterferenceMetric(fc.config, fc, device="cpu")
    # as the workflow's chunk_scores job: both arms and the reference in one pass
    score_arms(metric, ("main", "control"), "a", "b", "a", fc.sample_ids("a", "reference"))
    return {}


def stage_plain(args, task: str) -> dict:
    """Batched forward+backward over every collected sample, attention weights trainable."""
    model = model_of(args)
    for name, p in model.named_parameters():
        p.requires_grad_(".self_attn." in name)
    for t in ("a", "b"):
        for role, n in roles_of(args, t).items():
            batch = batch_of(args, t, role, n)
            for a in range(0, n, args.micro_batch):
                part = {k: v[a:a + args.micro_batch] for k, v in batch.items()
                        if k != "sample_ids"}
                model(**part).loss.backward()
                model.zero_grad(set_to_none=True)
    return {}


def run_stage(args, argv, stage: str, task: str = "") -> dict:
    code = CHILD.format(bench_dir=str(Path(__file__).parent), argv=argv, stage=stage, task=task)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ))
    if out.returncode:
        raise RuntimeError(f"stage {stage} {task} failed:\n{out.stderr[-3000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-default-run-")
        args.work = tmp.name
        argv += ["--work", args.work]
    load = os.getloadavg()
    stages = {"collect_a": run_stage(args, argv, "collect", "a"),
              "collect_b": run_stage(args, argv, "collect", "b"),
              "scores": run_stage(args, argv, "scores"),
              "plain": run_stage(args, argv, "plain")}
    store = sum(f.stat().st_size for f in Path(args.work).rglob("*.bin"))
    work = sum(stages[s]["seconds"] for s in ("collect_a", "collect_b", "scores"))
    out = {"benchmark": "default CPU run (engine side)", "args": {k: v for k, v in vars(args).items()
                                                                   if k != "work"},
           "stages": stages, "stores_bytes": store,
           "peak_rss_mb": max(v["peak_rss_mb"] for k, v in stages.items() if k != "plain"),
           "collect_and_scores_s": work, "plain_s": stages["plain"]["seconds"],
           "ratio": work / stages["plain"]["seconds"],
           "collect_ratio": (stages["collect_a"]["seconds"] + stages["collect_b"]["seconds"])
           / stages["plain"]["seconds"],
           # CPU seconds of each process (user + system): less sensitive to other jobs on
           # shared cores than wall time
           "cpu_ratio": sum(stages[s]["cpu_seconds"] for s in ("collect_a", "collect_b", "scores"))
           / stages["plain"]["cpu_seconds"],
           "load_before": load, "load_after": os.getloadavg(), "time": time.time()}
    print(json.dumps(out))
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
