"""summary: the run summary of one experiment (summary.json and summary.md).

Per analysis (pair and its control) and split seed: distinct cells, cells with q <= alpha,
significant cells (q and d), per block, the global B/R disruption ratio and its p-value,
block means; the control's count beside the pair's (it should be about 0). Per task and
role: samples, mean tokens, mean loss and mean gradient norm (what differs besides
content). ``metrics``: the same numbers flat, logged on the MLflow parent run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ..jobs import read_json

logger = logging.getLogger("qkov.summary")
BLOCKS = ("Q", "K", "V", "O")


def collect(job) -> dict:
    from interference.results import SCHEMA_VERSION

    s = job.slice
    doc = {"schema_version": SCHEMA_VERSION, "experiment": s["experiment"],
           "config_hash": job.config_hash, "analyses": {}, "tasks": {}, "metrics": {}}
    for path in job.input.stats:
        p = Path(path)
        pair, seed = p.parent.parent.name, int(p.parent.name.removeprefix("split"))
        sm = read_json(p)["summary"]
        a = doc["analyses"].setdefault(pair, {"arm": sm["arm"], "task_a": sm["task_a"],
                                              "task_b": sm["task_b"], "model": sm["model"],
                                              "seeds": {}})
        a["seeds"][seed] = {k: sm.get(k) for k in (
            "n_cells", "n_q_significant", "n_significant", "n_significant_by_block",
            "n_q_significant_by_block", "block_means", "global", "min_pvalue",
            "n_permutations", "exact", "fdr_alpha", "min_effect_size", "n_a", "n_b", "n_r",
            "warnings", "test")}
    for path in job.input.cells:
        p = Path(path)
        table = pd.read_csv(p, dtype={"kv_group": str})
        a = doc["analyses"][p.parent.name]
        a["cells_csv"] = str(p)
        a["n_significant_all_seeds"] = int((table["n_seeds_significant"]
                                            == table["n_split_seeds"]).sum())
    for path in job.input.figures:
        p = Path(path)
        doc["analyses"][p.parent.parent.name]["figures"] = [
            str(p.parent / e["path"]) for e in read_json(p)]
    for path in job.input.stores:
        info = read_json(path)
        t = doc["tasks"].setdefault(info["task"], {})
        t[info["split_seed"]] = {role: {k: r.get(k) for k in (
            "n", "mean_tokens", "mean_loss", "mean_grad_norm", "seconds_per_sample")}
            for role, r in info["roles"].items()}
    m = doc["metrics"]
    for pair, a in doc["analyses"].items():
        for seed, r in a["seeds"].items():
            key = f"{pair}.split{seed}"
            m[f"{key}.n_significant"] = r["n_significant"]
            m[f"{key}.n_q_significant"] = r["n_q_significant"]
            m[f"{key}.global_ratio"] = r["global"]["ratio"]
            for blk in BLOCKS:
                m[f"{key}.{blk}.n_significant"] = r["n_significant_by_block"].get(blk, 0)
                m[f"{key}.{blk}.mean_score"] = r["block_means"][blk]
    return doc


def markdown(doc: dict) -> str:
    lines = [f"# QK-OV interference: experiment `{doc['experiment']}`", "",
             f"Results schema {doc['schema_version']}, config hash `{doc['config_hash']}`.", "",
             "## Significant conflicts", "",
             "A cell is significant when q <= alpha (Benjamini-Hochberg over all distinct cells) "
             "and Cohen's d >= the threshold. Each pair A vs B has a negative control A vs A' "
             "(`.control`: B replaced by held-out samples of A, same normaliser) that should "
             "flag about none.", "",
             "| analysis | arm | split seed | cells | q <= alpha | significant | Q | K | V | O "
             "| B/R disruption (p) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for pair, a in doc["analyses"].items():
        for seed, r in sorted(a["seeds"].items()):
            by = r["n_significant_by_block"]
            g = r["global"]
            lines.append(f"| {pair} | {a['arm']} | {seed} | {r['n_cells']} | "
                         f"{r['n_q_significant']} | **{r['n_significant']}** | "
                         + " | ".join(str(by.get(b, 0)) for b in BLOCKS)
                         + f" | {g['ratio']:.3g} ({g['p_value']:.3g}) |")
    lines += ["", "## Mean QK-OV score per block", "",
              "| analysis | split seed | " + " | ".join(BLOCKS) + " |",
              "|---|---|" + "---|" * len(BLOCKS)]
    for pair, a in doc["analyses"].items():
        for seed, r in sorted(a["seeds"].items()):
            lines.append(f"| {pair} | {seed} | "
                         + " | ".join(f"{r['block_means'][b]:.4g}" for b in BLOCKS) + " |")
    lines += ["", "## Tasks: what differs besides content", "",
              "| task | split seed | role | samples | mean tokens | mean loss | mean gradient norm |",
              "|---|---|---|---|---|---|---|"]
    for task, seeds in doc["tasks"].items():
        for seed, roles in sorted(seeds.items()):
            for role, r in roles.items():
                norm = "" if r.get("mean_grad_norm") is None else f"{r['mean_grad_norm']:.4g}"
                lines.append(f"| {task} | {seed} | {role} | {r['n']} | {r['mean_tokens']:.1f} | "
                             f"{r['mean_loss']:.4f} | {norm} |")
    lines += ["", "## Files", ""]
    for pair, a in doc["analyses"].items():
        lines.append(f"- `{pair}`: `{a.get('cells_csv')}`; figures: "
                     + ", ".join(f"`{f}`" for f in a.get("figures", []) if f.endswith(".png")))
    warn = [(pair, w) for pair, a in doc["analyses"].items()
            for r in a["seeds"].values() for w in (r.get("warnings") or [])]
    if warn:
        lines += ["", "## Warnings", ""] + [f"- {pair}: {w}" for pair, w in warn]
    return "\n".join(lines) + "\n"


def run(job) -> None:
    from interference.results import atomic_path, write_json

    doc = collect(job)
    write_json(job.output.json, doc)
    with atomic_path(job.output.md) as tmp:
        tmp.write_text(markdown(doc))
    for k, v in doc["metrics"].items():
        job.metric(k, v)
    for pair, a in doc["analyses"].items():
        for seed, r in a["seeds"].items():
            logger.info("%-28s split %s: %4d significant of %d cells (q <= alpha: %d)", pair,
                        seed, r["n_significant"], r["n_cells"], r["n_q_significant"])
    job.artifact(job.output.md)
    job.artifact(job.output.json)
