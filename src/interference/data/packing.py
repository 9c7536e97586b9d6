"""Packing: several short records concatenated into one sample of up to a target length.

Why: a task of short samples (DeepMind math problems: about 33 SmolLM2 tokens each) next to
a task of long ones (HumanEval: about 200) cannot be length-matched by truncation alone
without cutting the long task down to the short one's length (HumanEval would keep its
signature and the start of its docstring: English, not code). Packing brings the short
task up to the window the model sees instead, so matching then trims the longer task only
modestly. See docs/interpreting.md ("Length and scale").

Rule (greedy, deterministic, in the records' given order): a pack takes records while the
tokenised text of its members joined by ``separator`` fits in ``target_tokens``; the record
that does not fit starts the next pack (a single record longer than the target is a pack of
its own and is truncated later like any sample). Every record belongs to exactly one pack,
so packs split into roles by id (splits.py) keep their member problems disjoint too.

A packed record: ``id`` = ``"{namespace}:packed:{first:06d}-{last:06d}"`` (positions of its
first and last member in the source list: with the source's kwargs that encodes every
member), ``prompt`` = the members' texts (prompt + answer) joined by ``separator``,
``answer`` = "" and ``members`` = the members' dataset ids. The loss covers every token
(``loss_tokens='answer'`` is refused: a pack has many answers).
"""

from __future__ import annotations

from .tasks import Record

PACK_TAG = "packed"


def _namespace(records: list[Record], task: str) -> str:
    spaces = {r["id"].split(":", 1)[0] for r in records}
    return spaces.pop() if len(spaces) == 1 else task


def pack_records(records: list[Record], tokenizer, target_tokens: int, *, separator: str = "\n\n",
                 task: str = "task", add_special_tokens: bool = True) -> list[Record]:
    """Greedy packing of consecutive records into samples of at most target_tokens tokens.

    Returns the packed records (see the module doc). Raises ValueError for an empty input,
    a target below 2, or records that are already packed.
    """
    if not records:
        raise ValueError(f"task {task!r}: no records to pack")
    if target_tokens < 2:
        raise ValueError(f"pack target must be >= 2 tokens, got {target_tokens}")
    if any("members" in r for r in records):
        raise ValueError(f"task {task!r}: records are already packed")
    ns = _namespace(records, task)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=add_special_tokens, truncation=False)["input_ids"])

    texts = [r["prompt"] + r["answer"] for r in records]
    packs: list[tuple[int, int]] = []   # [first, last] positions, inclusive
    first, current = 0, texts[0]
    for k in range(1, len(texts)):
        candidate = current + separator + texts[k]
        if n_tokens(candidate) <= target_tokens:
            current = candidate
        else:
            packs.append((first, k - 1))
            first, current = k, texts[k]
    packs.append((first, len(texts) - 1))
    out: list[Record] = []
    for a, b in packs:
        rec: Record = {"id": f"{ns}:{PACK_TAG}:{a:06d}-{b:06d}",
                       "prompt": separator.join(texts[a:b + 1]), "answer": ""}
        rec["members"] = [records[k]["id"] for k in range(a, b + 1)]  # type: ignore[typeddict-unknown-key]
        out.append(rec)
    return out


def members_of(record: Record) -> list[str]:
    """The dataset ids a (possibly packed) record stands for."""
    return list(record.get("members") or [record["id"]])  # type: ignore[union-attr]
