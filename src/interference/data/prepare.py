"""One call from a task name to tokenised, disjoint role batches."""

from __future__ import annotations

from typing import Mapping

from .splits import split_task
from .tasks import Record, load_task
from .tokenization import TokenizedBatch, tokenize_records


def prepare_task(name: str, tokenizer, *, n_fisher: int, n_scored: int, n_reference: int, seed: int = 0,
                 max_length: int = 256, loss_tokens: str = "all", extra_roles: Mapping[str, int] | None = None,
                 task_kwargs: dict | None = None,
                 ) -> tuple[dict[str, TokenizedBatch], dict[str, list[Record]], dict]:
    """load_task -> split_task -> tokenize_records per role.

    Returns (batches_by_role, records_by_role, meta), ready for save_task_batches. meta
    records the task, its kwargs, the seed, role sizes, max_length, loss_tokens and the
    tokenizer's name_or_path and vocabulary size.
    """
    task_kwargs = dict(task_kwargs or {})
    records = load_task(name, **task_kwargs)
    by_role = split_task(records, n_fisher, n_scored, n_reference, seed, extra_roles, task=name)
    batches = {role: tokenize_records(recs, tokenizer, max_length, loss_tokens)
               for role, recs in by_role.items() if recs}
    by_role = {role: recs for role, recs in by_role.items() if recs}
    meta = {"task": name, "task_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in task_kwargs.items()},
            "n_records": len(records), "seed": seed, "roles": {r: len(v) for r, v in by_role.items()},
            "max_length": max_length, "loss_tokens": loss_tokens,
            "tokenizer": {"name_or_path": getattr(tokenizer, "name_or_path", ""), "vocab_size": len(tokenizer)}}
    return batches, by_role, meta
