"""The join of layer chunks' saved heatmaps (the library side of rule ``scores``).

A chunk job saves each arm's heatmap of its layers (``<dir>/<arm>/``, results.save_heatmap)
and ``<dir>/chunk.json``. K chunks are joined by :func:`layerwise.join_heatmaps` (their
scores concatenated, the means and top conflicts recomputed over all layers). The one
chunk of a run with a single chunk is saved already joined (the chunk job passes it through
``join_heatmaps``; its chunk.json says ``saved_joined``), so reading it back is the join,
and needs no torch: a ``scores`` job then starts in a fraction of the time (the 7B
benchmark's critical path; a small CPU job on a cluster).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .._tables import BLOCKS
from ..results import load_heatmap, read_json_file


def join_chunk_folders(dirs: list[Path], arm: str) -> tuple[dict, dict | None, np.ndarray,
                                                             np.ndarray, list[str], list[dict]]:
    """The saved chunks of one arm (``<dir>/<arm>/`` and ``<dir>/chunk.json`` per chunk),
    joined in layer order: (heatmap, reference scores, B's and the reference's gradient
    norms [n] as sqrt of the chunks' summed squares, reference ids, chunk records).
    Refuses folders that are not chunks 0..K-1 of one plan. One chunk saved joined
    (``saved_joined`` in its chunk.json) is read as saved, without torch; any other is
    joined."""
    dirs = sorted((Path(d) for d in dirs), key=lambda d: int(d.name))
    infos = [read_json_file(d / "chunk.json", "snakemake --forcerun chunk_scores") for d in dirs]
    if [i["index"] for i in infos] != list(range(len(dirs))) or \
            any(i["n_chunks"] != len(dirs) for i in infos):
        raise ValueError(f"the chunk folders {[str(d) for d in dirs]} are not chunks "
                         f"0..{len(dirs) - 1} of one plan")
    loaded = [load_heatmap(d / arm) for d in dirs]
    extra = loaded[0][0]["extra"]
    if len(loaded) == 1 and infos[0].get("saved_joined"):
        heat, ref = loaded[0]
        heat = {"meta": heat["meta"], **{b: heat[b] for b in BLOCKS}}
    else:
        from ..architectures import QKOVConfig
        from .layerwise import join_heatmaps

        heat, ref = join_heatmaps([h for h, _ in loaded], [r for _, r in loaded],
                                  QKOVConfig(**extra["qkov_config"]), int(extra["top_k"]))
    norms_b = np.sqrt(np.sum([h["extra"]["sq_norms_b"] for h, _ in loaded], axis=0))
    norms_r = np.sqrt(np.sum([h["extra"]["sq_norms_r"] for h, _ in loaded], axis=0))
    return heat, ref, norms_b, norms_r, list(extra["sample_ids_r"]), infos
