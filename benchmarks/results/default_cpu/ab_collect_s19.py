"""A/B in one process, alternating: plain attention-only forward+backward passes against the
collect engine (collect_role, factored store spilled to disk) on one role of the math task
of a finished default run (session 19, RESULTS.md).

    PYTHONPATH=src python benchmarks/results/default_cpu/ab_collect_s19.py scored 2 /tmp/wfbench19/results
    PYTHONPATH=src python benchmarks/results/default_cpu/ab_collect_s19.py fisher 2 /tmp/wfbench19/results
"""
import shutil, statistics, sys, tempfile, time
from pathlib import Path

import torch
import yaml
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import bench_b2_workflow as bb  # noqa: E402
torch.set_num_threads(2)
from qkov_pipeline.jobs import set_freed_memory
set_freed_memory("return")
from interference.data import load_task_batches
from interference.models import load_prepared
from interference.architectures import QKOVConfig
from interference.gradients.collect import make_collector, collect_role
R = Path(sys.argv[3])
model_dir = next((R / "_models").glob("*/model.json")).parent
mcfg = bb._find(yaml.safe_load((model_dir / "config.prepare_model.yaml").read_text()), "model")
model, _ = load_prepared(model_dir, mcfg, "cpu")
batches, _, _ = load_task_batches(next((R / "_data").glob("math*/manifest.json")).parent)
store_cfg = yaml.safe_load(next((R / "_stores").glob("math*/config.collect.yaml")).read_text())
f = store_cfg["config"]["fisher"]
qcfg = QKOVConfig.from_model(model)
role = sys.argv[1]
b = batches[role]; n = len(b["sample_ids"])
print({k: (tuple(v.shape) if hasattr(v, "shape") else len(v)) for k, v in b.items()}, "mask mean", float(b["attention_mask"].float().sum(1).mean()))
def plain():
    bb.attention_trainable(model)
    mbs = [{k: b[k][a:a + 8] for k in ("input_ids", "labels")} for a in range(0, n, 8)]
    t = bb.timed_passes(model, mbs)
    model.zero_grad(set_to_none=True)
    for p in model.parameters(): p.requires_grad_(True)
    return t
def engine():
    spill = Path(tempfile.gettempdir()) / "ab_collect_spill"; shutil.rmtree(spill, ignore_errors=True)
    col = make_collector(f, {"gradient_memory_mb": 0, "gradient_format": "auto"}, qcfg, spill, False, 8)
    t = time.perf_counter()
    collect_role(col, model, b, "math", role, f["mode"], 0, n, 8)
    return time.perf_counter() - t
engine()
rounds = [(plain(), engine()) for _ in range(int(sys.argv[2]))]
print(role, n, "plain", [round(p,1) for p,_ in rounds], "engine", [round(e,1) for _,e in rounds], "median ratio", round(statistics.median(e/p for p,e in rounds),3))
