"""Where do math and code fight inside a transformer? The whole analysis in one script.

    python examples/qkov_interference_example.py                 # SmolLM2-135M (real weights)
    python examples/qkov_interference_example.py --quick         # tiny random model, seconds

Steps: real math (DeepMind's generator) and code (HumanEval) data split into disjoint
Fisher / scored / reference samples; per-sample gradients and Fisher per task; the
QK-OV heatmap; permutation tests with FDR; the seed's two plots, rows labelled with the
layers actually scored.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

from fisher.core.fisher_collector import FisherCollector  # noqa: E402
from fisher.qkov import QKOVConfig, QKOVInterferenceMetric, QKOVStatistics  # noqa: E402
from interference.data import prepare_task  # noqa: E402
from interference.models import build_tokenizer, load_smollm2, tiny_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/example")
    ap.add_argument("--quick", action="store_true", help="tiny random LLaMA, 8 samples a role")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    if args.quick:
        tokenizer = build_tokenizer("bpe", vocab_size=512)
        model = tiny_model("llama", vocab_size=len(tokenizer), seed=args.seed)
        n, max_length, n_perm = 8, 48, 2000
    else:
        model, tokenizer = load_smollm2()
        n, max_length, n_perm = 24, 128, 10_000

    # 1. data: disjoint Fisher / scored / reference samples with dataset ids
    batches = {task: prepare_task(task, tokenizer, n_fisher=n, n_scored=n, n_reference=n,
                                  seed=args.seed, max_length=max_length)[0]
               for task in ("math", "code")}

    # 2. Fisher and per-sample gradients, role by role
    collector = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=512,
                                progress=True)
    for task, by_role in batches.items():
        for role in ("fisher", "scored", "reference"):
            collector.collect_fisher(model, by_role[role], task=task, mode="mean", role=role)

    # 3. the heatmap over every layer and head
    config = QKOVConfig.from_model(model)
    metric = QKOVInterferenceMetric(config, collector, ridge_lambda_rel=1e-3)
    heatmap = metric.compute_heatmap("math", "code")

    # 4. which cells are real conflicts
    stats = QKOVStatistics(fdr_alpha=0.05, n_permutations=n_perm, n_bootstrap=500)
    results = stats.test_heatmap(heatmap, collector.contribution_cache,
                                 collector.gradient_manager, collector.fisher)
    results["cells"].to_csv(out / "cells.csv", index=False)
    for block in "QKVO":
        print(f"{block}: {len(results['fdr_corrected'][block])} significant conflicts")

    # 5. the seed's plots, labelled with the real layer and head ids
    layers, heads = heatmap["meta"]["layers"], heatmap["meta"]["heads"]
    plt.figure(figsize=(12, 8))
    sns.heatmap(heatmap["Q"]["layer_head_avg"], cmap="viridis", xticklabels=heads,
                yticklabels=layers)
    plt.xlabel("Head")
    plt.ylabel("Layer")
    plt.title("M^Q: query projection interference (math vs code)")
    plt.savefig(out / "Q_interference.png", dpi=100)
    block_means = {b: heatmap[b]["layer_head_avg"].mean() for b in "QKVO"}
    plt.figure(figsize=(8, 6))
    plt.bar(list(block_means), list(block_means.values()))
    plt.ylabel("Mean interference")
    plt.title("Interference by block")
    plt.savefig(out / "block_comparison.png", dpi=100)
    print(f"wrote {out}/cells.csv and figures")


if __name__ == "__main__":
    main()
