"""Where a forward pass and a fine-tuning step of the validation spend their time on a GPU
(torch.profiler tables), and TF32's error on the counterfactuals: the one-off profile behind
RESULTS.md V1 (random weights of SmolLM2-135M's shape; nothing downloaded).

    python benchmarks/profile_counterfactual_gpu.py     # one CUDA card
"""
import json, sys, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import numpy as np, torch
from interference.architectures import QKOVIndexer
from interference.gradients.objectives import default_objective
from interference.models import tiny_model
from interference.validation import CellParams, StepRule, distinct_cells, measure
from interference.validation.losses import sample_losses
from interference.validation.intervention import FinetuneSettings, finetune
from scipy.stats import spearmanr

dev = "cuda"
def sync(): torch.cuda.synchronize()
def timeit(fn, n=3):
    fn(); sync(); t = time.time()
    for _ in range(n): fn()
    sync(); return (time.time() - t) / n

model = tiny_model("llama", vocab_size=49152, seed=0, hidden_size=576, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                   intermediate_size=1536).to(dev).eval()
print("attn impl", model.config._attn_implementation)
obj = default_objective(model)
params = CellParams(model, QKOVIndexer(model))
cells_all = distinct_cells(params.indexer)
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, 49152, (48, 128), generator=gen)
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
out = {}
out["fwd_fp32"] = timeit(lambda: sample_losses(model, obj, batch, 48))
# logits only
idsd = ids.to(dev)
with torch.no_grad():
    out["fwd_body_only"] = timeit(lambda: model.model(input_ids=idsd))
    h = model.model(input_ids=idsd).last_hidden_state
    out["lm_head"] = timeit(lambda: model.lm_head(h))
from torch.profiler import profile, ProfilerActivity
with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    sample_losses(model, obj, batch, 48); sync()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
out["fwd_tf32"] = timeit(lambda: sample_losses(model, obj, batch, 48))
torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
def bf():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return sample_losses(model, obj, batch, 48)
out["fwd_bf16_autocast"] = timeit(bf)
# TF32 error on delta L, 90 cells
cells = cells_all[::8]
g = {c: torch.randn(params.size(c), generator=gen) * 1e-3 for c in cells}
sq = {c: v * v + 1e-8 for c, v in g.items()}
rule = StepRule("relative")
sync(); t = time.time()
r32 = measure(model, obj, params, cells, rule, g, sq, batch, batch, 48, False, True); sync()
out["measure90_fp32_s"] = time.time() - t
torch.backends.cuda.matmul.allow_tf32 = True
sync(); t = time.time()
rtf = measure(model, obj, params, cells, rule, g, sq, batch, batch, 48, False, True); sync()
out["measure90_tf32_s"] = time.time() - t
torch.backends.cuda.matmul.allow_tf32 = False
a, b = np.asarray(r32.delta_a), np.asarray(rtf.delta_a)
out["tf32_err_max"] = float(np.abs(a - b).max()); out["dl_std"] = float(a.std()); out["dl_absmean"] = float(np.abs(a).mean())
out["tf32_spearman"] = float(spearmanr(a, b)[0])
# finetune step timing per k
train = {k: v[:48] for k, v in batch.items()}
ranked = cells_all
for k in (0, 36, 144):
    s = FinetuneSettings(steps=10)
    sync(); t = time.time()
    finetune(model, obj, train, params, ranked[:k], s, 0, 16); sync()
    out[f"finetune_step_k{k}"] = (time.time() - t) / 10
# pure fwd+bwd step without freezing
opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n in set(params.indexer.param_names)], lr=1e-4)
sub = {k: v[:8] for k, v in batch.items()}
def st():
    opt.zero_grad(); sample_losses(model, obj, sub, 8, grad=True).mean().backward(); opt.step()
out["plain_step"] = timeit(st, 5)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    st(); sync()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
print(json.dumps(out, indent=1))
