"""B6: the same work as Kronfluence's diagonal-Fisher pairwise scores, both in one process.

A GPT-2-small-shaped LLaMA (12 layers x 12 heads, width 768, MLP 3072, random weights,
float32), random token ids; a Fisher set, a task-A set and a task-B set of ``--n`` samples
of ``--tokens`` tokens each. Both sides track the attention projections (q/k/v/o_proj):

- this project, default settings: ``collect_fisher`` with roles (the Fisher set split
  half per task, so the pooled Fisher is the mean over the whole set, as Kronfluence's),
  then ``compute_heatmap`` (576 scores per pair: every layer, head and block);
- Kronfluence: ``fit_all_factors`` (strategy 'diagonal', empirical Fisher) on the Fisher
  set, then ``compute_pairwise_scores`` of task A (queries) against task B (one score per
  pair).

Each side runs once untimed first, by default on the timed shapes (CUDA init, kernel
compilation and tuning; those first-run seconds are reported as ``*_cold_s``), then timed
with the device synchronised around every stage. The heatmap's kernel time is measured
apart: every (layer, block)'s operands prepared on the device, then only the contraction
calls timed (best of 3). Prints one JSON line; ``--table`` also prints a table.

    python benchmarks/bench_kronfluence.py --device cuda --table           # B6 (H200)
    python benchmarks/bench_kronfluence.py --device cpu --layers 2 --heads 2 --width 32 \\
        --n 4 --tokens 16 --vocab 128 --threads 1                        # smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time

import torch
import torch.nn.functional as F

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build_model(args):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=args.width, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, num_key_value_heads=args.heads,
                        intermediate_size=4 * args.width, vocab_size=args.vocab,
                        max_position_embeddings=max(args.tokens, 256))
    cfg._attn_implementation = "sdpa"
    return T.LlamaForCausalLM(cfg).to(args.device, torch.float32).eval()


def make_sets(args) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {name: torch.randint(0, args.vocab, (args.n, args.tokens), generator=g)
            for name in ("fisher", "a", "b")}


def batch_of(ids: torch.Tensor, prefix: str) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "sample_ids": [f"{prefix}:{k}" for k in range(ids.shape[0])]}


# -- this project ---------------------------------------------------------------------
def run_ours(model, sets, args) -> dict:
    """Seconds per stage of the public API with default settings, and the heatmap."""
    from interference.gradients import FisherCollector
    from interference.scores import QKOVInterferenceMetric

    half = sets["fisher"].shape[0] // 2
    t = {}
    sync(args.device)
    t0 = time.perf_counter()
    kw = {} if args.micro_batch is None else {"micro_batch": args.micro_batch}
    fc = FisherCollector(enable_cross_task_analysis=True, **kw)
    fc.collect_fisher(model, batch_of(sets["fisher"][:half], "a:f"), task="a", role="fisher")
    fc.collect_fisher(model, batch_of(sets["fisher"][half:], "b:f"), task="b", role="fisher")
    sync(args.device)
    t["fisher"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    fc.collect_fisher(model, batch_of(sets["a"], "a:s"), task="a", role="scored")
    fc.collect_fisher(model, batch_of(sets["b"], "b:s"), task="b", role="scored")
    sync(args.device)
    t["scored_gradients"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    metric = QKOVInterferenceMetric(fc.config, fc)
    heat = metric.compute_heatmap("a", "b")
    sync(args.device)
    t["heatmap"] = time.perf_counter() - t2
    t["total"] = time.perf_counter() - t0
    args.micro_batch = fc.micro_batch       # 'auto' resolved: Kronfluence gets the same batch
    return {"seconds": t, "heat": heat, "collector": fc, "metric": metric,
            "store_device": str(fc.gradient_manager.device)}


def plain_seconds(model, sets, args) -> float:
    """Seconds of batched forward+backward passes over every sample of the three sets,
    the attention projections trainable (the rest frozen), micro-batch ``args.micro_batch``:
    the passes both sides must make, so Kronfluence's total over this is the largest
    speed-up any method making them could show."""
    for n, p in model.named_parameters():
        p.requires_grad_(any(k in n for k in PROJ))
    ids = torch.cat(list(sets.values())).to(args.device)
    sync(args.device)
    t0 = time.perf_counter()
    for s in range(0, ids.shape[0], args.micro_batch):
        x = ids[s:s + args.micro_batch]
        model(input_ids=x, labels=x).loss.backward()
    sync(args.device)
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return dt


def kernel_seconds(metric, repeats: int = 3) -> float:
    """Best time of the contraction calls alone over every (layer, block) of the heatmap,
    with all operands already on the device."""
    from interference._tables import BLOCKS
    from interference.scores.contraction import contract

    fisher = metric._fisher_vector(metric.fisher_tasks("a", "b"))
    ids_a, ids_b = metric.scored_ids("a"), metric.scored_ids("b")
    ops = [metric._operands("a", ids_a, [("b", ids_b)], layer, block, fisher)
           for block in BLOCKS for layer in metric.fisher_collector.layers]
    best = float("inf")
    for _ in range(repeats):
        sync(metric.device)
        t0 = time.perf_counter()
        for left, lop, ((right, rop, _),), w in ops:
            contract(left, right, w, lop, rop, backend=metric.backend, precision=metric.precision)
        sync(metric.device)
        best = min(best, time.perf_counter() - t0)
    return best


def heatmap_again(fc, device, repeats: int = 3) -> list[float]:
    """Seconds of the heatmap stage (a new metric, then ``compute_heatmap``) run again
    ``repeats`` times on the same collector: the spread of the timed stage's one reading."""
    from interference.scores import QKOVInterferenceMetric

    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        QKOVInterferenceMetric(fc.config, fc).compute_heatmap("a", "b")
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def signed_totals(fc) -> torch.Tensor:
    """[n_a, n_b] float64: the 'signed' variant summed over every layer, head and block,
    Σ g_a · (1/D) · g_b over all attention weights: what Kronfluence's diagonal pairwise
    score is (its damping 1e-8 = our ridge; our ε floor 1e-10 aside). A check that both
    sides do the same work, not part of the timing."""
    from interference.scores import QKOVInterferenceMetric

    heat = QKOVInterferenceMetric(fc.config, fc, variant="signed").compute_heatmap("a", "b")
    return torch.as_tensor(sum(heat[b]["scores"].sum(axis=(2, 3)) for b in "QKVO"))


