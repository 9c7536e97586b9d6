"""The signed -log10 q candidate (session 26's fix of validation.candidates.map_statistics)
scored against run 3's measured ΔL_A without a GPU: validation_cells.csv holds every cell's
q, T and ΔL_A. The cells bootstrap is the library's (validity_table, seed 0: its cell
resamples are drawn first, so the intervals are those a full run gives); the eval-sample
intervals need the per-sample losses and are left out.

    PYTHONPATH=src python benchmarks/results/validation_h100_s26/signed_q_validity.py
"""
from pathlib import Path

import numpy as np
import pandas as pd

from interference.validation import validity_table

HERE = Path(__file__).parent
cells = pd.read_csv(HERE / "validation_cells.csv")
for rule, t in cells.groupby("step_rule", sort=False):
    toward = t["statistic"].to_numpy(float)           # the default variant: conflicts T > 0
    neg_log10_q = -np.log10(np.clip(t["q_value"].to_numpy(float), 1e-300, 1.0))
    cands = {"neg_log10_q (unsigned, as run)": neg_log10_q,
             "neg_log10_q (signed by T)": np.sign(toward) * neg_log10_q}
    table = validity_table(cands, t["delta_loss_a"].to_numpy(float)[:, None])
    # the table's unsigned row must equal what the run wrote (the same cells bootstrap)
    ran = pd.read_csv(HERE / "validity.csv").set_index(["step_rule", "candidate"])
    ran = ran.loc[(rule, "neg_log10_q")]
    row = table.set_index("candidate").loc["neg_log10_q (unsigned, as run)"]
    assert np.isclose(row["rho"], ran["rho"]) and np.isclose(row["rho_cells_low"],
                                                               ran["rho_cells_low"])
    print(rule)
    print(table[["candidate", "rho", "rho_cells_low", "rho_cells_high", "rho_abs",
                 "precision@0.1"]].round(3).to_string(index=False))
