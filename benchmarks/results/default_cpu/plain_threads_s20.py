"""Plain attention-only forward+backward passes over one role of the math task of a
finished default run, with a given torch thread count (session 20, RESULTS.md): run one
process with 2 threads, then two with 1 thread at once, to compare throughput.

    PYTHONPATH=src python benchmarks/results/default_cpu/plain_threads_s20.py 2 scored RESULTS
    PYTHONPATH=src python benchmarks/results/default_cpu/plain_threads_s20.py 1 scored RESULTS &
    PYTHONPATH=src python benchmarks/results/default_cpu/plain_threads_s20.py 1 reference RESULTS
"""
import sys
from pathlib import Path

import torch
import yaml

threads, role, R = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
torch.set_num_threads(threads)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import bench_b2_workflow as bb  # noqa: E402
from interference.data import load_task_batches  # noqa: E402
from interference.models import load_prepared  # noqa: E402
from qkov_pipeline.jobs import set_freed_memory  # noqa: E402

set_freed_memory("return")
model_dir = next((R / "_models").glob("*/model.json")).parent
mcfg = bb._find(yaml.safe_load((model_dir / "config.prepare_model.yaml").read_text()), "model")
model, _ = load_prepared(model_dir, mcfg, "cpu")
batches, _, _ = load_task_batches(next((R / "_data").glob("math*/manifest.json")).parent)
b = batches[role]
n = len(b["sample_ids"])
bb.attention_trainable(model)
mbs = [{k: b[k][a:a + 8] for k in ("input_ids", "labels")} for a in range(0, n, 8)]
bb.timed_passes(model, mbs[:1])                       # warm-up
t = bb.timed_passes(model, mbs)
print(f"threads {threads} role {role} n {n}: {t:.1f} s, {t / n:.3f} s/sample", flush=True)
