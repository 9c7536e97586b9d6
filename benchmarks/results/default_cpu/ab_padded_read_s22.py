"""Session 22: one score_arms pass (both arms and the reference, 2 threads, freed memory
kept, as the scoring job runs it) on a finished default run's stores, timed without a
profiler; run it alternately with the tree before and after the change:

    PYTHONPATH=<tree>/src python benchmarks/results/default_cpu/ab_padded_read_s22.py RESULTS
"""
import json
import sys
import time
from pathlib import Path

from qkov_pipeline.jobs import set_freed_memory

set_freed_memory("keep")
import torch  # noqa: E402

torch.set_num_threads(2)
from interference.gradients import FisherCollector  # noqa: E402
from interference.scores import QKOVInterferenceMetric  # noqa: E402
from interference.scores.arms import score_arms  # noqa: E402

stores = Path(sys.argv[1]) / "_stores"
fc = FisherCollector.from_saved([next(stores.glob("math*/grads")),
                                 next(stores.glob("code*/grads"))])
metric = QKOVInterferenceMetric(fc.config, fc, device="cpu")
t = time.perf_counter()
score_arms(metric, ("main", "control"), "math", "code", "math",
           fc.sample_ids("math", "reference"))
print(json.dumps({"src": str(Path(sys.modules["interference"].__file__).parents[1]),
                  "one_pass_s": round(time.perf_counter() - t, 2)}))
