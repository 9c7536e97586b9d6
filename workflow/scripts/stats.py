"""Rule stats: see qkov_pipeline.stages.stats."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "stats")  # noqa: F821 (snakemake is injected by the script directive)
