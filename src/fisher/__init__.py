"""The seed's import paths (``fisher.qkov``, ``fisher.core.fisher_collector``): re-exports
of the ``interference`` library, nothing else."""
