"""Rule summary: see qkov_pipeline.stages.summary."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "summary")  # noqa: F821 (snakemake is injected by the script directive)
