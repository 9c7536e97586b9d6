"""Paper figures and tables from saved results (no gradients recomputed).

Modules: inputs (readers and the null_top.npz format), style (colour-blind-safe look,
atomic writers), heatmaps (layer x head maps per block), blocks (block comparison with a
bootstrap), tables (top conflicting cells), forensics (sample pairs), diagnostics
(p-values, permutation nulls), explorer (the clickable HTML page of one analysis),
ablation (variants compared), sweep (an ablation sweep's manifest and report), stability
(split seeds), make
(everything for one analysis, with a manifest). See docs/figures.md.
"""
from .ablation import (jaccard, jaccard_matrix, rank_correlations, significant_counts,
                       significant_set, write_ablation_summary)
from .blocks import block_means, write_block_comparison
from .explorer import write_explorer
from .diagnostics import write_null_figure, write_pvalue_histogram
from .forensics import pair_forensics, write_forensics
from .heatmaps import draw_block_heatmap, significant_squares, write_block_heatmaps
from .inputs import load_cells, load_null, load_texts
from .make import make_all_figures
from .stability import flag_counts, write_stability_report
from .tables import top_cells, write_top_table

__all__ = [
    "make_all_figures", "write_explorer", "write_block_heatmaps", "draw_block_heatmap",
    "significant_squares",
    "block_means", "write_block_comparison", "top_cells", "write_top_table",
    "pair_forensics", "write_forensics", "write_pvalue_histogram", "write_null_figure",
    "rank_correlations", "jaccard", "jaccard_matrix", "significant_set",
    "significant_counts", "write_ablation_summary", "flag_counts", "write_stability_report",
    "load_cells", "load_null", "load_texts",
]
