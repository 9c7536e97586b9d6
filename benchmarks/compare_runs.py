"""Two workflow runs of the same experiment that differ in one setting (e.g. the gradient
stores' dtype), compared on their results: per arm, the significant cells of each run and
how many differ, Spearman of the cells' statistics, the largest q-value and effect-size
differences, and the largest relative difference of each scores.npz array.

    python benchmarks/compare_runs.py RUN_A RUN_B [--experiment default] [--model smollm2]
        [--pair math__code]

RUN_A / RUN_B: the folders Snakemake ran in (holding results/). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr


def compare_arm(a: Path, b: Path) -> dict:
    """The agreement of one arm's split folder ``b`` with ``a``."""
    ca, cb = pd.read_csv(a / "cells.csv"), pd.read_csv(b / "cells.csv")
    if list(ca["name"]) != list(cb["name"]):
        raise ValueError(f"{a} and {b} hold different cells")
    sa, sb = ca["significant"].to_numpy(bool), cb["significant"].to_numpy(bool)
    za = np.load(a / "scores.npz", allow_pickle=False)
    zb = np.load(b / "scores.npz", allow_pickle=False)
    rel = {k: float(np.abs(za[k] - zb[k]).max() / np.abs(za[k]).max()) for k in za.files
           if za[k].dtype.kind == "f" and za[k].size > 1}
    return {"cells": len(ca), "significant_a": int(sa.sum()), "significant_b": int(sb.sum()),
            "changed": int((sa != sb).sum()),
            "by_block_a": {k: int(v) for k, v in ca[sa].groupby("block").size().items()},
            "by_block_b": {k: int(v) for k, v in cb[sb].groupby("block").size().items()},
            "spearman_statistic": float(spearmanr(ca["statistic"], cb["statistic"])[0]),
            "max_abs_diff_q": float(np.abs(ca["q_value"] - cb["q_value"]).max()),
            "max_abs_diff_effect": float(np.abs(ca["effect_size"] - cb["effect_size"]).max()),
            "max_rel_score": rel}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--experiment", default="default")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--pair", default="math__code")
    ap.add_argument("--split", default="split0")
    a = ap.parse_args(argv)
    out = {}
    for arm in (a.pair, f"{a.pair}.control"):
        where = Path("results") / a.experiment / a.model / arm / a.split
        if (a.run_a / where).exists():
            out[arm] = compare_arm(a.run_a / where, a.run_b / where)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