# -- Kronfluence ----------------------------------------------------------------------
def run_kronfluence(model, sets, args, workdir: str) -> dict:
    """Seconds of Kronfluence's diagonal factors and pairwise scores, and the scores."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["input_ids"][:, 1:]
            if sample:   # true Fisher (not used: empirical Fisher, as this project's)
                with torch.no_grad():
                    labels = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1).view_as(labels)
            nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            return nll.view(labels.shape).mean(1).sum()   # per-sample mean, as ours

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return [f"model.layers.{l}.self_attn.{p}" for l in range(args.layers) for p in PROJ]

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class Rows(torch.utils.data.Dataset):
        def __init__(self, ids):
            self.ids = ids

        def __len__(self):
            return self.ids.shape[0]

        def __getitem__(self, k):
            return {"input_ids": self.ids[k], "attention_mask": torch.ones_like(self.ids[k])}

    task = LMTask()
    model = prepare_model(model, task)
    analyzer = Analyzer("b6", model, task, cpu=args.device == "cpu", disable_tqdm=True,
                        output_dir=workdir)
    fargs = FactorArguments(strategy="diagonal", use_empirical_fisher=True)
    sargs = ScoreArguments()
    t = {}
    sync(args.device)
    t0 = time.perf_counter()
    analyzer.fit_all_factors("diag", dataset=Rows(sets["fisher"]), factor_args=fargs,
                             per_device_batch_size=args.micro_batch, overwrite_output_dir=True)
    sync(args.device)
    t["factors"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    analyzer.compute_pairwise_scores("pairs", "diag", query_dataset=Rows(sets["a"]),
                                     train_dataset=Rows(sets["b"]), score_args=sargs,
                                     per_device_query_batch_size=args.micro_batch,
                                     per_device_train_batch_size=args.micro_batch,
                                     overwrite_output_dir=True)
    sync(args.device)
    t["pairwise_scores"] = time.perf_counter() - t1
    t["total"] = time.perf_counter() - t0
    scores = analyzer.load_pairwise_scores("pairs")["all_modules"]
    return {"seconds": t, "scores": scores}


def shape_parser(description: str) -> argparse.ArgumentParser:
    """The device, model shape and sample sizes of B6 (shared with profile_b6_gpu.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--n", type=int, default=100, help="samples per set (Fisher, A, B)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="both sides' batch (default: this project's micro_batch='auto' as "
                         "FisherCollector resolves it on the device; Kronfluence gets the same)")
    return ap


