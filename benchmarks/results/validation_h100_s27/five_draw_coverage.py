"""How often the arms' interval from 5 random draws covers the 20-draw difference.

Reads draws20/arms.csv (20 matched random draws x 3 seeds per k), takes random subsets of
5 draws, and asks compare_arms (the library's interval: two-way percentile bootstrap over
seeds and draws) for each subset's interval of top - random and bottom - random. The
target is the difference with all 20 draws; it shares 5 draws with each subset, which
favours coverage. Run: PYTHONPATH=src python benchmarks/results/validation_h100_s27/five_draw_coverage.py
"""
from pathlib import Path

import numpy as np
import pandas as pd

from interference.validation import compare_arms

HERE = Path(__file__).parent
arms = pd.read_csv(HERE / "draws20" / "arms.csv")
rng = np.random.default_rng(0)
n_subsets, size = 200, 5
for versus in ("top", "bottom"):
    full = compare_arms(arms, versus, n_bootstrap=1000).set_index("fraction")
    hits = {f: 0 for f in full.index}
    widths = {f: [] for f in full.index}
    for _ in range(n_subsets):
        keep = rng.choice(20, size=size, replace=False)
        sub = arms[(arms["arm"] != "random") | arms["draw"].isin(keep)]
        got = compare_arms(sub, versus, n_bootstrap=1000, seed=int(rng.integers(1 << 31)))
        for _, r in got.iterrows():
            f = r["fraction"]
            hits[f] += r["diff_low"] <= full.loc[f, "diff"] <= r["diff_high"]
            widths[f].append(r["diff_high"] - r["diff_low"])
    for f in full.index:
        print(f"{versus:6} k={f:.2f}: 20-draw diff {full.loc[f, 'diff']:+.4f} "
              f"[{full.loc[f, 'diff_low']:+.4f}, {full.loc[f, 'diff_high']:+.4f}]; "
              f"5-draw 95% intervals cover it {hits[f] / n_subsets:.0%} of {n_subsets} "
              f"subsets (median width {np.median(widths[f]):.4f} against "
              f"{full.loc[f, 'diff_high'] - full.loc[f, 'diff_low']:.4f} with 20)")
