"""figures: every figure and table of one analysis (interference.figures), from saved results.

The primary split seed's heatmap with the analysis's cells table (significant cells boxed),
the block comparison, top conflicts, sample-pair forensics (texts from the prepared data)
and the p-value histogram; with two or more split seeds also the stability report.
Nothing is recomputed from gradients.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..jobs import read_json

logger = logging.getLogger("qkov.figures")
BLOCKS = ("Q", "K", "V", "O")


def texts_from_data(manifests) -> dict[str, dict]:
    texts = {}
    for path in manifests:
        for role in read_json(path)["roles"].values():
            for rec in role["records"]:
                texts[rec["id"]] = rec
    return texts


def run(job) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from interference.figures import make_all_figures, write_stability_report
    from interference.results import write_json

    fcfg = job.slice["figures"]
    seeds = job.slice["tables"]["split_seeds"]
    out = Path(job.output.manifest).parent
    heatmap_dir = Path(job.input.heatmap).parent
    summary = read_json(job.input.stats[0])["summary"]
    with job.timed("figures"):
        paths = make_all_figures(heatmap_dir, job.input.cells, out,
                                 texts=texts_from_data(job.input.data), summary=summary,
                                 n_top=fcfg["n_top"], n_forensic_cells=fcfg["n_forensic_cells"],
                                 n_pairs=fcfg["n_pairs"], n_bootstrap=fcfg["n_bootstrap"],
                                 seed=fcfg["seed"])
    if len(seeds) > 1:
        maps = {s: {blk: read_json(p)["layer_head_avg"][blk]["estimate"] for blk in BLOCKS}
                for s, p in zip(seeds, job.input.stats)}
        kv = read_json(job.input.stats[0])["kv_head_of"]
        entries = write_stability_report(maps, dict(zip(seeds, job.input.seed_cells)), out,
                                         kv_head_of=kv)
        manifest = read_json(job.output.manifest)
        manifest += [dict(e, path=str(Path(e["path"]).relative_to(out))) for e in entries]
        write_json(job.output.manifest, manifest)
        paths += [Path(e["path"]) for e in entries]
    for p in paths:
        if p.suffix in (".png", ".csv", ".tex", ".md"):
            job.artifact(p, "figures")
    job.metric("figures.n_files", len(paths))
    logger.info("%d figure and table files in %s", len(paths), out)
