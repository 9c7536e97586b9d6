"""cProfile of one score_arms pass (both arms and the reference) on a finished default run's
stores, as the scoring job runs it (2 threads, freed memory kept); session 20, RESULTS.md.

    PYTHONPATH=src python benchmarks/results/default_cpu/profile_score_arms_s20.py RESULTS
"""
import cProfile, pstats, sys, time
from pathlib import Path
from qkov_pipeline.jobs import set_freed_memory
set_freed_memory("keep")
import torch
torch.set_num_threads(2)
from interference.gradients import FisherCollector
from interference.scores import QKOVInterferenceMetric
from interference.scores.arms import score_arms
R = Path(sys.argv[1]) / "_stores"
fc = FisherCollector.from_saved([next(R.glob("math*/grads")), next(R.glob("code*/grads"))])
metric = QKOVInterferenceMetric(fc.config, fc, device="cpu")
ids_r = fc.sample_ids("math", "reference")
pr = cProfile.Profile(); t = time.perf_counter(); pr.enable()
score_arms(metric, ("main", "control"), "math", "code", "math", ids_r)
pr.disable(); print("one pass", time.perf_counter() - t)
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
