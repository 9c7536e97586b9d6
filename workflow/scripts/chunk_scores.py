"""Rule chunk_scores: see qkov_pipeline.stages.scores (run_chunk)."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "scores")  # noqa: F821 (snakemake is injected by the script directive)
