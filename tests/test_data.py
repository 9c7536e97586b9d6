"""Tests of interference.data: task sources, splits, tokenisation, storage."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from interference.data import (IGNORE, TASKS, TokenizedBatch, check_disjoint, load_task, load_task_batches,
                               match_lengths, prepare_task, register_task, save_task_batches, split_task,
                               tokenize_records)
from interference.data import store
from interference.data.mathgen import DEFAULT_MATH_MODULES
from interference.data.tokenization import _answer_start
from interference.models import train_bpe

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def tok():
    texts = [r["prompt"] + r["answer"] for r in load_task("code")[:40] + load_task("math", n=60)]
    return train_bpe(texts, vocab_size=300)


def fake_records(n: int, prefix: str = "t") -> list[dict]:
    return [{"id": f"{prefix}:{k}", "prompt": f"p{k}", "answer": f"a{k}"} for k in range(n)]


# ----------------------------------------------------------------------------- sources

def test_humaneval_164():
    recs = load_task("code")
    assert len(recs) == 164
    assert recs[12]["id"] == "code:HumanEval/12"
    assert len({r["id"] for r in recs}) == 164
    for r in recs:  # prompt + canonical solution is a whole Python function
        compile(r["prompt"] + r["answer"], r["id"], "exec")


def test_math_deterministic_and_prefix_stable():
    state = (random.getstate(), np.random.get_state()[1].copy())
    t0 = time.perf_counter()
    a = load_task("math", n=300, seed=3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"300 math problems took {elapsed:.1f} s"
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert load_task("math", n=300, seed=3) == a
    assert load_task("math", n=40, seed=3) == a[:40]  # prefix-stable
    b = load_task("math", n=300, seed=4)
    assert sum(x != y for x, y in zip(a, b)) > 250
    assert len({r["prompt"] for r in a}) == 300  # no duplicate questions
    assert a[0]["id"] == "math:algebra__linear_1d:000000"
    assert {r["id"].split(":")[1] for r in a} == set(DEFAULT_MATH_MODULES)  # module name in the id
    assert a[0]["prompt"].startswith("Question: ") and a[0]["prompt"].endswith("\nAnswer:")
    assert a[0]["answer"].startswith(" ")


def test_math_same_across_processes_and_hash_seeds():
    code = ("import json; from interference.data import load_task; "
            "print(json.dumps(load_task('math', n=60, seed=7, modules=['algebra__linear_1d', "
            "'numbers__is_prime', 'polynomials__evaluate', 'arithmetic__mul'])))")
    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": SRC}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1]


def test_math_bad_module():
    with pytest.raises(ValueError, match="unsupported math modules"):
        load_task("math", n=3, modules=["calculus__differentiate"])


def test_jsonl_and_parquet(tmp_path):
    rows = [{"qid": 7, "q": "What?", "a": " That."}, {"qid": "x", "q": "Why?", "a": " Because."}]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = load_task("jsonl", path=path, id_field="qid", prompt_field="q", answer_field="a")
    assert recs == [{"id": "mine:7", "prompt": "What?", "answer": " That."},
                    {"id": "mine:x", "prompt": "Why?", "answer": " Because."}]
    import pandas as pd

    pq = tmp_path / "other.parquet"
    pd.DataFrame({"q": ["A", "B"], "a": ["1", "2"]}).to_parquet(pq)
    recs = load_task("jsonl", path=pq, id_field=None, prompt_field="q", answer_field="a", name="pq")
    assert [r["id"] for r in recs] == ["pq:000000", "pq:000001"]


def test_task_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=str(missing)):
        load_task("jsonl", path=missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"{empty}.*no records"):
        load_task("jsonl", path=empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="lacks field.*answer"):
        load_task("jsonl", path=bad)
    register_task("_empty_test_task", lambda: [])
    try:
        with pytest.raises(ValueError, match="'_empty_test_task' has no records"):
            load_task("_empty_test_task")
        with pytest.raises(ValueError, match="already registered"):
            register_task("_empty_test_task", lambda: [])
    finally:
        TASKS.pop("_empty_test_task")
    with pytest.raises(ValueError, match="unknown task"):
        load_task("no_such_task")


def test_prose_task():
    recs = load_task("prose")
    assert len(recs) > 300
    assert all(r["answer"] for r in recs)


# ----------------------------------------------------------------------------- splits

def test_split_disjoint_seeded():
    recs = fake_records(50)
    s = split_task(recs, 10, 8, 6, seed=1, extra_roles={"control": 5})
    assert {k: len(v) for k, v in s.items()} == {"fisher": 10, "scored": 8, "reference": 6, "control": 5}
    ids = [r["id"] for v in s.values() for r in v]
    assert len(ids) == len(set(ids)) == 29
    check_disjoint(s)
    assert split_task(recs, 10, 8, 6, seed=1, extra_roles={"control": 5}) == s
    assert split_task(list(reversed(recs)), 10, 8, 6, seed=1, extra_roles={"control": 5}) == s  # order-free
    assert split_task(recs, 10, 8, 6, seed=2, extra_roles={"control": 5}) != s
    with pytest.raises(ValueError, match="in role 'fisher' and in role 'scored'"):
        check_disjoint({"fisher": ["a", "b"], "scored": ["b"]})


def test_split_errors():
    with pytest.raises(ValueError, match="12 records exist but the split needs 15"):
        split_task(fake_records(12), 5, 5, 5, seed=0, task="tiny")
    with pytest.raises(ValueError, match="duplicate record ids"):
        split_task(fake_records(5) + fake_records(1), 1, 1, 1)
    with pytest.raises(ValueError, match="clash"):
        split_task(fake_records(9), 1, 1, 1, extra_roles={"scored": 1})
    with pytest.raises(ValueError, match="non-negative"):
        split_task(fake_records(9), -1, 1, 1)


# ----------------------------------------------------------------------------- tokenisation

def manual_batch(records, tok, max_length, answer_only):
    """Expected tensors built from separate prompt / answer encodings."""
    rows, starts = [], []
    for r in records:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"]
        rows.append((p + a)[:max_length])
        starts.append(len(p) if answer_only else 0)
    width = max(len(x) for x in rows)
    ids = [[*x, *[tok.pad_token_id] * (width - len(x))] for x in rows]
    mask = [[1] * len(x) + [0] * (width - len(x)) for x in rows]
    labels = [[t if s <= j < len(x) else IGNORE for j, t in enumerate(row)]
              for row, x, s in zip(ids, rows, starts)]
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


@pytest.mark.parametrize("loss_tokens", ["all", "answer"])
def test_tokenize_matches_manual(tok, loss_tokens):
    recs = [{"id": "m:0", "prompt": "Question: What is 12 + 30?\nAnswer:", "answer": " 42"},
            {"id": "m:1", "prompt": "Question: Sort 3, 1, 2.\nAnswer:", "answer": " 1, 2, 3"},
            {"id": "m:2", "prompt": "Question: Calculate 1234567 * 89 - 1000000 + 5.\nAnswer:", "answer": " 6"}]
    # the boundary falls between BPE pre-tokens, so separate encodings concatenate exactly
    for r in recs:
        both = tok(r["prompt"] + r["answer"], add_special_tokens=False)["input_ids"]
        assert both == tok(r["prompt"])["input_ids"] + tok(r["answer"])["input_ids"]
    lens = [len(tok(r["prompt"] + r["answer"])["input_ids"]) for r in recs]
    max_length = sorted(lens)[1]  # truncates exactly the longest sample
    assert lens.count(max(lens)) == 1 and max(lens) > max_length
    batch = tokenize_records(recs, tok, max_length=max(lens), loss_tokens=loss_tokens)
    ids, mask, labels = manual_batch(recs, tok, max(lens), loss_tokens == "answer")
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert torch.equal(batch["labels"], labels)
    assert batch["sample_ids"] == ["m:0", "m:1", "m:2"] and batch.meta["n_truncated"] == 0
    assert all(t.dtype == torch.long for t in (batch["input_ids"], batch["attention_mask"], batch["labels"]))
    assert batch.meta["n_loss_tokens"] == (labels[:, 1:] != IGNORE).sum(1).tolist()
    if loss_tokens == "all":  # truncation: only the longest sample is cut
        cut = tokenize_records(recs, tok, max_length=max_length, loss_tokens="all")
        ids, mask, labels = manual_batch(recs, tok, max_length, False)
        assert cut["input_ids"].shape == (3, max_length)
        assert torch.equal(cut["input_ids"], ids) and torch.equal(cut["labels"], labels)
        assert cut.meta["n_truncated"] == 1 and cut.meta["truncated_ids"] == [recs[lens.index(max(lens))]["id"]]
        assert cut.meta["orig_lengths"] == lens


def test_answer_start_straddling_token():
    # offsets of "hel|lo world" tokenised as ["hello", " world"], prompt "hel" (3 chars)
    assert _answer_start([(0, 5), (5, 11)], 3) == 0
    assert _answer_start([(0, 0), (0, 3), (3, 5)], 3) == 2  # leading special token is prompt
    assert _answer_start([(0, 3)], 3) == 1  # no answer token


def test_tokenize_errors(tok):
    recs = [{"id": "x:0", "prompt": "a long prompt " * 20, "answer": " yes"}]
    with pytest.raises(ValueError, match="no predicted loss token.*x:0"):
        tokenize_records(recs, tok, max_length=8, loss_tokens="answer")
    with pytest.raises(ValueError, match="loss_tokens"):
        tokenize_records(recs, tok, max_length=8, loss_tokens="prompt")
    pad = tok.pad_token
    tok.pad_token = None
    try:
        with pytest.raises(ValueError, match="no pad token"):
            tokenize_records(recs, tok, max_length=8)
    finally:
        tok.pad_token = pad


@pytest.mark.parametrize("loss_tokens", ["all", "answer"])
def test_match_lengths(tok, loss_tokens):
    code = tokenize_records(load_task("code")[:20], tok, 512, loss_tokens)
    math = tokenize_records(load_task("math", n=20, seed=0), tok, 512, loss_tokens)
    out = match_lengths({"code": code, "math": math})
    after = {k: sorted(b.meta["n_loss_tokens"]) for k, b in out.items()}
    assert after["code"] == after["math"]  # equal n: identical sorted counts
    for name, before in (("code", code), ("math", math)):
        new = out[name]
        assert new.meta["n_loss_tokens"] == (new["labels"][:, 1:] != IGNORE).sum(1).tolist()
        assert all(a <= b for a, b in zip(new.meta["n_loss_tokens"], before.meta["n_loss_tokens"]))
        w = new["input_ids"].shape[1]
        keep = new["attention_mask"].bool()
        assert torch.equal(new["input_ids"][keep], before["input_ids"][:, :w][keep])  # a prefix of the original
        assert (new["labels"][~keep] == IGNORE).all() and (new["input_ids"][~keep] == tok.pad_token_id).all()
    assert out["code"].meta["length_matching"]["n_shortened"] > 0


# ----------------------------------------------------------------------------- storage

def make_prepared(tok):
    return prepare_task("math", tok, n_fisher=6, n_scored=4, n_reference=3, seed=0, max_length=64,
                        extra_roles={"control": 2}, task_kwargs={"n": 20, "seed": 1})


def test_save_load_roundtrip(tok, tmp_path):
    batches, records, meta = make_prepared(tok)
    check_disjoint(records)
    out = save_task_batches(tmp_path / "math", batches, records, meta)
    assert sorted(os.listdir(out)) == ["manifest.json", "tensors.safetensors"]
    json.loads((out / "manifest.json").read_text())  # plain JSON
    b2, r2, m2 = load_task_batches(out)
    assert m2 == meta and r2 == records and set(b2) == {"fisher", "scored", "reference", "control"}
    for role, b in batches.items():
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(b2[role][key], b[key])
        assert b2[role]["sample_ids"] == b["sample_ids"] and b2[role].meta == b.meta
        assert isinstance(b2[role], TokenizedBatch)


def test_save_is_atomic(tok, tmp_path, monkeypatch):
    batches, records, meta = make_prepared(tok)
    out = save_task_batches(tmp_path / "t", batches, records, meta)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("tensors.safetensors"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_task_batches(out, {"fisher": batches["fisher"]}, {"fisher": records["fisher"]}, {"other": 1})
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(os.listdir(out)) == ["manifest.json", "tensors.safetensors"]  # no temp left
    assert load_task_batches(out)[2] == meta  # the earlier save is intact
    # a torn pair (new tensors, old manifest) is detected
    (out / "tensors.safetensors").write_bytes(b"\x08" + (out / "tensors.safetensors").read_bytes()[1:])
    with pytest.raises(ValueError, match="does not match the manifest"):
        load_task_batches(out)


def test_store_errors(tok, tmp_path):
    batches, records, meta = make_prepared(tok)
    with pytest.raises(ValueError, match="missing"):
        load_task_batches(tmp_path / "none")
    with pytest.raises(ValueError, match="roles differ"):
        save_task_batches(tmp_path / "x", batches, {"fisher": records["fisher"]}, meta)
    bad = dict(records, scored=list(reversed(records["scored"])))
    with pytest.raises(ValueError, match="sample_ids do not match"):
        save_task_batches(tmp_path / "x", batches, bad, meta)
