"""Session 16 probe: where a data job's 8 s of building the tokenizer go on the device
machine (cProfile of qkov_pipeline.stages.tokenizer.build_tokenizer for llama2_7b)."""
import cProfile
import pstats
import sys
import time

import yaml

sys.path.insert(0, "src")
t = time.perf_counter()
from qkov_pipeline.stages.tokenizer import build_tokenizer  # noqa: E402
print("import stages.tokenizer", round(time.perf_counter() - t, 2))
mcfg = yaml.safe_load(open("conf/model/llama2_7b.yaml"))
p = cProfile.Profile()
t = time.perf_counter()
p.enable()
build_tokenizer(mcfg)
p.disable()
print("build_tokenizer", round(time.perf_counter() - t, 2))
pstats.Stats(p).sort_stats("cumulative").print_stats(35)
