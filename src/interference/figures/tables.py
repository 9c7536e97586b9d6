"""Table 1: the top conflicting cells (CSV and booktabs LaTeX).

Rows are distinct cells (a K/V cell is one row covering its GQA group's query heads) in
the order of :func:`interference.stats.cells.conflict_order`: the cells whose statistic
points the conflict's way (T > 0; T < 0 for the signed variant) by q-value, then by the
statistic, then layer and head; then the others, so that a cell significant the other way
(two-sided q) never ranks among the conflicts. Interval: the stats stage's
bootstrap percentile interval of the cell's mean difference of normalised disruption
(B minus R), not of the statistic itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..stats.cells import conflict_order
from . import style
from .inputs import load_cells

COLUMNS = ["block", "layer", "head", "kv_head", "kv_group", "statistic", "ci_low", "ci_high",
           "p_value", "q_value", "effect_size", "auc", "significant", "q_significant"]


def top_cells(cells, n: int | None = 20, variant: str = "qkov",
              only_significant: bool = False) -> pd.DataFrame:
    """The first ``n`` cells (all when None) in table order (see module doc)."""
    df = load_cells(cells)
    if only_significant:
        df = df[df["significant"]]
    order = conflict_order(df["q_value"], df["statistic"], variant == "signed",
                           then=(df["layer"], df["head"]))
    df = df.iloc[order]
    return df[[c for c in COLUMNS if c in df.columns]].head(n).reset_index(drop=True)


def _num(x: float) -> str:
    return f"{x:.3g}" if np.isfinite(x) else "--"


def to_latex(table: pd.DataFrame, caption: str, label: str = "tab:top-conflicts") -> str:
    """A booktabs table: block, layer, head(s), T, interval, p, q, d (no jinja2 needed)."""
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{latex_escape(caption)}}}", rf"\label{{{label}}}",
             r"\begin{tabular}{lrlrcrrr}", r"\toprule",
             r"Block & Layer & Head(s) & $T$ & Interval & $p$ & $q$ & $d$ \\", r"\midrule"]
    for r in table.itertuples():
        heads = (f"kv{r.kv_head} ({r.kv_group})" if r.block in style.SHARED_BLOCKS
                 else str(r.head))
        ci = f"[{_num(r.ci_low)}, {_num(r.ci_high)}]" if hasattr(r, "ci_low") else "--"
        mark = "*" if r.significant else ""
        lines.append(f"{r.block} & {r.layer} & {heads}{mark} & {_num(r.statistic)} & {ci} & "
                     f"{_num(r.p_value)} & {_num(r.q_value)} & {_num(r.effect_size)} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def caption(meta: dict | None, n_rows: int, summary: dict | None = None) -> str:
    what = style.describe(meta) if meta else "QK-OV interference"
    test = (summary or {}).get("test", "permutation test, B vs reference disruptors")
    return (f"Top {n_rows} conflicting cells ({what}): cells whose statistic T points the "
            f"conflict's way first, sorted by q then T ({test}). Interval: bootstrap "
            "percentile interval of the mean difference of normalised disruption; p: "
            "permutation p-value; q: Benjamini-Hochberg; d: Cohen's d. K/V rows are shared "
            f"by the listed query heads (GQA). *: significant ({style.significance_rule(summary)}).")


def latex_escape(text: str) -> str:
    """Plain caption text to LaTeX: escape &%_#$ and write <=, >=, × as math."""
    for ch in "&%_#$":
        text = text.replace(ch, "\\" + ch)
    for a, b in (("<=", r"$\le$"), (">=", r"$\ge$"), ("×", r"$\times$")):
        text = text.replace(a, b)
    return text


def write_top_table(cells, out_dir: str | Path, n: int | None = 20, meta: dict | None = None,
                    summary: dict | None = None) -> list[dict]:
    """Write ``top_conflicts.csv`` and ``top_conflicts.tex``; returns manifest entries."""
    out_dir = Path(out_dir)
    table = top_cells(cells, n, variant=(meta or {}).get("variant", "qkov"))
    text = caption(meta, len(table), summary)
    paths = [style.write_csv(out_dir / "top_conflicts.csv", table),
             style.write_text(out_dir / "top_conflicts.tex", to_latex(table, text))]
    return style.entries(paths, text)
