"""Chunk jobs without gradient stores, through the workflow: the tiny experiment with
resources.collect.layer_chunks=2 (two chunk_scores jobs, one layer each) or with
gradient_stores=false (one chunk_scores job collecting and scoring both layers) writes
cells.csv files byte-identical to the stores' run (the session's tiny_run)."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import ROOT, job_counts, run_workflow
from qkov_pipeline.stages.chunks import run_join

CHUNKS = "++resources.collect.layer_chunks=2"
NO_STORES = "++resources.collect.gradient_stores=false"


@pytest.mark.parametrize("setting, n_jobs", [(CHUNKS, 2), (NO_STORES, 1)])
def test_chunked_cells_equal_the_stores_run_byte_for_byte(tiny_run, tmp_path, setting, n_jobs):
    work = tmp_path / "chunked"
    for shared in ("_models", "_data"):     # the same model and samples (no collect job)
        shutil.copytree(tiny_run["results"] / shared, work / "results" / shared)
    targets = [f"results/tiny/tiny/{a}/split0/cells.csv"
               for a in ("math__code", "math__code.control")]
    res = run_workflow(work, "--cores", "2", "--config", "experiment=tiny",
                       f"overrides=[{setting},++tracking.mode=off]", "--", *targets,
                       timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    counts = job_counts(res.stdout + res.stderr)
    assert counts.get("chunk_scores") == n_jobs and "collect" not in counts, counts
    for analysis, target in zip(("pair", "control"), targets):
        want = (tiny_run[analysis] / "split0" / "cells.csv").read_bytes()
        assert (work / target).read_bytes() == want, analysis
    assert not list((work / "results" / "_stores").glob("*")) if \
        (work / "results" / "_stores").exists() else True
    assert not (work / targets[0]).parent.joinpath("chunks", "0").exists()   # temporary


RANDOM = "model=tiny_random"    # weights made by each job from model.seed (source: random)


def test_random_weights_chunks_start_without_prepare_model_and_equal_the_stores(tmp_path):
    """Without stores, a chunk job of a random-weights model makes the model itself: it
    needs only the data (no prepare_model job runs for it), the scores job that joins the
    chunks waits for model.json (layout proof, tokenizer digest), and cells.csv equals a
    stores run's on the same model and data byte for byte (both arms)."""
    pair = "results/tiny/tiny_random/math__code"
    targets = [f"{pair}/split0/cells.csv", f"{pair}.control/split0/cells.csv"]
    work = tmp_path / "chunked"
    res = run_workflow(work, "--cores", "2", "--notemp", "--config", "experiment=tiny",
                       f"overrides=[{RANDOM},{NO_STORES},++tracking.mode=off]", "--",
                       f"{pair}/split0/chunks/0", timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    counts = job_counts(res.stdout + res.stderr)
    assert counts.get("chunk_scores") == 1 and "prepare_model" not in counts, counts
    assert not (work / "results" / "_models").exists()
    folder = work / pair / "split0" / "chunks" / "0"
    chunk = json.loads((folder / "chunk.json").read_text())
    assert set(chunk["tokenizer_digests"]) == {"math", "code"}
    other = tmp_path / "model.json"           # a model whose tokenizer is not the data's
    other.write_text(json.dumps({"tokenizer_digest": "0" * 16}))
    with pytest.raises(ValueError, match="tokenizer 0{16}"):
        run_join(join_job([folder], other))
    res = run_workflow(work, "--cores", "2", "--config", "experiment=tiny",
                       f"overrides=[{RANDOM},{NO_STORES},++tracking.mode=off]", "--",
                       *targets, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    counts = job_counts(res.stdout + res.stderr)
    assert counts.get("prepare_model") == 1 and "chunk_scores" not in counts, counts
    model = json.loads(next((work / "results" / "_models").glob("*/model.json")).read_text())
    assert set(chunk["tokenizer_digests"].values()) == {model["tokenizer_digest"]}
    stores = tmp_path / "stores"
    for shared in ("_models", "_data"):     # the same model and samples
        shutil.copytree(work / "results" / shared, stores / "results" / shared)
    res = run_workflow(stores, "--cores", "2", "--config", "experiment=tiny",
                       f"overrides=[{RANDOM},++tracking.mode=off]", "--", *targets,
                       timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert job_counts(res.stdout + res.stderr).get("collect") == 2
    for target in targets:
        assert (work / target).read_bytes() == (stores / target).read_bytes(), target


def join_job(chunks: list, model_json):
    """What rule scores' stage (stages.chunks.run_join) reads of its job before writing:
    the named inputs (attributes and keys(), as snakemake's), the arm, a timer."""
    import contextlib
    from types import SimpleNamespace

    class Input(list):
        def __init__(self, **named):
            super().__init__(str(p) for v in named.values() for p in v)
            self.__dict__.update({k: [str(p) for p in v] for k, v in named.items()})

        def keys(self):
            return [k for k in self.__dict__]

    return SimpleNamespace(input=Input(chunks=chunks, model=[model_json]), slice={"arm": "main"},
                           timed=lambda name: contextlib.nullcontext())


def test_the_join_refuses_chunks_of_another_tokenizer(tmp_path):
    """The scores job compares each chunk's recorded data digests with model.json's."""
    from qkov_pipeline.stages.chunks import check_chunk_tokenizers

    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps({"tokenizer_digest": "aaaa"}))
    same = {"tokenizer_digests": {"math": "aaaa", "code": "aaaa"}}
    check_chunk_tokenizers(model_json, ["c0", "c1"], [same, {}])   # {}: a chunk of the stores
    other = {"tokenizer_digests": {"math": "aaaa", "code": "bbbb"}}
    with pytest.raises(ValueError, match=r"c1 \(task code\).*tokenizer bbbb.*tokenizer aaaa"):
        check_chunk_tokenizers(model_json, ["c0", "c1"], [same, other])


def test_layer_chunks_refuse_what_needs_every_layer():
    """Planned before any job: settings that need a whole-model gradient or the stores."""
    from qkov_pipeline import plan as qp

    schema = ROOT / "workflow" / "schemas" / "config.schema.yaml"
    plan = qp.build_plan(ROOT / "conf", schema, ["tiny"], [CHUNKS])
    qp.check_plan(plan)
    assert plan.experiment_jobs("tiny")["stores"] == []
    assert len(plan.chunk_dirs("tiny", "tiny", "math__code.control", 0)) == 2
    one = qp.build_plan(ROOT / "conf", schema, ["tiny"], [NO_STORES])
    assert one.experiment_jobs("tiny")["stores"] == []
    assert len(one.chunk_dirs("tiny", "tiny", "math__code", 0)) == 1
    assert "model" in one.chunk_inputs(Wildcards("tiny", "tiny", "math__code", "0"))
    assert "model" in one.scores_inputs(Wildcards("tiny", "tiny", "math__code", "0"))
    stores = qp.build_plan(ROOT / "conf", schema, ["tiny"], [])
    assert "grads" in stores.chunk_inputs(Wildcards("tiny", "tiny", "math__code", "0"))
    # prepare_model goes first where the data's consumers read the model (collect, chunk
    # jobs of a prepared model), not where only the join waits for it (random weights)
    assert stores.model_priority == one.model_priority == plan.model_priority == 1
    assert qp.build_plan(ROOT / "conf", schema, ["tiny"], [RANDOM, NO_STORES]).model_priority == 0
    assert qp.build_plan(ROOT / "conf", schema, ["tiny"], [RANDOM]).model_priority == 1
    with pytest.raises(ValueError, match="gradient_stores"):
        qp.check_plan(qp.build_plan(ROOT / "conf", schema, ["tiny"],
                                    [CHUNKS, "++resources.collect.gradient_stores=true"]))
    for bad, what in (("metric.gj_norm=l2", "gj_norm"), ("validation.enabled=true", "validation"),
                      ("resources.collect.shards=2", "shards")):
        for setting in (CHUNKS, NO_STORES):
            with pytest.raises(ValueError, match=what):
                qp.check_plan(qp.build_plan(ROOT / "conf", schema, ["tiny"], [setting, bad]))


class Wildcards(dict):
    """The wildcards a rule's input function gets (attributes and keys)."""

    def __init__(self, exp, model, pair, seed, chunk="0"):
        super().__init__(exp=exp, model=model, pair=pair, seed=seed, chunk=chunk)
        self.__dict__.update(self)
