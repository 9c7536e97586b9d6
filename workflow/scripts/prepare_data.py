"""Rule prepare_data: see qkov_pipeline.stages.data."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "data")  # noqa: F821 (snakemake is injected by the script directive)
