"""draw_validation: the validation's figures from its saved tables (never from gradients):
score vs measured ΔL_A per cell, precision@k, forgetting vs learning per arm and each
arm minus random (interference.figures.validation)."""
from __future__ import annotations

from pathlib import Path


def run(job) -> None:
    from interference.figures.validation import make_validation_figures
    from interference.validation.io import load_validation

    doc, tables = load_validation(Path(job.input.json).parent)
    paths = make_validation_figures(Path(job.output.scatter).parent, tables, doc)
    for files in paths.values():
        for p in files:
            job.artifact(p, "figures")
