"""The validation's verdict in words: one paragraph per pair for summary.md and the README.

Plain statements of what was measured; nothing here decides what is "good enough" beyond
the one comparison stated: does the best map score's bootstrap interval (over cells) lie
above the best baseline's rho?
"""
from __future__ import annotations


def _fmt(x, nd=2) -> str:
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def verdict_lines(pair: str, seed, doc: dict, alpha: float = 0.05) -> list[str]:
    """Markdown lines: per step rule a sentence on predictive validity, then the
    intervention per k."""
    v = doc["verdict"]
    lines = []
    for rule, r in v.items():
        if rule == "intervention":
            continue
        variants = {c: rho for c, rho in r["rho"].items() if c.startswith("mean_M[")}
        best_var = max(variants, key=lambda c: -1e9 if variants[c] != variants[c]
                       else variants[c]) if variants else None
        beats = ("**beats**" if r["map_beats_baselines"] else "**does not beat**")
        lines.append(
            f"- `{pair}` split {seed}, step rule `{rule}`: the map's best score "
            f"`{r['best_map']}` predicts the measured change of A's loss with Spearman "
            f"rho = {_fmt(r['best_map_rho'])} [{_fmt(r['best_map_low'])}, "
            f"{_fmt(r['best_map_high'])}] over {doc['n_cells']} cells; the best baseline "
            f"`{r['best_baseline']}` has rho = {_fmt(r['best_baseline_rho'])}: the map "
            f"{beats} the baselines here. Best metric variant: `{best_var}` "
            f"(rho {_fmt(variants.get(best_var))}). First-order check (prediction from the "
            f"eval gradient vs measured): rho = {_fmt(r['first_order_rho'])}.")
    for r in v.get("intervention", []):
        helps = r["diff_high"] < 0 and r["p_value"] <= alpha
        lines.append(
            f"- `{pair}` split {seed}, fine-tuning on {doc['task_b']} with the map's top "
            f"{r['fraction']:.0%} ({r['k']} cells) frozen: forgetting "
            f"{_fmt(r['forgetting'], 4)} nats vs {_fmt(r['random_forgetting'], 4)} with "
            f"matched random cells (difference {_fmt(r['diff'], 4)} "
            f"[{_fmt(r['diff_low'], 4)}, {_fmt(r['diff_high'], 4)}], permutation p = "
            f"{_fmt(r['p_value'], 3)}, {r['n_random']} draws x {r['n_seeds']} seeds); learning "
            f"{_fmt(r['learning'], 4)} vs {_fmt(r['random_learning'], 4)}: "
            + ("freezing the map's cells forgets less (interval below 0 and p <= "
               f"{alpha:g})." if helps else "no evidence that freezing the map's cells forgets "
               f"less than random cells (that needs the interval below 0 and p <= {alpha:g}; "
               f"the smallest p {r['n_random']} draws allow is {1 / (1 + r['n_random']):.3g})."))
    return lines
