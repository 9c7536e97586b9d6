import cProfile, pstats, time, torch, transformers as T, io
from interference.architectures import QKOVConfig, QKOVIndexer
from interference.gradients import CausalLMObjective, PerSampleGradients
torch.manual_seed(0)
cfg = T.GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
cfg._attn_implementation = "sdpa"
model = T.GPT2LMHeadModel(cfg).to("cuda", torch.bfloat16).eval()
n, bs = 128, 16
ids = torch.randint(0, 50257, (n, 256), device="cuda")
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
sids = [f"s{k}" for k in range(n)]
idx = QKOVIndexer(model, QKOVConfig.from_model(model))
def ordinary():
    for s in range(0, n, bs):
        x = ids[s:s+bs]; model(input_ids=x, labels=x).loss.backward(); model.zero_grad(set_to_none=True)
for engine in ("factored", "fisher"):
    kind = {"factored": dict(engine="hooks", factors=True, rows=False), "fisher": dict(engine="hooks")}[engine]
    eng = PerSampleGradients(model, idx, CausalLMObjective(), micro_batch=bs, **kind)
    run = eng.square_sums if engine == "fisher" else eng
    for _ in run(batch, sids): pass
    ordinary(); torch.cuda.synchronize()
    t = time.perf_counter(); ordinary(); torch.cuda.synchronize(); to = time.perf_counter() - t
    t = time.perf_counter(); [None for _ in run(batch, sids)]; torch.cuda.synchronize(); te = time.perf_counter() - t
    print(f"== {engine}: ordinary {to:.3f} s, engine {te:.3f} s, ratio {to/te:.2f}")
    pr = cProfile.Profile(); pr.enable(); [None for _ in run(batch, sids)]; torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); st = pstats.Stats(pr, stream=s); print("calls", st.total_calls)
    st.sort_stats("tottime").print_stats(30); st.sort_stats("cumtime").print_stats(40); print(s.getvalue())
pr = cProfile.Profile(); pr.enable(); ordinary(); torch.cuda.synchronize(); pr.disable()
s = io.StringIO(); st = pstats.Stats(pr, stream=s); print("== ordinary calls", st.total_calls); st.sort_stats("tottime").print_stats(20); print(s.getvalue())
