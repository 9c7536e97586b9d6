"""Rule draw_ablation_summary: see qkov_pipeline.stages.figures.run_ablation."""
from qkov_pipeline.stages.figures import run_ablation

run_ablation(snakemake)  # noqa: F821 (snakemake is injected by the script directive)
