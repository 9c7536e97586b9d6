"""CUDA correctness: the GPU paths equal the CPU reference (run on a GPU machine).

    python benchmarks/check_cuda.py [--big]     # --big: also a LLaMA-7B-shaped block

Tiny LLaMA-GQA and GPT-2: per-sample gradients with the hooks engine on CUDA vs the loop
engine on CPU, the heatmap computed on CUDA vs CPU, and the error of bfloat16 / float16
gradient storage. Prints one JSON line.
"""
from __future__ import annotations

import contextlib
import json
import sys
from unittest import mock
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import padded_batch, tiny_gpt2, tiny_llama  # noqa: E402

from interference.architectures import QKOVConfig, QKOVIndexer  # noqa: E402
from interference.gradients import kernels, per_sample  # noqa: E402
from interference.gradients import (CausalLMObjective, FisherCollector,  # noqa: E402
                                    PerSampleGradients)
from interference.scores import QKOVInterferenceMetric  # noqa: E402


def run(model, device, engine, store_dtype="float32", backend="auto", dtype=torch.float32):
    model = model.to(device, dtype)
    fc = FisherCollector(enable_cross_task_analysis=True, config=QKOVConfig.from_model(model),
                         engine=engine, store_dtype=store_dtype)
    fc.collect_fisher(model, padded_batch(8, 24, 1, "a:f"), task="a", mode="mean", role="fisher")
    fc.collect_fisher(model, padded_batch(8, 24, 2, "b:f"), task="b", mode="mean", role="fisher")
    fc.collect_fisher(model, padded_batch(6, 24, 3, "a:s"), task="a", mode="mean", role="scored")
    fc.collect_fisher(model, padded_batch(6, 24, 4, "b:s"), task="b", mode="mean", role="scored")
    return QKOVInterferenceMetric(fc.config, fc, ridge_lambda=1e-14, device=device,
                                  backend=backend).compute_heatmap("a", "b")


def rel(h1, h2):
    return max(float(np.abs(h1[b]["scores"] - h2[b]["scores"]).max() / np.abs(h2[b]["scores"]).max())
               for b in "QKVO")


def big_block(out, n=100, heads=32, s=128 * 4096, rows=8):
    """One LLaMA-7B-shaped (layer, block): 100 x 100 pairs, 32 heads, 524,288 weights per
    head (int64 offsets past 2^31 elements in all), the Triton kernel at each precision vs
    float64 on ``rows`` task-A rows."""
    from interference.scores.contraction import contract

    g = torch.Generator(device="cuda").manual_seed(0)
    left = torch.randn(n, heads, s, device="cuda", generator=g)
    right = torch.randn(n, heads, s, device="cuda", generator=g)
    weight = torch.rand(heads, s, device="cuda", generator=g) + 0.01
    want = torch.einsum("ahs,hs,bhs->abh", left[:rows].double().square(), weight.double(),
                        right.double().abs())
    for precision in ("tf32x3", "bf16x3"):
        got = contract(left, right, weight, backend="triton", precision=precision)[:rows]
        out[f"llama7b_block_triton_{precision}_rel_err"] = float(
            ((got.double() - want).abs().max() / want.abs().max()))


def gram_norms(out, dtype=torch.bfloat16):
    """A wide LLaMA (width 512, 8 heads of 64, 24-token samples: every projection takes its
    per-sample norms from Gram matrices on CUDA, per_sample.GRAM_NORM_DEVICES) in ``dtype``:
    the factored store's norms on CUDA against the formed-gradient path's on CUDA (the same
    x and δ), and in float32 against the CPU's."""
    def norms(device, gram: bool, dt):
        model = tiny_llama(hidden=512, n_head=8, n_kv=8, head_dim=64).to(device, dt)
        fc = FisherCollector(enable_cross_task_analysis=True,
                             config=QKOVConfig.from_model(model), gradient_format="factored")
        batch = padded_batch(6, 24, 5, "s")
        with mock.patch.object(per_sample, "GRAM_NORM_DEVICES", {"cuda"} if gram else set()):
            fc.collect_fisher(model, padded_batch(4, 24, 6, "f"), task="s", mode="mean",
                              role="fisher")
            fc.collect_fisher(model, batch, task="s", role="scored")
        return fc.gradient_manager.grad_norms("s", batch["sample_ids"])

    gram, formed = norms("cuda", True, dtype), norms("cuda", False, dtype)
    key = str(dtype).removeprefix("torch.")
    out[f"wide_llama_{key}_gram_vs_formed_norms_cuda"] = float(np.abs(gram / formed - 1).max())
    if dtype == torch.float32:
        cpu = norms("cpu", False, dtype)
        out["wide_llama_float32_gram_cuda_vs_formed_cpu_norms"] = float(np.abs(gram / cpu - 1).max())


