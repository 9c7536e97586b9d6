"""Task data: sources, disjoint splits, tokenisation, and pickle-free storage.

Each name loads with its module on first use (interference._lazy), so reading the task
registry (the workflow's planner does, in the Snakemake process) does not import torch.
"""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".packing": ("members_of", "pack_records"),
    ".prepare": ("content_digest", "prepare_task"),
    ".splits": ("CORE_ROLES", "check_disjoint", "split_task"),
    ".store": ("load_task_batches", "save_task_batches"),
    ".tasks": ("TASKS", "Record", "file_records", "humaneval_records", "load_task",
               "math_records", "pydoc_prose_records", "register_task", "validate_records"),
    ".tokenization": ("IGNORE", "TokenizedBatch", "match_lengths", "tokenize_records",
                      "truncate_loss_tokens"),
})
