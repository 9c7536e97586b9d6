"""Gradient store memory: resident memory stays bounded by ``gradient_memory_mb``.

    python benchmarks/bench_memory.py

Collects 200 per-sample gradients (4 MB each, 800 MB in all) of a small LLaMA twice, in
fresh processes: with a 1,000 MB budget (all in memory) and with an 8 MB budget (spilled
to disk), and reports each process's peak resident memory and the store's own usage.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys

CHILD = r"""
import json, resource, torch, transformers as T
from interference.gradients import FisherCollector
torch.manual_seed(0); torch.set_num_threads(2)
cfg = T.LlamaConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                    hidden_size=256, intermediate_size=512, vocab_size=512)
model = T.LlamaForCausalLM(cfg).eval()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fc = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=BUDGET)
for k in range(10):
    ids = torch.randint(0, 512, (20, 16))
    fc.collect_fisher(model, {"input_ids": ids, "sample_ids": [f"t:{k}:{i}" for i in range(20)]},
                      task="t", role="scored")
use = fc.gradient_manager.get_memory_usage()
print(json.dumps({"budget_mb": BUDGET, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mb": base / 1024, "store": use}))
"""


def main():
    rows = []
    for budget in (1000, 8):
        out = subprocess.run([sys.executable, "-c", CHILD.replace("BUDGET", str(budget))],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "store memory budget", "runs": rows}))


if __name__ == "__main__":
    main()
