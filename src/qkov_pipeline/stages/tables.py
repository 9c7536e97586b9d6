"""tables: one analysis's cells table over its split seeds.

``<analysis>/cells.csv``: one row per distinct cell with the statistics of the PRIMARY
split seed (the first of data.split_seeds: column ``split_seed``) and, over all seeds,
``n_split_seeds``, ``n_seeds_q_significant`` and ``n_seeds_significant``.
``stability.json``: with two or more seeds, per block the Spearman rank correlation of the
layer x head maps between seeds and the Jaccard overlap of the significant sets, their
means (``summary``), the schema version, the config hash and units. ``cells.schema.json``:
the units and meanings of the table's columns.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
import pandas as pd

from interference._tables import BLOCKS

from ..jobs import read_json

logger = logging.getLogger("qkov.tables")


def merge(frames: dict[int, pd.DataFrame]) -> pd.DataFrame:
    seeds = list(frames)
    primary = frames[seeds[0]].copy()
    for col, src in (("n_seeds_q_significant", "q_significant"), ("n_seeds_significant", "significant")):
        counts = sum(f.set_index("name")[src].astype(bool).astype(int) for f in frames.values())
        primary[col] = primary["name"].map(counts).astype(int)
    primary["n_split_seeds"] = len(seeds)
    return primary


def stability(maps: dict[int, dict], frames: dict[int, pd.DataFrame]) -> dict:
    from scipy.stats import spearmanr

    out = {"n_seeds": len(frames), "pairs": []}
    for s1, s2 in itertools.combinations(list(frames), 2):
        row = {"seed_a": s1, "seed_b": s2}
        for blk in BLOCKS:
            x = np.asarray(maps[s1][blk]).ravel()
            y = np.asarray(maps[s2][blk]).ravel()
            row[f"spearman_{blk}"] = float(spearmanr(x, y).statistic)
        sig1 = set(frames[s1].loc[frames[s1]["significant"].astype(bool), "name"])
        sig2 = set(frames[s2].loc[frames[s2]["significant"].astype(bool), "name"])
        union = sig1 | sig2
        row["jaccard_significant"] = len(sig1 & sig2) / len(union) if union else float("nan")
        out["pairs"].append(row)
    return out


def stability_summary(stab: dict, table: pd.DataFrame, n_seeds: int) -> dict:
    """Means over seed pairs (per block and overall) and how many cells each number of seeds
    flags: the numbers the run summary prints."""
    out = {"n_seeds": n_seeds,
           "n_cells_flagged_by": {str(k): int((table["n_seeds_significant"] == k).sum())
                                  for k in range(n_seeds + 1)}}
    if stab["pairs"]:
        for blk in BLOCKS:
            out[f"mean_spearman_{blk}"] = float(np.nanmean([p[f"spearman_{blk}"]
                                                           for p in stab["pairs"]]))
        out["mean_spearman"] = float(np.nanmean([out[f"mean_spearman_{b}"] for b in BLOCKS]))
        jac = [p["jaccard_significant"] for p in stab["pairs"]]
        out["mean_jaccard_significant"] = (float(np.nanmean(jac))
                                           if not all(np.isnan(jac)) else float("nan"))
    return out


def run(job) -> None:
    from interference.results import SCHEMA_VERSION, atomic_path, write_json, write_table_schema


    seeds = job.slice["split_seeds"]
    frames = {s: pd.read_csv(p, dtype={"kv_group": str}) for s, p in zip(seeds, job.input.cells)}
    maps = {s: {blk: read_json(p)["layer_head_avg"][blk]["estimate"] for blk in BLOCKS}
            for s, p in zip(seeds, job.input.stats)}
    table = merge(frames)
    # rows hold the primary seed's statistics, with that job's config hash; the sidecar
    # records this job's hash (all seeds) and each seed's
    with atomic_path(job.output.cells) as tmp:
        table.to_csv(tmp, index=False)
    write_table_schema(job.output.cells, list(table.columns), job.config_hash,
                       {"rows_config_hash": str(table["config_hash"].iloc[0]),
                        "split_seeds": seeds, "primary_split_seed": seeds[0],
                        "per_seed_config_hashes": {str(s): str(f["config_hash"].iloc[0])
                                                   for s, f in frames.items()}})
    stab = stability(maps, frames)
    stab.update(schema_version=SCHEMA_VERSION, config_hash=job.config_hash,
                units={"spearman_<block>": "Spearman rank correlation of the layer x head maps "
                                           "(layer_head_avg) of two split seeds, -1..1",
                       "jaccard_significant": "|S1 & S2| / |S1 | S2| of the significant cell "
                                              "sets of two split seeds, 0..1 (NaN: both empty)"},
                summary=stability_summary(stab, table, len(seeds)))
    write_json(job.output.stability, stab)
    job.metric("tables.n_cells", len(table))
    job.metric("tables.n_significant_primary", int(table["significant"].astype(bool).sum()))
    job.metric("tables.n_significant_all_seeds",
               int((table["n_seeds_significant"] == len(seeds)).sum()))
    logger.info("%s: %d cells, %d significant in the primary seed %s, %d in all %d seeds",
                job.wildcards["pair"], len(table), int(table["significant"].astype(bool).sum()),
                seeds[0], int((table["n_seeds_significant"] == len(seeds)).sum()), len(seeds))
    job.artifact(job.output.cells, "tables")
