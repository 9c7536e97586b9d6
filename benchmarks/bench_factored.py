"""Factored vs dense per-sample gradient stores (issue 15, items 1 and 4).

Two measurements, one JSON line each:

``--what bytes``: bytes per stored sample, dense rows against factored records (x and δ
of each attention projection, ``gradient_format='auto'``), for a LLaMA attention shape
(default: SmolLM2-135M's, 30 layers, width 576, 9 heads, 3 KV heads, head_dim 64) at
``--tokens`` real tokens per sample: computed analytically for all layers, and measured on a
random model of the same per-layer shape with ``--layers`` layers (small vocabulary),
scaled to the full depth (every layer stores the same).

``--what time``: wall time of collection (Fisher + scored samples of two tasks) and of
``compute_heatmap``, dense against factored, on a random LLaMA, with the time of one plain
batched forward+backward over the same samples (attention weights trainable, micro-batch 8)
measured in the same run; prints the ratios.

    python benchmarks/bench_factored.py --what bytes
    python benchmarks/bench_factored.py --what time --threads 2
    python benchmarks/bench_factored.py --what time --device cuda --layers 12 --width 768 \\
        --heads 12 --kv-heads 12 --n 100 --tokens 256
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

from interference.architectures import QKOVConfig
from interference.gradients import FisherCollector
from interference.scores import QKOVInterferenceMetric


def llama(layers, width, heads, kv_heads, head_dim, vocab, seed=0):
    cfg = T.LlamaConfig(num_hidden_layers=layers, hidden_size=width,
                        num_attention_heads=heads, num_key_value_heads=kv_heads,
                        head_dim=head_dim, intermediate_size=max(4 * width // 3 * 2, 64),
                        vocab_size=vocab, max_position_embeddings=4096)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(cfg).eval()


def batch(n, tokens, vocab, prefix, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "sample_ids": [f"{prefix}:{k}" for k in range(n)]}


def analytic(a, tokens, fbytes=4, sbytes=4) -> dict:
    """Bytes per sample of all ``a.full_layers`` layers: dense rows vs auto-factored."""
    d, q, kv, o_in = a.width, a.heads * a.head_dim, a.kv_heads * a.head_dim, a.heads * a.head_dim
    proj = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (o_in, d)}
    dense = sum(i * o for i, o in proj.values()) * sbytes
    fac, x_qkv = 0, False
    for name, (i, o) in proj.items():
        if tokens * (i + o) * fbytes < i * o * sbytes:     # the per-projection rule
            shared = name in "kv" and x_qkv
            fac += tokens * (o if shared else i + o) * fbytes
            x_qkv = x_qkv or name in "qkv"
        else:
            fac += i * o * sbytes
    return {"dense": dense * a.full_layers, "factored": fac * a.full_layers}


def measure_bytes(a) -> dict:
    model = llama(a.layers, a.width, a.heads, a.kv_heads, a.head_dim, a.vocab)
    out = {}
    for fmt in ("dense", "auto"):
        with tempfile.TemporaryDirectory() as tmp:
            fc = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=1e6,
                                 gradient_format=fmt, micro_batch=a.micro_batch)
            fc.collect_fisher(model, batch(a.n, a.tokens, a.vocab, "t", 1), task="t",
                              role="scored")
            ram = fc.gradient_manager.get_memory_usage()["ram_mb"] * 2**20 / a.n
            fc.gradient_manager.save(Path(tmp) / "s")
            disk = sum(p.stat().st_size for p in (Path(tmp) / "s").glob("*bin")) / a.n
        scale = a.full_layers / a.layers
        out[fmt] = {"ram_per_sample": ram * scale, "disk_per_sample": disk * scale}
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timing(a) -> dict:
    device = torch.device(a.device)
    model = llama(a.layers, a.width, a.heads, a.kv_heads, a.head_dim, a.vocab).to(device)
    data = {("A", "fisher"): batch(a.n, a.tokens, a.vocab, "A:f", 1),
            ("B", "fisher"): batch(a.n, a.tokens, a.vocab, "B:f", 2),
            ("A", "scored"): batch(a.n, a.tokens, a.vocab, "A:s", 3),
            ("B", "scored"): batch(a.n, a.tokens, a.vocab, "B:s", 4)}
    names = [n for n, _ in model.named_parameters() if "self_attn" in n]

    def plain():
        """One ordinary batched forward+backward over all samples, attention weights only."""
        params = dict(model.named_parameters())
        saved = {n: p.requires_grad for n, p in params.items()}
        for n, p in params.items():
            p.requires_grad_(n in names)
        for b in data.values():
            for s in range(0, a.n, a.micro_batch):
                ids = b["input_ids"][s:s + a.micro_batch].to(device)
                model(input_ids=ids, labels=ids).loss.backward()
                model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(saved[n])

    def run(fmt):
        fc = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=a.memory_mb,
                             gradient_format=fmt, micro_batch=a.micro_batch,
                             store_device=a.store_device or "cpu")
        sync(device)
        t0 = time.perf_counter()
        for (task, role), b in data.items():
            fc.collect_fisher(model, {k: (v.to(device) if torch.is_tensor(v) else v)
                                      for k, v in b.items()}, task=task, mode="mean", role=role)
        sync(device)
        t1 = time.perf_counter()
        metric = QKOVInterferenceMetric(QKOVConfig.from_model(model), fc, device=a.device,
                                        ridge_lambda_rel=1e-3)
        heat = metric.compute_heatmap("A", "B")
        sync(device)
        t2 = time.perf_counter()
        use = fc.gradient_manager.get_memory_usage()
        return {"collect_s": t1 - t0, "heatmap_s": t2 - t1, "total_s": t2 - t0,
                "store_mb": use["ram_mb"] + use["disk_mb"]}, heat

    plain()                                   # warm-up
    sync(device)
    t0 = time.perf_counter()
    plain()
    sync(device)
    plain_s = time.perf_counter() - t0
    out = {"plain_fwd_bwd_s": plain_s}
    heats = {}
    for fmt in a.formats.split(","):
        run(fmt)                              # warm-up (allocator, kernels)
        r, heats[fmt] = run(fmt)
        r["ratio_to_plain"] = r["total_s"] / plain_s
        r["collect_ratio_to_plain"] = r["collect_s"] / plain_s
        out[fmt] = r
    if "dense" in heats:
        for fmt, h in heats.items():
            if fmt != "dense":
                out[fmt]["max_rel_diff_vs_dense"] = max(
                    float(abs(h[b]["scores"] - heats["dense"][b]["scores"]).max()
                          / abs(heats["dense"][b]["scores"]).max()) for b in "QKVO")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", choices=("bytes", "time"), default="bytes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="layers of the measured model")
    ap.add_argument("--full-layers", type=int, default=30, help="depth of the shape (bytes)")
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--n", type=int, default=None, help="samples per task and role")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--memory-mb", type=float, default=4096)
    ap.add_argument("--store-device", default=None)
    ap.add_argument("--formats", default="dense,factored,auto")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.cuda.get_device_name() if a.device == "cuda" else \
        (platform.processor() or platform.machine())
    head = {"device": dev, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if a.what == "bytes":
        a.layers, a.n = a.layers or 2, a.n or 4
        res = {"benchmark": "bytes per stored sample", **head, "tokens": a.tokens,
               "shape": {"layers": a.full_layers, "width": a.width, "heads": a.heads,
                         "kv_heads": a.kv_heads, "head_dim": a.head_dim},
               "measured_layers": a.layers, "analytic": analytic(a, a.tokens),
               "measured": measure_bytes(a)}
    else:
        a.layers, a.n = a.layers or 4, a.n or 16
        res = {"benchmark": "dense vs factored collection + heatmap", **head,
               "model": {"layers": a.layers, "width": a.width, "heads": a.heads,
                         "kv_heads": a.kv_heads, "head_dim": a.head_dim, "vocab": a.vocab},
               "n_per_task_role": a.n, "tokens": a.tokens, **timing(a)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
