"""One call from a task name to tokenised, disjoint role batches."""

from __future__ import annotations

import hashlib
from typing import Mapping

from .packing import members_of, pack_records
from .splits import check_disjoint, split_task
from .tasks import Record, load_task
from .tokenization import TokenizedBatch, tokenize_records


def content_digest(record: Record) -> str:
    """16 hex digits of SHA-256 over the text a model sees of one record (prompt + answer)."""
    return hashlib.sha256((record["prompt"] + "\x00" + record["answer"]).encode()).hexdigest()[:16]


def prepare_task(name: str, tokenizer, *, n_fisher: int, n_scored: int, n_reference: int, seed: int = 0,
                 max_length: int = 256, loss_tokens: str = "all", extra_roles: Mapping[str, int] | None = None,
                 task_kwargs: dict | None = None, pack: bool = False, keep: str = "head",
                 pack_separator: str = "\n\n", label: str | None = None,
                 ) -> tuple[dict[str, TokenizedBatch], dict[str, list[Record]], dict]:
    """load_task -> (pack_records) -> split_task -> tokenize_records per role.

    pack=True concatenates consecutive records into samples of up to max_length tokens
    (packing.py; needs loss_tokens="all"); keep="tail" truncates samples longer than
    max_length from the start instead of the end (tokenization.py). label: the name in
    error messages (default: the source name).

    Returns (batches_by_role, records_by_role, meta), ready for save_task_batches. meta
    records the task, its kwargs, the seed, role sizes, max_length, loss_tokens, packing,
    keep, the tokenizer's name_or_path and vocabulary size, and ``content``: sample id ->
    content_digest (what "the same sample" means when two tasks are compared).
    """
    label = label or name
    task_kwargs = dict(task_kwargs or {})
    if pack and loss_tokens != "all":
        raise ValueError(f"task {label!r}: packing joins several problems into one sample, so the "
                         f"loss covers all tokens; set loss_tokens='all' (got {loss_tokens!r}) or "
                         "turn packing off for this task")
    records = load_task(name, **task_kwargs)
    n_source = len(records)
    if pack:
        records = pack_records(records, tokenizer, max_length, separator=pack_separator, task=label)
    try:
        by_role = split_task(records, n_fisher, n_scored, n_reference, seed, extra_roles, task=label)
    except ValueError as err:
        if pack and "records exist" in str(err):
            raise ValueError(f"{err}: the {n_source} source records make only {len(records)} packed "
                             f"samples of up to {max_length} tokens; ask the source for more "
                             f"(e.g. a larger kwargs n)") from None
        raise
    if pack:   # member problems are disjoint across roles too (each is in one pack)
        check_disjoint({role: [m for r in recs for m in members_of(r)] for role, recs in by_role.items()})
    batches = {role: tokenize_records(recs, tokenizer, max_length, loss_tokens, keep=keep)
               for role, recs in by_role.items() if recs}
    by_role = {role: recs for role, recs in by_role.items() if recs}
    meta = {"task": name, "task_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in task_kwargs.items()},
            "n_records": len(records), "n_source_records": n_source, "seed": seed,
            "roles": {r: len(v) for r, v in by_role.items()},
            "max_length": max_length, "loss_tokens": loss_tokens, "keep": keep,
            "packing": ({"target_tokens": max_length, "separator": pack_separator,
                         "mean_members": sum(len(members_of(r)) for rs in by_role.values() for r in rs)
                         / max(1, sum(len(rs) for rs in by_role.values()))} if pack else None),
            "tokenizer": {"name_or_path": getattr(tokenizer, "name_or_path", ""), "vocab_size": len(tokenizer)},
            "content": {r["id"]: content_digest(r) for rs in by_role.values() for r in rs}}
    return batches, by_role, meta
