"""Rule collect: see qkov_pipeline.stages.gradients."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "gradients")  # noqa: F821 (snakemake is injected by the script directive)
