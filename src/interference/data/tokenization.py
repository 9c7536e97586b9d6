"""Tokenisation of records into the batch dict the engine consumes.

Batch (a `TokenizedBatch`, i.e. a dict with a `.meta` attribute):
    input_ids       LongTensor [n, T]  token ids, RIGHT-padded with the tokenizer's pad id
    attention_mask  LongTensor [n, T]  1 on real tokens, 0 on padding
    labels          LongTensor [n, T]  = input_ids, with -100 on padding (and, for
                                       loss_tokens="answer", on prompt tokens)
    sample_ids      list[str]   (n)    dataset ids, in row order
T is the longest sequence in the batch after truncation (<= max_length). Labels are
unshifted (Hugging Face convention): labels[:, t] is the target of the prediction made at
position t - 1, so a sample's predicted tokens are labels[i, 1:] != -100 and labels[:, 0]
is never a target.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from .tasks import Record

IGNORE = -100


class TokenizedBatch(dict):
    """The batch dict (keys above) plus `meta`: a JSON-able dict about how it was built."""

    def __init__(self, *args, meta: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.meta: dict = dict(meta or {})


def _answer_start(offsets: list[tuple[int, int]], prompt_chars: int) -> int:
    """Index of the first token holding any answer character (len(offsets) if none).

    A token that straddles the prompt/answer boundary counts as an answer token.
    Special tokens added by the tokenizer (offsets (0, 0)) at the start count as prompt.
    """
    for k, (_, end) in enumerate(offsets):
        if end > prompt_chars:
            return k
    return len(offsets)


def _special_prefix(ids: list[int], tokenizer, add_special_tokens: bool) -> int:
    """1 when the tokenizer put its BOS token in front of the text (kept by keep='tail')."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(add_special_tokens and bos is not None and len(ids) > 1 and ids[0] == bos)


def tokenize_records(records: list[Record], tokenizer, max_length: int, loss_tokens: str = "all",
                     add_special_tokens: bool = True, append_eos: bool = False,
                     keep: str = "head") -> TokenizedBatch:
    """Tokenises prompt + answer (+ eos_token if append_eos) for each record.

    loss_tokens="answer" needs a fast tokenizer (offset mapping): the answer starts at
    the first token holding an answer character. Truncation of a sample longer than
    max_length keeps its first max_length tokens (keep="head") or its last ones
    (keep="tail": for HumanEval, the canonical solution rather than the docstring; a
    leading BOS token stays in front). Raises ValueError if the tokenizer has
    no pad token or a sample is left with no predicted loss token (labels[i, 1:] all -100,
    e.g. its answer was truncated away). meta: max_length, loss_tokens, keep, n_truncated,
    truncated_ids, orig_lengths / lengths (tokens per sample before / after truncation),
    n_loss_tokens (predicted tokens per sample), prefix_tokens (kept BOS per sample),
    pad_token_id, padding_side="right".
    """
    if loss_tokens not in ("all", "answer"):
        raise ValueError(f"loss_tokens must be 'all' or 'answer', got {loss_tokens!r}")
    if keep not in ("head", "tail"):
        raise ValueError(f"keep must be 'head' or 'tail', got {keep!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    if not records:
        raise ValueError("no records to tokenize")
    if append_eos and tokenizer.eos_token is None:
        raise ValueError("append_eos=True but the tokenizer has no eos token")
    eos = tokenizer.eos_token if append_eos else ""
    rows, starts, orig, prefixes = [], [], [], []
    for rec in records:
        enc = tokenizer(rec["prompt"] + rec["answer"] + eos, add_special_tokens=add_special_tokens,
                        return_offsets_mapping=loss_tokens == "answer", truncation=False)
        ids = list(enc["input_ids"])
        orig.append(len(ids))
        start = 0 if loss_tokens == "all" else _answer_start(enc["offset_mapping"], len(rec["prompt"]))
        pre = _special_prefix(ids, tokenizer, add_special_tokens)
        if keep == "tail" and len(ids) > max_length:
            dropped = len(ids) - max_length
            if max_length - pre < 1:
                raise ValueError(f"max_length={max_length} leaves no room after the BOS token")
            ids = ids[:pre] + ids[pre + dropped:]
            if start >= pre:
                start = pre + max(0, start - pre - dropped)
        prefixes.append(pre)
        starts.append(start)
        rows.append(ids[:max_length])
    n, width = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (ids, start) in enumerate(zip(rows, starts)):
        row = torch.tensor(ids, dtype=torch.long)
        input_ids[i, :len(ids)] = row
        attention_mask[i, :len(ids)] = 1
        labels[i, start:len(ids)] = row[start:]
    ids_ = [r["id"] for r in records]
    n_loss = (labels[:, 1:] != IGNORE).sum(1).tolist()
    empty = [rid for rid, k in zip(ids_, n_loss) if k == 0]
    if empty:
        raise ValueError(f"{len(empty)} sample(s) have no predicted loss token after truncation to "
                         f"{max_length} (loss_tokens={loss_tokens!r}), e.g. {empty[:5]}")
    truncated = [rid for rid, k in zip(ids_, orig) if k > max_length]
    meta = {"max_length": max_length, "loss_tokens": loss_tokens, "append_eos": append_eos,
            "add_special_tokens": add_special_tokens, "keep": keep, "n_truncated": len(truncated),
            "truncated_ids": truncated, "orig_lengths": orig, "lengths": [len(r) for r in rows],
            "n_loss_tokens": n_loss, "prefix_tokens": prefixes,
            "pad_token_id": tokenizer.pad_token_id, "padding_side": "right"}
    return TokenizedBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          sample_ids=ids_, meta=meta)