def lowp_rebuild(out):
    """A bfloat16 model's factored rows on CUDA (wide LLaMA and GPT-2, 24-token samples):
    every (layer, block) rebuilt by the float32-output bf16 matmul (kernels.LOWP_OUT_DEVICES)
    against the TF32 einsum of float32 copies, largest difference relative to the block's
    largest value, and whether the device took the first path."""
    for name, make in [("llama", lambda: tiny_llama(hidden=512, n_head=8, n_kv=4, head_dim=64)),
                       ("gpt2", tiny_gpt2)]:
        model = make().to("cuda", torch.bfloat16)
        fc = FisherCollector(enable_cross_task_analysis=True,
                             config=QKOVConfig.from_model(model), gradient_format="factored")
        fc.collect_fisher(model, padded_batch(4, 24, 6, "f"), task="s", mode="mean", role="fisher")
        fc.collect_fisher(model, padded_batch(6, 24, 5, "s"), task="s", role="scored")
        store = fc.gradient_manager
        ids = store.ids("s", "scored")
        worst = 0.0
        for key in store.layout.parts:
            lowp = store.block("s", ids, *key, device="cuda")
            with mock.patch.object(kernels, "LOWP_OUT_DEVICES", set()):
                tf32 = store.block("s", ids, *key, device="cuda")
            worst = max(worst, float((lowp - tf32).abs().max() / tf32.abs().max()))
        out[f"{name}_bf16_rows_lowp_vs_tf32_einsum"] = worst
    out["lowp_bmm_used"] = kernels.lowp_ok(torch.device("cuda"), torch.bfloat16)


def engine_kernels(out):
    """The hooks engine's two CUDA kernels (kernels.py) against their fallbacks on CUDA:
    Σ_k g_k² by the Triton kernel vs the per-sample multiply-add loop (bitwise; values over
    60 decades, and a whole Fisher of a bfloat16 GPT-2), and a bfloat16 model's per-sample
    rows formed by the float32-output matmul vs the TF32 einsum of float32 copies."""
    g = torch.Generator().manual_seed(0)
    shape = (16, 3 * 1024 + 5)
    vals = (torch.randn(shape, generator=g, dtype=torch.float64)
            * 10.0 ** torch.randint(-30, 30, shape, generator=g)).float().cuda()
    fused = kernels.square_sum(vals)
    with mock.patch.object(kernels, "SQUARE_SUM_DEVICES", set()):
        loop = kernels.square_sum(vals)
    out["square_sum_triton_equals_loop_bitwise"] = bool(torch.equal(fused, loop))

    def fisher(model):
        fc = FisherCollector(config=QKOVConfig.from_model(model, include_bias=True))
        fc.collect_fisher(model, padded_batch(8, 24, 1, "f"), task="a", mode="mean",
                          role="fisher")
        return fc.fisher.get("a")
    model = tiny_gpt2().to("cuda", torch.bfloat16)
    with_kernel = fisher(model)
    with mock.patch.object(kernels, "SQUARE_SUM_DEVICES", set()):
        without = fisher(model)
    out["bf16_gpt2_fisher_kernel_equals_loop_bitwise"] = bool(torch.equal(with_kernel, without))

    for name, make in [("llama", tiny_llama), ("gpt2", tiny_gpt2)]:
        model = make().to("cuda", torch.bfloat16)
        idx = QKOVIndexer(model, QKOVConfig.from_model(model))
        b = padded_batch(6, 24, 3, "s")

        def rows():
            eng = PerSampleGradients(model, idx, CausalLMObjective(), engine="hooks")
            return torch.stack([s.vector for s in eng(b, b["sample_ids"])]).double()
        lowp = rows()
        with mock.patch.object(kernels, "LOWP_OUT_DEVICES", set()):
            tf32 = rows()
        out[f"{name}_bf16_rows_lowp_vs_tf32_einsum"] = float(
            ((lowp - tf32).abs() / tf32.abs().amax(1, keepdim=True)).max())


