"""A Fisher pass (square_sums, 32 samples of 106 tokens, micro-batch 8, 2 threads) of the
default model (SmolLM2-135M from its GGUF) with the whole-tensor square-sum loop and with
kernels.square_sum (blocks), alternated in one process, totals checked bitwise equal.

    PYTHONPATH=src python benchmarks/results/default_cpu/ab_fisher_pass_s28.py

Session 28 on the 2-core Xeon: rounds whole 10.78 / 11.90 / 11.05 / 11.06 s, blocks
11.02 / 11.23 / 10.81 / 10.46 s; medians 11.06 and 10.92 s (1%, within the noise).
"""
import time, torch, yaml, statistics
torch.set_num_threads(2)
from interference.models import build_from_config
from interference.architectures import QKOVConfig, QKOVIndexer
from interference.gradients import CausalLMObjective, PerSampleGradients, per_sample
from interference.gradients.kernels import square_sum
m, tok = build_from_config(yaml.safe_load(open("conf/model/smollm2.yaml")), weights=True)
m.eval()
torch.manual_seed(0)
n, T = 32, 106
ids = torch.randint(0, 49152, (n, T))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
idx = QKOVIndexer(m, QKOVConfig.from_model(m))
sid = [f"s:{k}" for k in range(n)]
def whole(g):
    acc = torch.zeros(g.shape[1:], dtype=torch.float64)
    for gk in g: acc.addcmul_(gk, gk)
    return acc
def fisher(fn):
    per_sample.square_sum = fn
    eng = PerSampleGradients(m, idx, CausalLMObjective(), micro_batch=8, engine="hooks")
    t = time.perf_counter()
    for tot, *_ in eng.square_sums(batch, sid): pass
    return time.perf_counter() - t, tot
fisher(whole); fisher(square_sum)
res = {"whole": [], "blocks": []}
for r in range(4):
    a, ta = fisher(whole); b, tb = fisher(square_sum)
    assert torch.equal(ta, tb)
    res["whole"].append(a); res["blocks"].append(b)
    print(f"round {r}: whole {a:.2f} s, blocks {b:.2f} s", flush=True)
print({k: round(statistics.median(v), 2) for k, v in res.items()})
