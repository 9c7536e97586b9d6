"""Rule prepare_model: see qkov_pipeline.stages.model."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "model")  # noqa: F821 (snakemake is injected by the script directive)
