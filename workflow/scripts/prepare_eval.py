"""Rule prepare_eval: see qkov_pipeline.stages.prepare_eval."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "prepare_eval")  # noqa: F821 (snakemake is injected by the script directive)