def truncate_loss_tokens(batch: TokenizedBatch, targets: list[int], pad_token_id: int,
                         keep: str | None = None) -> TokenizedBatch:
    """Shortens sample i to targets[i] predicted loss tokens; re-pads to the new T.

    keep="head" (default: the batch's meta["keep"], else "head") cuts the row right after
    its targets[i]-th loss token; keep="tail" keeps its LAST targets[i] loss tokens with the
    token before the first of them as context (and a leading BOS token, meta
    "prefix_tokens"), moved to the start of the row. Tokens cut become padding (input pad
    id, mask 0, label -100).
    """
    keep = keep or batch.meta.get("keep", "head")
    if keep not in ("head", "tail"):
        raise ValueError(f"keep must be 'head' or 'tail', got {keep!r}")
    labels = batch["labels"]
    n = labels.shape[0]
    lengths = batch["attention_mask"].sum(1)
    prefixes = batch.meta.get("prefix_tokens") or [0] * n
    rows = []   # (positions kept, positions whose label is dropped)
    for i in range(n):
        cum = torch.cumsum((labels[i, 1:] != IGNORE).long(), 0)
        have = int(cum[-1]) if cum.numel() else 0
        if not 1 <= targets[i] <= have:
            raise ValueError(f"sample {batch['sample_ids'][i]}: target {targets[i]} not in [1, {have}]")
        if keep == "head":
            pos = int(torch.nonzero(cum == targets[i])[0]) + 1  # position of that label in the row
            rows.append((list(range(min(pos + 1, int(lengths[i])))), set()))
        else:
            first = int(torch.nonzero(cum == have - targets[i] + 1)[0]) + 1
            pre = int(prefixes[i])
            context = max(first - 1, pre)
            kept = list(range(pre)) + list(range(context, int(lengths[i])))
            rows.append((kept, set(range(pre)) | ({context} if context < first else set())))
    width = max(len(k) for k, _ in rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    new_labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (kept, no_label) in enumerate(rows):
        idx = torch.tensor(kept, dtype=torch.long)
        input_ids[i, :len(kept)] = batch["input_ids"][i, idx]
        mask[i, :len(kept)] = batch["attention_mask"][i, idx]
        lab = labels[i, idx].clone()
        for k, p in enumerate(kept):
            if p in no_label and keep == "tail":
                lab[k] = IGNORE
        new_labels[i, :len(kept)] = lab
    meta = dict(batch.meta)
    meta["keep"] = keep
    meta["lengths"] = [len(k) for k, _ in rows]
    meta["n_loss_tokens"] = (new_labels[:, 1:] != IGNORE).sum(1).tolist()
    bad = [batch["sample_ids"][i] for i in range(n) if meta["n_loss_tokens"][i] != targets[i]]
    if bad:
        raise AssertionError(f"length matching missed its targets for {bad[:5]}")
    return TokenizedBatch(input_ids=input_ids, attention_mask=mask, labels=new_labels,
                          sample_ids=list(batch["sample_ids"]), meta=meta)


def match_lengths(batches: Mapping[str, TokenizedBatch]) -> dict[str, TokenizedBatch]:
    """Truncates samples so that every task has the same distribution of loss-token counts.

    Why loss tokens: the engine's per-sample loss is a mean over predicted tokens, so the
    gradient scale depends on their number (the full length for loss_tokens="all", the
    answer length for "answer"). Rule (quantile matching, truncation only): the sample of
    rank r among n_k in task k sits at quantile q = (r + 0.5) / n_k; its target is
    min over tasks j of the count at quantile q in task j (sorted_j[floor(q * n_j)]).
    With equal n every task ends with exactly the same sorted counts. A batch tokenised with
    keep="tail" loses tokens at its start, any other at its end. meta gains
    "length_matching": {"method": "quantile_min_loss_tokens", "n_shortened", "before"}.
    """
    if len(batches) < 2:
        raise ValueError("match_lengths needs at least two tasks")
    counts = {t: np.asarray(b.meta["n_loss_tokens"]) for t, b in batches.items()}
    sorted_counts = {t: np.sort(c, kind="stable") for t, c in counts.items()}
    out: dict[str, TokenizedBatch] = {}
    for task, batch in batches.items():
        c = counts[task]
        order = np.argsort(c, kind="stable")
        q = np.empty(len(c))
        q[order] = (np.arange(len(c)) + 0.5) / len(c)
        target = c.copy()
        for other in sorted_counts.values():
            idx = np.minimum((q * len(other)).astype(int), len(other) - 1)
            target = np.minimum(target, other[idx])
        new = truncate_loss_tokens(batch, [int(x) for x in target], batch.meta["pad_token_id"],
                                   batch.meta.get("keep", "head"))
        new.meta["length_matching"] = {"method": "quantile_min_loss_tokens",
                                       "n_shortened": int((target < c).sum()),
                                       "before": [int(x) for x in c]}
        out[task] = new
    return out
