"""Every figure and table of one analysis from its saved results, plus a manifest.

``make_all_figures`` reads a heatmap folder (:func:`interference.results.load_heatmap`)
and the statistics' ``cells.csv`` and writes into ``out_dir`` (file names are fixed, so a
workflow can declare them):

    heatmap_{Q,K,V,O}.{pdf,png}  heatmap_panel.{pdf,png}
    block_comparison.{pdf,png,csv}
    top_conflicts.{csv,tex}
    forensics.{pdf,png,csv,md}
    pvalue_histogram.{pdf,png}
    null_top.{pdf,png}            only when null_npz is given
    figures.json                  manifest: [{'path' (relative to out_dir), 'caption'}]
"""
from __future__ import annotations

import json
from pathlib import Path

from ..results import load_heatmap, write_json
from .blocks import write_block_comparison
from .diagnostics import write_null_figure, write_pvalue_histogram
from .forensics import write_forensics
from .heatmaps import write_block_heatmaps
from .inputs import load_cells
from .tables import write_top_table

MANIFEST = "figures.json"


def make_all_figures(heatmap_dir, cells_csv, out_dir, texts=None, null_npz=None, *,
                     summary=None, n_top: int = 20, n_forensic_cells: int = 4,
                     n_pairs: int = 5, n_bootstrap: int = 1000, seed: int = 0) -> list[Path]:
    """Write all figures and tables; returns the written paths (the manifest last).

    heatmap_dir: folder of ``save_heatmap``; cells_csv: path or DataFrame; texts: sample
    id -> text (see :func:`.inputs.load_texts`); null_npz: optional ``null_top.npz``;
    summary: the statistics' summary dict or a JSON path (for alpha and the test name in
    captions); n_bootstrap/seed: the block-comparison bootstrap."""
    out_dir = Path(out_dir)
    heatmap, _ = load_heatmap(heatmap_dir)
    meta = heatmap["meta"]
    cells = load_cells(cells_csv)
    if isinstance(summary, (str, Path)):
        summary = json.loads(Path(summary).read_text())
    entries = (write_block_heatmaps(heatmap, cells, out_dir, summary)
               + write_block_comparison(heatmap, out_dir, n_bootstrap, seed)
               + write_top_table(cells, out_dir, n_top, meta, summary)
               + write_forensics(heatmap, cells, out_dir, texts, n_forensic_cells, n_pairs)
               + write_pvalue_histogram(cells, out_dir, meta, summary))
    if null_npz is not None:
        entries += write_null_figure(null_npz, out_dir, meta)
    manifest = [dict(e, path=str(Path(e["path"]).relative_to(out_dir))) for e in entries]
    write_json(out_dir / MANIFEST, manifest)
    return [Path(e["path"]) for e in entries] + [out_dir / MANIFEST]
