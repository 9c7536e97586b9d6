"""figures: every figure and table of one analysis (interference.figures), from saved results.

Rule ``draw_figures``: the primary split seed's heatmap with the analysis's cells table
(significant cells boxed), the block comparison, top conflicts, sample-pair forensics (texts
from the prepared data), the p-value histogram and the permutation null of the top cells
(``null_top.npz``, written by the statistics next to ``stats.json``); and the cell explorer
(``explorer.html``, with the control's cells and the validation's measured effects where
they exist).
Rule ``draw_stability`` (analyses with two or more split seeds): the stability report.
Rule ``draw_ablation_summary`` (a sweep: two or more experiments): the variants compared
(:func:`sweep_plan`, :func:`run_ablation`), one MLflow run per variant under one parent.
Nothing is recomputed from gradients.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from interference._tables import BLOCKS

from ..jobs import read_json

logger = logging.getLogger("qkov.figures")


def _quiet() -> None:
    for name in ("fontTools", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def texts_from_data(manifests) -> dict[str, dict]:
    texts = {}
    for path in manifests:
        for role in read_json(path)["roles"].values():
            for rec in role["records"]:
                texts[rec["id"]] = rec
    return texts


# ----------------------------------------------------------------------------- one analysis

def run(job) -> None:
    if job.rule == "draw_stability":
        return run_stability(job)
    import matplotlib

    matplotlib.use("Agg")
    _quiet()
    from interference.figures import make_all_figures, write_explorer
    from interference.results import staged_files

    fcfg = job.slice["figures"]
    out = Path(job.output.manifest).parent
    heatmap_dir = Path(job.input.heatmap).parent
    summary = read_json(job.input.stats[0])["summary"]
    null = Path(job.input.null_top)       # the statistics' permutation null of the top cells
    texts = texts_from_data(job.input.data)
    with job.timed("figures"), staged_files(out) as tmp:   # a failure leaves no file
        paths = make_all_figures(heatmap_dir, job.input.cells, tmp, texts=texts,
                                 summary=summary,
                                 null_npz=null,
                                 n_top=fcfg["n_top"], n_forensic_cells=fcfg["n_forensic_cells"],
                                 n_pairs=fcfg["n_pairs"], n_bootstrap=fcfg["n_bootstrap"],
                                 seed=fcfg["seed"])
        paths = [out / p.relative_to(tmp) for p in paths]
    with job.timed("explorer"):
        explorer = write_explorer(heatmap_dir, job.input.cells, job.output.explorer, texts,
                                  control_cells=(job.input.control or [None])[0],
                                  validation=(job.input.validation or [None])[0],
                                  summary=summary, k=fcfg["n_pairs"])
    logger.info("cell explorer: %s (open it in a browser, offline)", explorer)
    for p in paths:
        if p.suffix in (".png", ".csv", ".tex", ".md"):
            job.artifact(p, "figures")
    n_sig = int(summary.get("n_significant", 0))
    job.metric("figures.n_files", len(paths))
    job.metric("figures.n_significant_marked", n_sig)
    logger.info("%d figure and table files in %s", len(paths), out)


def run_stability(job) -> None:
    """Stability across the analysis's split seeds (Spearman of the maps, Jaccard of the
    significant sets, how many seeds flag each cell)."""
    import matplotlib

    matplotlib.use("Agg")
    _quiet()
    from interference.figures import write_stability_report

    seeds = job.slice["tables"]["split_seeds"]
    out = Path(job.output.png).parent
    maps = {s: {blk: read_json(p)["layer_head_avg"][blk]["estimate"] for blk in BLOCKS}
            for s, p in zip(seeds, job.input.stats)}
    kv = read_json(job.input.stats[0])["kv_head_of"]
    with job.timed("stability"):
        entries = write_stability_report(maps, dict(zip(seeds, job.input.seed_cells)), out,
                                         kv_head_of=kv)
    for e in entries:
        job.artifact(e["path"], "figures")
    job.metric("figures.n_split_seeds", len(seeds))


# ----------------------------------------------------------------------------- sweeps


def run_ablation(smk) -> None:
    """Rule ``draw_ablation_summary`` (local): figures, ablation.json/.md, MLflow runs."""
    import matplotlib
    import yaml

    from interference.figures.sweep import fmt_value, summarise_sweep, sweep_markdown
    from interference.results import atomic_path, write_json

    from .. import tracking
    from ..jobs import _setup_logging

    matplotlib.use("Agg")
    _setup_logging(smk.log[0])
    _quiet()
    t0 = time.time()
    s = json.loads(smk.params.slice)
    out = Path(smk.output.manifest).parent
    logger.info("ablation summary of sweep %s: variants %s", s["sweep"], s["variants"])
    with atomic_path(smk.output.config) as tmp:
        tmp.write_text(yaml.safe_dump({"rule": smk.rule, "sweep": s["sweep"], "config": s},
                                      sort_keys=False, width=100))
    doc = summarise_sweep(s, out)
    write_json(smk.output.manifest, doc)
    with atomic_path(smk.output.md) as tmp:
        tmp.write_text(sweep_markdown(doc))
    for pair, a in doc["analyses"].items():
        for v, r in a["variants"].items():
            logger.info("%-24s %-28s %3d significant, Spearman vs %s %s, Jaccard %s", pair, v,
                        r["n_significant"], a["baseline"], fmt_value(r["spearman_vs_baseline"]),
                        fmt_value(r["jaccard_vs_baseline"]))
    settings, _ = tracking.read_run_file(smk.input.run)
    lock = Path(smk.output.manifest).parents[2] / ".mlflow.lock"
    record = tracking.record_sweep(doc, out, settings, lock)
    if record["status"] == "logged":
        logger.info("MLflow: experiment %s, sweep run %s", record["experiment"],
                    record["parent_run_id"])
    elif record["status"] == "error":
        logger.warning("MLflow logging of the sweep failed (%s); the figures are complete; "
                       "rerun with --forcerun draw_ablation_summary to retry", record["error"])
    record["time_s"] = time.time() - t0
    write_json(smk.output.record, record)
    logger.info("finished in %.1f s", record["time_s"])
