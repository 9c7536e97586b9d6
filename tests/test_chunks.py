"""Chunk jobs without gradient stores, through the workflow: the tiny experiment with
resources.collect.layer_chunks=2 (two chunk_scores jobs, one layer each) or with
gradient_stores=false (one chunk_scores job collecting and scoring both layers) writes
cells.csv files byte-identical to the stores' run (the session's tiny_run)."""
from __future__ import annotations

import shutil

import pytest

from conftest import ROOT, job_counts, run_workflow

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
    stores = qp.build_plan(ROOT / "conf", schema, ["tiny"], [])
    assert "grads" in stores.chunk_inputs(Wildcards("tiny", "tiny", "math__code", "0"))
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
