"""Rule validate: see qkov_pipeline.stages.validate."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "validate")  # noqa: F821 (snakemake is injected by the script directive)
