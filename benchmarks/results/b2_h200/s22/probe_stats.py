"""Session 22: where the B2 stats job's time goes on the device host. Replays the stats
stage's work on a B2 run's split folder in a fresh process, timing the imports, the load
and the test (cProfile of the test with --profile). Thread count from the environment.

    OMP_NUM_THREADS=4 PYTHONPATH=src python3 probe_stats.py <split folder> [--profile]
"""
import json
import os
import sys
import time

t0 = time.perf_counter()
import numpy  # noqa: E402,F401 (timed on its own)
import yaml  # noqa: E402

t_np = time.perf_counter()
from interference.results import load_heatmap  # noqa: E402
from interference.stats import QKOVStatistics  # noqa: E402

t_imp = time.perf_counter()
folder = sys.argv[1]
cfg = yaml.safe_load(open(os.path.join(folder, "config.stats.yaml")))["config"]["stats"]
cfg = dict(cfg)
cfg.pop("reference")
heat, ref = load_heatmap(folder)
t_load = time.perf_counter()
meta, extra = heat["meta"], heat["extra"]
stats = QKOVStatistics(**cfg)
blocks = ["Q", "K", "V", "O"]
if "--profile" in sys.argv:
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
t = time.perf_counter()
res = stats.test_scores({b: heat[b]["scores"] for b in blocks}, ref, meta["layers"], meta["heads"],
                        meta["kv_head_of"], variant=meta["variant"],
                        ids_b=[("b", i) for i in meta["sample_ids_b"]],
                        ids_r=[("r", i) for i in extra["sample_ids_r"]],
                        ids_a=[("a", i) for i in meta["sample_ids_a"]])
t_test = time.perf_counter() - t
if "--profile" in sys.argv:
    pr.disable()
    pstats.Stats(pr).sort_stats("cumulative").print_stats(25)
print(json.dumps({"threads": os.environ.get("OMP_NUM_THREADS"), "import_numpy_s": round(t_np - t0, 2),
                  "import_stats_s": round(t_imp - t_np, 2), "load_s": round(t_load - t_imp, 2),
                  "test_s": round(t_test, 2), "n_significant": res["summary"]["n_significant"]}))
