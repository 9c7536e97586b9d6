"""Rule figures: see qkov_pipeline.stages.figures."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "figures")  # noqa: F821 (snakemake is injected by the script directive)
