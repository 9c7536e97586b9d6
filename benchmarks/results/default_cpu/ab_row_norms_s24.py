"""Session 24: a stored-role collect of 16 samples (SmolLM2-135M's shape, random weights,
64-128 tokens, 2 threads) with each formed gradient's squared norm as the float64 norm of
the whole (old) and as the float64 sum of float32 row norms (new, per_sample._row_norms2),
alternating four times in one process; prints the norms' largest relative difference.

    PYTHONPATH=src python benchmarks/results/default_cpu/ab_row_norms_s24.py
"""
import sys, time, tempfile, torch, statistics
from pathlib import Path
sys.path.insert(0, "benchmarks")
import bench_default_run as b
from interference.gradients import FisherCollector, per_sample
from qkov_pipeline.jobs import set_freed_memory
set_freed_memory("return")
args = b.parse(["--threads", "2"])
torch.set_num_threads(2)
model = b.model_of(args)
work = Path(tempfile.mkdtemp())
batch = b.batch_of(args, "a", "scored", 16)
new_keep = per_sample._HookCapture._keep
def old_keep(self, name, g):
    if self.reduce != "norms":
        return new_keep(self, name, g)
    idx = self.covered.get(name)
    flat = g.flatten(1) if idx is None else g.flatten(1).index_select(1, idx)
    self.norm2[name] = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64).square()
    if name in self.keep:
        self.grads[name] = g
def collect():
    fc = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=0, micro_batch=8,
                         gradient_format="auto", store_dtype="bfloat16", spill_dir=work / "sp")
    fc.collect_fisher(model, batch, task="a", mode="mean", role="scored")
    return fc
collect()
res = {"old": [], "new": []}
norms = {}
for _ in range(4):
    for k, keep in (("old", old_keep), ("new", new_keep)):
        per_sample._HookCapture._keep = keep
        t0 = time.perf_counter(); fc = collect(); res[k].append(time.perf_counter() - t0)
        norms[k] = fc.gradient_manager.grad_norms("a", batch["sample_ids"])
import numpy as np
print("max rel diff of the norms", float(np.max(np.abs(np.asarray(norms["new"]) - norms["old"]) / np.asarray(norms["old"]))))
for k, v in res.items(): print(k, [round(x, 2) for x in v], "median", round(statistics.median(v), 2))
