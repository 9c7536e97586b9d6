"""One score_arms pass (both arms and the reference, 2 threads, freed memory kept, as the
scoring job runs it) on a finished default run's stores, timed without a profiler, with a
sha256 over every score array it returns (the trees must agree bit for bit); run it
alternately with the tree before and after a change (session 22's padded reads, as
ab_padded_read_s22.py without the sha256, `ab_padded_read_s22.log`; session 23's scoring
in place, `ab_score_pass_s23.log`):

    PYTHONPATH=<tree>/src python benchmarks/results/default_cpu/ab_score_pass_s23.py RESULTS
"""
import hashlib
import json
import sys
import time
from pathlib import Path

from qkov_pipeline.jobs import set_freed_memory

set_freed_memory("keep")
import numpy as np  # noqa: E402
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
out = score_arms(metric, ("main", "control"), "math", "code", "math",
                 fc.sample_ids("math", "reference"))
seconds = time.perf_counter() - t
digest = hashlib.sha256()
for arm in sorted(out):
    heat, ref = out[arm]
    for block in "QKVO":
        digest.update(np.ascontiguousarray(heat[block]["scores"]).tobytes())
        digest.update(np.ascontiguousarray(ref[block]).tobytes())
print(json.dumps({"src": str(Path(sys.modules["interference"].__file__).parents[1]),
                  "one_pass_s": round(seconds, 2), "sha256": digest.hexdigest()[:16]}))
