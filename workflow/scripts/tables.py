"""Rule tables: see qkov_pipeline.stages.tables."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "tables")  # noqa: F821 (snakemake is injected by the script directive)
