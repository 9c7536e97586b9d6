"""Rule scores: see qkov_pipeline.stages.scores."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "scores")  # noqa: F821 (snakemake is injected by the script directive)
