"""Rule track: see qkov_pipeline.hooks.run_track and qkov_pipeline.tracking.sync."""
from qkov_pipeline.hooks import run_track

run_track(snakemake)  # noqa: F821 (snakemake is injected by the script directive)
