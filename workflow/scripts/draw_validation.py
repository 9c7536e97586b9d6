"""Rule draw_validation: see qkov_pipeline.stages.draw_validation."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "draw_validation")  # noqa: F821 (snakemake is injected by the script directive)
