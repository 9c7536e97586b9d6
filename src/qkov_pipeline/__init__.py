"""The QK-OV workflow's stage functions, configuration and tracking.

The library ``interference`` knows nothing of Snakemake or MLflow; this package wraps it for
the workflow: ``config`` (Hydra composition, per-stage slices, content keys), ``jobs`` (the
frame each job runs in), ``stages`` (one module per rule: read inputs, call the library,
write outputs), ``tracking`` (MLflow runs and records), ``hooks`` (workflow start / end).
"""
