"""Rule prepare_tokenizer: see qkov_pipeline.stages.tokenizer."""
from qkov_pipeline.jobs import run_stage

run_stage(snakemake, "tokenizer")  # noqa: F821 (snakemake is injected by the script directive)
