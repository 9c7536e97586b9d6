"""QK-OV interference: where inside a transformer do two tasks fight?

Pipeline: data -> gradients (per-sample g_i, Fisher Î) -> scores (M^B_{ij,l,h}) ->
stats (permutation tests, FDR, bootstrap) -> figures. The library knows nothing of
Snakemake or MLflow.
"""
__version__ = "0.1.0"