def main(argv=None):
    ap = shape_parser(__doc__.split("\n")[0])
    ap.add_argument("--warmup-n", type=int, default=None,
                    help="samples of each side's untimed warm-up run (default: --n, the timed "
                         "shapes, so neither side's timing holds one-off kernel compilation "
                         "or autotuning; 0: none). Its seconds are reported as *_cold_s")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-kronfluence", action="store_true")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    sets = make_sets(args)
    if args.warmup_n is None:
        args.warmup_n = args.n
    small = {k: v[:args.warmup_n] for k, v in sets.items()}
    cold = run_ours(model, small, args)["seconds"] if args.warmup_n else None   # warm-up
    gc.collect()
    ours = run_ours(model, sets, args)
    kernel = kernel_seconds(ours["metric"])
    heat_s = ours["seconds"]["heatmap"]
    out = {"benchmark": "B6 same work as Kronfluence (diagonal Fisher, pairwise)",
           "device": torch.cuda.get_device_name() if args.device == "cuda"
           else platform.processor() or platform.machine(),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "shape": {k: getattr(args, k) for k in ("layers", "heads", "width", "vocab", "n",
                                                    "tokens", "micro_batch")},
           "warmup_n": args.warmup_n, "ours_cold_s": cold,
           "ours_s": ours["seconds"], "ours_store_device": ours["store_device"],
           "heatmap_kernel_s": kernel, "heatmap_outside_kernel_s": heat_s - kernel,
           "outside_over_kernel": (heat_s - kernel) / kernel,
           "heatmap_again_s": heatmap_again(ours["collector"], args.device),
           "scores_per_pair_ours": 4 * args.layers * args.heads}
    # the floor: best of two (the first also warms the ordinary step up)
    out["plain_fwd_bwd_s"] = min(plain_seconds(model, sets, args) for _ in range(2))
    signed = signed_totals(ours["collector"])
    del ours["metric"], ours["collector"]
    gc.collect()                         # the collector <-> store cycle holds device memory
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_kronfluence:
        with tempfile.TemporaryDirectory(prefix="b6-kronfluence-") as tmp:
            if args.warmup_n:
                out["kronfluence_cold_s"] = run_kronfluence(build_model(args), small, args,
                                                            tmp)["seconds"]   # warm-up
            kr = run_kronfluence(build_model(args), sets, args, tmp)
        out["kronfluence_s"] = kr["seconds"]
        out["kronfluence_scores_shape"] = list(kr["scores"].shape)
        theirs = kr["scores"].double().cpu()
        out["signed_sum_vs_kronfluence_max_rel_diff"] = float(
            (signed - theirs).abs().max() / theirs.abs().max())
        out["speedup"] = kr["seconds"]["total"] / ours["seconds"]["total"]
        out["speedup_ceiling"] = kr["seconds"]["total"] / out["plain_fwd_bwd_s"]
        out["bar_total_le_2s"] = ours["seconds"]["total"] <= 2.0
        out["bar_speedup_ge_9"] = out["speedup"] >= 9.0
    out["bar_outside_le_2x_kernel"] = out["outside_over_kernel"] <= 2.0
    print(json.dumps(out))
    if args.table:
        print_table(out)
    return out


def print_table(out: dict) -> None:
    o, k = out["ours_s"], out.get("kronfluence_s")
    rows = [("ours: Fisher (collect_fisher role=fisher)", o["fisher"]),
            ("ours: scored gradients (role=scored, A and B)", o["scored_gradients"]),
            ("ours: compute_heatmap", o["heatmap"]),
            ("  of which the contraction kernel", out["heatmap_kernel_s"]),
            ("  outside the kernel", out["heatmap_outside_kernel_s"]),
            ("ours: total", o["total"])]
    if k:
        rows += [("Kronfluence: fit_all_factors (diagonal)", k["factors"]),
                 ("Kronfluence: compute_pairwise_scores", k["pairwise_scores"]),
                 ("Kronfluence: total", k["total"])]
    print("\n| stage | seconds |\n|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.3f} |")
    again = out["heatmap_again_s"]
    print(f"\nheatmap outside / kernel: {out['outside_over_kernel']:.2f} (bar <= 2); the "
          f"heatmap stage run again {len(again)} times: "
          + ", ".join(f"{a:.4f}" for a in again) + " s, outside / kernel "
          + ", ".join(f"{(a - out['heatmap_kernel_s']) / out['heatmap_kernel_s']:.2f}"
                      for a in again))
    print(f"plain forward+backward over the same samples (the floor): "
          f"{out['plain_fwd_bwd_s']:.3f} s; ours / floor {o['total'] / out['plain_fwd_bwd_s']:.2f}")
    if k:
        print(f"Kronfluence / ours: {out['speedup']:.2f}x (bar >= 9); ours total "
              f"{o['total']:.3f} s (bar <= 2.0); Kronfluence / floor "
              f"{out['speedup_ceiling']:.2f}x (the most any method making these passes "
              f"could show)")
        print(f"Σ of our 'signed' scores vs Kronfluence's scores: max rel. diff "
              f"{out['signed_sum_vs_kronfluence_max_rel_diff']:.2e}")


if __name__ == "__main__":
    main()
