"""The assemble step of the statistics: the cells table, the summary, the significant
cells per block, the kept permutation nulls and the Benjamini-Yekutieli intervals, from the
computed pieces (:class:`.permutation.PermutationResult`, q-values, effect sizes, draws)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from .permutation import PermutationResult

TEST_NAMES = {
    "brunner_munzel": "two-sample permutation test of Brunner-Munzel's studentised rank "
                      "statistic (on the normal scale through its Satterthwaite t); "
                      "H0: P(share_B > share_R) + P(=)/2 = 1/2, exact when B/R labels are "
                      "exchangeable",
    "welch": "two-sample permutation test of Welch's t (studentised), B/R labels "
             "exchangeable under H0",
    "mean_diff": "two-sample permutation test of the mean difference, B/R labels "
                 "exchangeable under H0",
}
FDR_FIELDS = ["block", "layer", "head", "kv_head", "kv_group", "shared", "name",
              "statistic", "p_value", "q_value", "effect_size", "auc", "mean_b",
              "mean_r", "mean_diff", "null_mean", "null_sd", "ci_low", "ci_high",
              "ci_low_by", "ci_high_by"]


def cells_table(cells: pd.DataFrame, x_b: np.ndarray, x_r: np.ndarray, res: PermutationResult,
                q: np.ndarray, d: np.ndarray, auc: np.ndarray, q_sig: np.ndarray,
                sig: np.ndarray) -> pd.DataFrame:
    """One row per cell: the cell's columns, then the test's (intervals NaN until the
    bootstrap fills them in)."""
    m = x_b.shape[1]
    table = cells.drop(columns=[c for c in ("head_positions",)
                                if c in cells.columns]).reset_index(drop=True).copy()
    mean_b, mean_r = x_b.mean(axis=0), x_r.mean(axis=0)
    table["statistic"] = res.statistic[:m]
    table["p_value"] = res.pvalue[:m]
    table["q_value"] = q
    table["effect_size"] = d
    table["auc"] = auc
    table["mean_b"] = mean_b
    table["mean_r"] = mean_r
    table["mean_diff"] = mean_b - mean_r
    table["null_mean"] = res.null_mean[:m]
    table["null_sd"] = res.null_sd[:m]
    for col in ("ci_low", "ci_high", "ci_low_by", "ci_high_by"):
        table[col] = np.nan
    table["constant"] = res.constant[:m]
    table["q_significant"] = q_sig
    table["significant"] = sig
    return table


def extra_columns(res: PermutationResult, m: int, k: int) -> dict[str, np.ndarray]:
    """The test of the k columns tested beside the m cells, outside the FDR family."""
    return {"statistic": res.statistic[m:m + k], "p_value": res.pvalue[m:m + k],
            "null_mean": res.null_mean[m:m + k], "null_sd": res.null_sd[m:m + k]}


def null_top(res: PermutationResult, table: pd.DataFrame, m: int, n: int) -> dict[str, Any]:
    """The kept permutation samples T* of the n top cells (extra columns left out)."""
    keep = [i for i, c in enumerate(res.null_top_columns) if c < m][:n]
    cols = res.null_top_columns[keep]
    return {"columns": cols, "null": res.null_top[keep], "statistic": res.statistic[cols],
            "cells": table["name"].to_numpy()[cols].astype(str)
            if "name" in table else np.array([f"cell{c}" for c in cols])}


def finish(out: dict[str, Any]) -> None:
    """(Re)compute the counts and the 'fdr_corrected' lists from the table."""
    table = out["cells"]
    blocks = list(dict.fromkeys(table["block"].tolist()))
    summary = out["summary"]
    summary["n_q_significant"] = int(table["q_significant"].sum())
    summary["n_significant"] = int(table["significant"].sum())
    summary["n_q_significant_by_block"] = {
        b: int(table.loc[table["block"] == b, "q_significant"].sum()) for b in blocks}
    summary["n_significant_by_block"] = {
        b: int(table.loc[table["block"] == b, "significant"].sum()) for b in blocks}
    out["fdr_corrected"] = {b: significant_cells(table, b) for b in blocks}


def significant_cells(table: pd.DataFrame, block: str) -> list[dict[str, Any]]:
    """The significant cells of one block as plain dicts, by p-value."""
    sub = table[(table["block"] == block) & table["significant"]]
    sub = sub.sort_values(["p_value", "q_value", "layer", "head"], kind="stable")
    items = []
    for row in sub[[f for f in FDR_FIELDS if f in sub.columns]].to_dict("records"):
        row = {key: (val.item() if isinstance(val, np.generic) else val)
               for key, val in row.items()}
        row["heads"] = [int(h) for h in str(row["kv_group"]).split(",")]
        items.append(row)
    return items


def global_ratio(tot_b: np.ndarray, tot_r: np.ndarray, extra: dict[str, np.ndarray],
                 alternative: str) -> dict[str, Any]:
    """summary['global']: the B / R ratio of mean raw total disruption, with its p-value
    (``alternative``: what the permutations tested, 'greater', 'less' or 'two-sided')."""
    mean_tot_b, mean_tot_r = float(tot_b.mean()), float(tot_r.mean())
    return {
        "ratio": mean_tot_b / mean_tot_r if mean_tot_r != 0 else float("nan"),
        "mean_total_b": mean_tot_b,
        "mean_total_r": mean_tot_r,
        "statistic": float(extra["statistic"][0]),
        "p_value": float(extra["p_value"][0]),
        "description": "mean over disruptors of the raw total disruption sum_c s_jc, "
                       "B / R; p-value from the same permutations and statistic, "
                       + {"greater": "upper tail", "less": "lower tail"}.get(alternative,
                                                                          alternative),
    }


def by_intervals(table: pd.DataFrame, draws: np.ndarray, summary: dict, fdr_alpha: float,
                 fdr_family: str, ci_method: str = "basic") -> None:
    """Benjamini-Yekutieli FCR-adjusted intervals for the selected (significant) cells:
    level 1 - R alpha / m per FDR family (R selected of m cells). At such levels the
    percentile tails would need ~10^5-10^6 draws, so these intervals are normal ones,
    centre +- z_{1 - R alpha / (2m)} x bootstrap standard error, the centre being the
    estimate, bias-corrected as the basic interval is (2 estimate - mean of the draws) when
    ci_method is 'basic'."""
    fam = table["block"].to_numpy() if fdr_family == "block" \
        else np.zeros(len(table), dtype=int)
    levels = {}
    for f in dict.fromkeys(fam.tolist()):
        idx = np.flatnonzero(fam == f)
        sel = idx[table["significant"].to_numpy()[idx]]
        if sel.size == 0:
            continue
        level = 1.0 - sel.size * fdr_alpha / idx.size
        levels[str(f) if fdr_family == "block" else "all"] = level
        z = float(norm.ppf(1.0 - (1.0 - level) / 2.0))
        se = draws[:, sel].std(axis=0, ddof=1)
        est = table["mean_diff"].to_numpy()[sel]
        if ci_method == "basic":
            est = 2.0 * est - draws[:, sel].mean(axis=0)
        table.loc[sel, "ci_low_by"] = est - z * se
        table.loc[sel, "ci_high_by"] = est + z * se
    summary["by_levels"] = levels
    summary["by_method"] = ("normal interval, " + ("bias-corrected " if ci_method == "basic"
                                                   else "") +
                            "mean difference +- z x bootstrap standard error, at level "
                            "1 - R*fdr_alpha/m per FDR family")
