"""Peak resident memory of a collect job's steps, on the stores of a finished run.

Runs what rule ``collect`` runs for one task (the job's own model, data and settings, read
from ``results/_stores/<task>-*/config.collect.yaml``), role by role, while a thread reads
the process's resident set every 2 ms and keeps the largest value per step: ``load``, each
role outside the engine's steps, ``forward`` (the batched loss), ``backward`` (the
projections' output gradients) and ``form`` (per-sample gradients reduced or kept). Prints
one line per role and the process's ``ru_maxrss``. The job frame's heap setting
(``qkov_pipeline.jobs.set_freed_memory``) is applied as in the workflow.

    make run    # once, for results/
    python benchmarks/probe_collect_memory.py --results results --task math --micro-batch 4
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class StepPeaks:
    """Largest resident memory (MB) per step label, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.002):
        self.step, self.peaks, self.every = "load", {}, every
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            r, step = resident_mb(), self.step
            self.peaks[step] = max(self.peaks.get(step, 0.0), r)
            time.sleep(self.every)

    def label(self, owner, name: str, step: str):
        """Count the time inside ``owner.name`` as ``step``."""
        fn = getattr(owner, name)

        def labelled(*a, **k):
            before, self.step = self.step, step
            try:
                return fn(*a, **k)
            finally:
                self.step = before
        setattr(owner, name, labelled)


def only(folder: Path, pattern: str) -> Path:
    """The one file under ``folder`` matching ``pattern`` (a run of one model and one data
    set per task, as the default run); an error naming the candidates otherwise."""
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {folder}/{pattern}, found {[str(p) for p in found]}")
    return found[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--task", default="math")
    ap.add_argument("--roles", default="fisher,scored,reference")
    ap.add_argument("--n", type=int, default=48, help="samples per role (from the start)")
    ap.add_argument("--micro-batch", type=int, default=8, help="the engine's micro-batch")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    import yaml

    from qkov_pipeline.jobs import set_freed_memory
    torch.set_num_threads(args.threads)
    set_freed_memory("return")
    peaks = StepPeaks()

    from interference.architectures import QKOVConfig
    from interference.data import load_task_batches
    from interference.gradients import per_sample
    from interference.gradients.collect import collect_role, make_collector
    from interference.models import load_prepared

    peaks.label(per_sample.PerSampleGradients, "_batch_losses", "forward")
    peaks.label(per_sample._HookCapture, "backward", "backward")
    peaks.label(per_sample._HookCapture, "form_all", "form")
    res = Path(args.results)
    store = only(res / "_stores", f"{args.task}-*/config.collect.yaml")
    job = yaml.safe_load(store.read_text())
    mcfg = job["config"]["data"]["model"]
    model, _ = load_prepared(only(res / "_models", "*/model.json").parent, mcfg, "cpu")
    batches, _, _ = load_task_batches(only(res / "_data", f"{args.task}-*/manifest.json").parent)
    qcfg = QKOVConfig.from_model(model, include_bias=mcfg.get("include_bias", False),
                                 attention_stack=mcfg.get("attention_stack"))
    f, ex = job["config"]["fisher"], job["execution"]
    spill = Path(os.environ.get("TMPDIR", "/tmp")) / f"probe-spill-{os.getpid()}"
    collector = make_collector(f, ex, qcfg, spill, False, args.micro_batch)
    print(json.dumps({"load_mb": round(peaks.peaks.get("load", 0)), "micro_batch":
                      args.micro_batch, "threads": args.threads, "store": str(store.parent)}))
    for role in args.roles.split(","):
        peaks.step, peaks.peaks = role, {}
        t = time.perf_counter()
        n = min(args.n, len(batches[role]["sample_ids"]))
        collect_role(collector, model, batches[role], args.task, role, f["mode"], 0, n, 8)
        peaks.step = "idle"
        print(json.dumps({"role": role, "samples": n, "seconds": round(time.perf_counter() - t, 1),
                          "peak_mb": {k: round(v) for k, v in peaks.peaks.items()}}), flush=True)
    print(json.dumps({"ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                            / 1024)}))
    shutil.rmtree(spill, ignore_errors=True)


if __name__ == "__main__":
    main()
