"""Task data: sources, disjoint splits, tokenisation, and pickle-free storage."""

from .packing import members_of, pack_records
from .prepare import content_digest, prepare_task
from .splits import CORE_ROLES, check_disjoint, split_task
from .store import load_task_batches, save_task_batches
from .tasks import TASKS, Record, file_records, humaneval_records, load_task, math_records, \
    pydoc_prose_records, register_task, validate_records
from .tokenization import IGNORE, TokenizedBatch, match_lengths, tokenize_records, truncate_loss_tokens

__all__ = ["CORE_ROLES", "IGNORE", "TASKS", "Record", "TokenizedBatch", "check_disjoint", "content_digest",
           "file_records", "members_of", "pack_records",
           "humaneval_records", "load_task", "load_task_batches", "match_lengths", "math_records",
           "prepare_task", "pydoc_prose_records", "register_task", "save_task_batches", "split_task",
           "tokenize_records", "truncate_loss_tokens", "validate_records"]
