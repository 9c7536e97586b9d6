"""An ablation sweep's summary: the variants of each analysis compared (figures, counts,
agreement with the baseline) as a manifest (ablation.json) and a report (ablation.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._tables import BLOCKS
from ..settings import param_value
from .ablation import (jaccard, rank_correlations, significant_counts, significant_set,
                       write_ablation_summary)


def fmt_value(v) -> str:
    """A number for the report: two decimals, 'n/a' for None and NaN."""
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def summarise_sweep(s: dict, out: Path) -> dict:
    """Draw every analysis's ablation summary into ``out``; returns the sweep's manifest
    (ablation.json). ``s``: the sweep (``sweep``, ``variants``, ``baseline``, ``ablated``
    settings per variant, ``flip``: the signed variants, ``analyses``: pair -> [{exp,
    model, cells (cells.csv), stats (stats.json)}] per variant)."""
    base = s["baseline"]
    doc = {"sweep": s["sweep"], "variants": s["variants"], "baseline": base,
           "ablated": s["ablated"], "flip": s["flip"], "analyses": {}}
    for pair, group in s["analyses"].items():
        names = [e["exp"] for e in group]
        maps, cells, kv, alpha = {}, {}, {}, {}
        for e in group:
            st = json.loads(Path(e["stats"]).read_text())
            maps[e["exp"]] = {b: np.asarray(st["layer_head_avg"][b]["estimate"]) for b in BLOCKS}
            kv[e["exp"]] = st["kv_head_of"]
            cells[e["exp"]] = e["cells"]
            alpha[e["exp"]] = (st["summary"].get("fdr_alpha"), st["summary"].get("min_effect_size"))
        entries = write_ablation_summary(maps, cells, out / pair, kv_head_of=kv,
                                         flip=[n for n in names if n in s["flip"]])
        rho = rank_correlations(maps, "pooled", kv, [n for n in names if n in s["flip"]])
        counts = significant_counts(cells)
        sets = {n: significant_set(cells[n]) for n in names}
        ref = base if base in names else names[0]
        rows = {}
        for e in group:
            n = e["exp"]
            rows[n] = {"model": e["model"], "cells_csv": e["cells"],
                       "n_significant": int(counts.loc[n, "significant"]),
                       "n_q_significant": int(counts.loc[n, "q_significant"]),
                       "n_significant_by_block": {b: int(counts.loc[n, b]) for b in BLOCKS},
                       "spearman_vs_baseline": float(rho.loc[n, ref]),
                       "jaccard_vs_baseline": float(jaccard(sets[n], sets[ref])),
                       "fdr_alpha": alpha[n][0], "min_effect_size": alpha[n][1]}
            if e.get("validation"):
                rows[n]["validity"] = validity_of(json.loads(Path(e["validation"]).read_text()))
        off = rho.to_numpy()[~np.eye(len(names), dtype=bool)]
        off = off[np.isfinite(off)]
        doc["analyses"][pair] = {
            "baseline": ref, "variants": rows,
            "spearman_min": float(off.min()) if off.size else None,
            "spearman_mean": float(off.mean()) if off.size else None,
            "figures": [str(Path(x["path"]).relative_to(out)) for x in entries],
            "caption": entries[0]["caption"] if entries else ""}
    return doc


def validity_of(vdoc: dict) -> dict:
    """Per step rule, from a validation.json: Spearman rho of the variant's own mean score
    and effect size with the measured ΔL_A, and the best baseline's."""
    own = f"mean_M[{vdoc.get('variant', 'qkov')}]"
    out = {}
    for rule, v in vdoc["verdict"].items():
        if rule == "intervention":
            continue
        out[rule] = {"rho_mean_score": v["rho"].get(own), "rho_effect_size": v["rho"].get(
            "effect_size"), "best_baseline": v["best_baseline"],
            "best_baseline_rho": v["best_baseline_rho"]}
    return out


def validity_markdown(a: dict) -> list[str]:
    """Variants ranked by how well their map predicts measured interference (Spearman rho of
    the effect size that decides significance; ties by the mean score's rho)."""
    rows = [(v, rule, r) for v, x in a["variants"].items()
            for rule, r in (x.get("validity") or {}).items()]
    if not rows:
        return []
    rows.sort(key=lambda t: (t[1], -(t[2]["rho_effect_size"] or -9),
                             -(t[2]["rho_mean_score"] or -9)))
    lines = ["Predictive validity (counterfactual validation, docs/interpreting.md): Spearman "
             "rho with the measured change of A's loss per cell, ranked per step rule.", "",
             "| step rule | rank | variant | rho: effect size | rho: mean score | best baseline "
             "(rho) |", "|---|---|---|---|---|---|"]
    rank = {}
    for v, rule, r in rows:
        rank[rule] = rank.get(rule, 0) + 1
        lines.append(f"| {rule} | {rank[rule]} | {v} | {fmt_value(r['rho_effect_size'])} | "
                     f"{fmt_value(r['rho_mean_score'])} | {r['best_baseline']} "
                     f"({fmt_value(r['best_baseline_rho'])}) |")
    return lines + [""]


def sweep_markdown(doc: dict) -> str:
    """ablation.md: what differs between the variants, and per analysis their counts of
    significant cells and their agreement with the baseline."""
    lines = [f"# Ablation summary: `{doc['sweep']}`", "",
             f"Variants (baseline first): {', '.join(f'`{v}`' for v in doc['variants'])}.", ""]
    keys = sorted(set().union(*(set(a) for a in doc["ablated"].values())))
    if keys:
        lines += ["## What differs", "", "| variant | " + " | ".join(f"`{k}`" for k in keys)
                  + " |", "|---|" + "---|" * len(keys)]
        for v in doc["variants"]:
            lines.append(f"| {v} | " + " | ".join(param_value(doc["ablated"][v].get(k))
                                                  for k in keys) + " |")
        lines.append("")
    for pair, a in doc["analyses"].items():
        lines += [f"## `{pair}`", "",
                  f"Baseline `{a['baseline']}`. A cell is significant when q <= alpha and "
                  "Cohen's d >= the threshold; Spearman: rank correlation of the layer x head "
                  "maps with the baseline's (mean over blocks; n/a: another grid); Jaccard: "
                  "overlap of the significant cells with the baseline's (n/a: both empty).", "",
                  "| variant | model | significant | Q | K | V | O | q <= alpha | Spearman vs "
                  "baseline | Jaccard vs baseline |", "|---|---|---|---|---|---|---|---|---|---|"]
        for v, r in a["variants"].items():
            by = r["n_significant_by_block"]
            lines.append(f"| {v} | {r['model']} | **{r['n_significant']}** | "
                         + " | ".join(str(by[b]) for b in BLOCKS)
                         + f" | {r['n_q_significant']} | {fmt_value(r['spearman_vs_baseline'])} | "
                         f"{fmt_value(r['jaccard_vs_baseline'])} |")
        lines += [""] + validity_markdown(a)
        lines += [f"Figure: `{pair}/ablation_summary.png` (PDF beside it); tables "
                  f"`{pair}/ablation_summary_correlations.csv`, `{pair}/ablation_summary_counts.csv`.",
                  ""]
    return "\n".join(lines)
