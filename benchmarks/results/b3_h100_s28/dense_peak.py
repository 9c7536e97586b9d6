# peak GPU memory of one dense-rows pass (GPT-2 small, bf16, 128 samples of 256 tokens, micro-batch 16)
import torch, transformers as T
from interference.architectures import QKOVConfig, QKOVIndexer
from interference.gradients import CausalLMObjective, PerSampleGradients
torch.manual_seed(0)
cfg = T.GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
cfg._attn_implementation = "sdpa"
model = T.GPT2LMHeadModel(cfg).to("cuda", torch.bfloat16).eval()
ids = torch.randint(0, 50257, (128, 256), device="cuda")
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
idx = QKOVIndexer(model, QKOVConfig.from_model(model))
eng = PerSampleGradients(model, idx, CausalLMObjective(), micro_batch=16, engine="hooks")
sid = [f"s:{k}" for k in range(128)]
for _ in eng(batch, sid): pass
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
for _ in eng(batch, sid): pass
torch.cuda.synchronize()
print(f"dense pass peak beyond the model: {(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB")