def compiled(kernel) -> int:
    """How many variants of a Triton kernel this process has compiled for the current GPU."""
    return len(kernel.device_caches[torch.cuda.current_device()][0])


def warm_ups_cover_the_first_calls(out):
    """The kernels score_layers compiles ahead (kernels.warm_up_square_sum,
    contraction.warm_up) are the variants the real calls then use: a B2-sized square sum
    and contractions (a strided view of held rows on the left, GQA's 8 heads too) compile
    nothing more after the warm-ups. Run first, before any other check compiles them."""
    from interference.gradients import triton_squares
    from interference.scores import contraction

    dev = torch.device("cuda")
    kernels.warm_up_square_sum(dev, 8)
    warmed = compiled(triton_squares._square_sum_kernel)
    kernels.square_sum(torch.randn(8, 4096 * 64, device=dev))
    out["square_sum_compiled_after_warm_up"] = compiled(triton_squares._square_sum_kernel) - warmed
    contraction.warm_up(dev, 100, [100, 300], [32, 8], "square", "abs")
    warmed = compiled(contraction._contract_kernel)
    held = torch.randn(100, 3 * 32 * 128 * 16, device=dev)      # rows of three blocks
    for heads in (32, 8):
        left = held[:, 32 * 128 * 16:][:, :heads * 128 * 16].view(100, heads, 128 * 16)
        for n_b in (100, 300):
            contraction.contract_triton(left, torch.randn(n_b, heads, 128 * 16, device=dev),
                                        torch.rand(heads, 128 * 16, device=dev))
    out["contractions_compiled_after_warm_up"] = compiled(contraction._contract_kernel) - warmed


def padding_verdicts(out):
    """per_sample.padding_of of bfloat16 models, whose float32 probe copy is built where
    the model is: the CUDA verdict against the CPU's (tiny LLaMA, GPT-2)."""
    for name, make in [("llama", tiny_llama), ("gpt2", tiny_gpt2)]:
        got = {dev: per_sample.padding_of(make().to(dev, torch.bfloat16)) for dev in ("cuda", "cpu")}
        out[f"{name}_bf16_padding_cuda_cpu"] = [got["cuda"], got["cpu"]]


def main():
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    warm_ups_cover_the_first_calls(out)
    padding_verdicts(out)
    lowp_rebuild(out)
    engine_kernels(out)
    gram_norms(out, torch.bfloat16)
    gram_norms(out, torch.float32)
    if "--big" in sys.argv:
        big_block(out)
    for name, make in [("llama", tiny_llama), ("gpt2", tiny_gpt2)]:
        ref = run(make(), "cpu", "loop")
        out[f"{name}_hooks_cuda_vs_loop_cpu"] = rel(run(make(), "cuda", "hooks"), ref)
        out[f"{name}_loop_cuda_vs_loop_cpu"] = rel(run(make(), "cuda", "loop"), ref)
        out[f"{name}_triton_vs_torch_cuda"] = rel(run(make(), "cuda", "hooks", backend="triton"),
                                                  run(make(), "cuda", "hooks", backend="torch"))
        for dt in ("bfloat16", "float16"):
            out[f"{name}_store_{dt}_rel_err"] = rel(run(make(), "cpu", "loop", dt), ref)
        # a bfloat16 model: per-sample sums formed as the engine does (float32-output bf16
        # matmuls, exact products) vs full float32 matmuls of float32 copies
        fast = run(make(), "cuda", "hooks", dtype=torch.bfloat16)
        with mock.patch.object(kernels, "tf32_if_exact", lambda *a: contextlib.nullcontext()), \
                mock.patch.object(kernels, "LOWP_OUT_DEVICES", set()):
            fp32 = run(make(), "cuda", "hooks", dtype=torch.bfloat16)
        out[f"{name}_bf16_model_engine_vs_fp32_sums"] = rel(fast, fp32)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
