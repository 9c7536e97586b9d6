"""The Snakemake workflow: lint, dry runs, and ONE full run of the tiny experiment.

The full run (session fixture ``tiny_run``) happens once in a temporary working directory
and is shared by read-only checks: every output, the cells table, the MLflow store (parent
and child runs), that a rerun does nothing and that a metric change reruns only the jobs
downstream of the scores (dry runs against the same directory).
"""
from __future__ import annotations

import json
import os
import time

import pandas as pd
import pytest
from conftest import job_counts, run_workflow

STAGE_RULES = ("prepare_model", "prepare_data", "collect", "chunk_scores", "scores", "stats", "tables",
               "draw_figures", "summary", "track")
REQUIRED_COLUMNS = ("block", "layer", "head", "statistic", "p_value", "q_value", "effect_size",
                    "ci_low", "ci_high", "significant", "schema_version", "config_hash")




# ----------------------------------------------------------------------------- no run

def test_lint_is_clean(tmp_path):
    res = run_workflow(tmp_path, "--lint", "--config", "experiment=tiny", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Lints for" not in res.stdout + res.stderr, res.stdout + res.stderr


def test_dry_run_plans_every_stage(tmp_path):
    res = run_workflow(tmp_path, "-n", "--config", "experiment=tiny", timeout=120)
    assert res.returncode == 0, res.stderr
    counts = job_counts(res.stdout)
    # one model, two tasks (math, code), one pair plus its negative control
    # (one chunk_scores job scores both arms from the stores; scores writes each arm)
    assert counts == {"prepare_model": 1, "prepare_data": 2,
                      "collect": 2, "chunk_scores": 1, "scores": 2, "stats": 2, "tables": 2,
                      "draw_figures": 2, "summary": 1, "track": 1, "all": 1,
                      "total": 17}, res.stdout


def test_dry_run_default_experiment(tmp_path):
    """The embedded default: SmolLM2, math vs code, its control; nothing runs."""
    res = run_workflow(tmp_path, "-n", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "results/default/smollm2/math__code/cells.csv" in res.stdout
    assert "results/default/smollm2/math__code.control/cells.csv" in res.stdout
    assert job_counts(res.stdout)["collect"] == 2


def test_bad_config_fails_with_a_clear_message(tmp_path):
    res = run_workflow(tmp_path, "-n", "--config", "experiment=tiny",
                    "overrides=[metric.variant=nonsense]", timeout=120)
    assert res.returncode != 0
    assert "metric.variant" in res.stdout + res.stderr
    res = run_workflow(tmp_path, "-n", "--config", "experiment=no_such_experiment", timeout=120)
    assert res.returncode != 0
    assert "unknown experiment 'no_such_experiment'" in res.stdout + res.stderr


# ----------------------------------------------------------------------------- tiny run

# The session fixture ``tiny_run`` (one full run of the tiny experiment, shared with
# tests/test_ablation.py) is in tests/conftest.py.


@pytest.mark.slow
def test_tiny_run_writes_every_output(tiny_run):
    r = tiny_run["results"]
    models = list((r / "_models").glob("tiny-*"))
    assert len(models) == 1
    for f in ("model.json", "hf/model.safetensors", "hf/config.json", "hf/tokenizer.json",
              "config.prepare_model.yaml", "mlflow.prepare_model.json"):
        assert (models[0] / f).is_file(), f
    data = sorted(p.name.split("-")[0] for p in (r / "_data").iterdir())
    assert data == ["code", "math"]
    # each data job built the model's tokenizer itself: the one model.json records
    digest = json.loads((models[0] / "model.json").read_text())["tokenizer_digest"]
    assert digest
    for d in (r / "_data").iterdir():
        for f in ("manifest.json", "tensors.safetensors", "config.prepare_data.yaml"):
            assert (d / f).is_file()
        assert json.loads((d / "manifest.json").read_text())["meta"]["tokenizer_digest"] == digest
    stores = {p.name.split("-")[0]: p for p in (r / "_stores").iterdir()}
    assert sorted(stores) == ["code", "math"]
    assert sorted(p.name for p in (stores["math"] / "grads").glob("*.bin")) == [
        "math__control.bin", "math__reference.bin", "math__scored.bin"]
    assert (stores["math"] / "grads" / "fisher.safetensors").is_file()
    info = json.loads((stores["math"] / "store.json").read_text())
    assert {k: v["n"] for k, v in info["roles"].items()} == {
        "fisher": 16, "scored": 12, "reference": 12, "control": 12}
    for analysis in (tiny_run["pair"], tiny_run["control"]):
        for f in ("cells.csv", "stability.json", "config.tables.yaml", "split0/heatmap.json",
                  "split0/scores.npz", "split0/cells.csv", "split0/stats.json",
                  "split0/config.scores.yaml", "split0/config.stats.yaml",
                  "split0/null_top.npz", "figures/null_top.png",
                  "figures/figures.json", "figures/heatmap_Q.png", "figures/heatmap_Q.pdf",
                  "figures/block_comparison.png", "figures/heatmap_panel.png",
                  "figures/top_conflicts.csv"):
            assert (analysis / f).is_file(), analysis / f
        for entry in json.loads((analysis / "figures" / "figures.json").read_text()):
            assert (analysis / "figures" / entry["path"]).is_file(), entry
    for f in ("summary.json", "summary.md", "tracking.json", "config.summary.yaml"):
        assert (r / "tiny" / f).is_file(), f
    # a log and a benchmark per job
    for rule in STAGE_RULES:
        logs = list((r / "logs" / ("figures" if rule == "draw_figures" else rule)).rglob("*.log"))
        assert logs, rule
        assert all(p.stat().st_size > 0 for p in logs), rule
    assert len(list((r / "benchmarks").rglob("*.tsv"))) == 16


@pytest.mark.slow
def test_cells_table(tiny_run):
    from interference.results import SCHEMA_VERSION

    for analysis in (tiny_run["pair"], tiny_run["control"]):
        cells = pd.read_csv(analysis / "cells.csv", dtype={"kv_group": str})
        missing = [c for c in REQUIRED_COLUMNS if c not in cells.columns]
        assert not missing, missing
        # tiny LLaMA-GQA: 2 layers x (4 Q + 2 K + 2 V + 4 O) distinct cells
        assert len(cells) == 24
        assert cells.groupby("block").size().to_dict() == {"K": 4, "O": 8, "Q": 8, "V": 4}
        assert not cells.duplicated(["block", "layer", "head"]).any()
        assert (cells["schema_version"].astype(str) == SCHEMA_VERSION).all()
        assert cells["p_value"].between(0, 1).all() and cells["q_value"].between(0, 1).all()
        assert (cells["q_value"] >= cells["p_value"] - 1e-12).all()
        stats = json.loads((analysis / "split0" / "stats.json").read_text())["summary"]
        expected = (cells["q_value"] <= stats["fdr_alpha"]) & (
            cells["effect_size"] >= stats["min_effect_size"])
        assert (cells["significant"].astype(bool) == expected).all()
        assert (cells["ci_low"] <= cells["ci_high"]).all()
        import yaml

        resolved = yaml.safe_load((analysis / "split0" / "config.stats.yaml").read_text())
        assert (cells["config_hash"] == resolved["config_hash"]).all()
        assert resolved["config"]["stats"]["n_bootstrap"] == 200   # the tiny preset's value
    summary = json.loads((tiny_run["results"] / "tiny" / "summary.json").read_text())
    assert set(summary["analyses"]) == {"math__code", "math__code.control"}


@pytest.mark.slow
def test_mlflow_parent_and_child_runs(tiny_run):
    from mlflow.tracking import MlflowClient

    db = tiny_run["results"] / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("qkov/tiny")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("qkov.kind") == "workflow"]
    children = [r for r in runs if r.data.tags.get("qkov.kind") == "job"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert any(k.endswith("n_significant") for k in parent.data.metrics)
    rules = sorted(r.data.tags["qkov.rule"] for r in children)
    assert rules == sorted(["prepare_model", "prepare_data", "prepare_data", "collect",
                            "collect", "scores", "scores", "stats", "stats", "tables",
                            "tables", "draw_figures", "draw_figures", "summary"])
    for run in children:
        assert run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.params, run.data.tags["qkov.rule"]
        assert "time.total_s" in run.data.metrics
        for tag in ("qkov.git_commit", "qkov.version.torch", "qkov.wildcards",
                    "qkov.config_hash"):
            assert tag in run.data.tags, tag
    stats_runs = [r for r in children if r.data.tags["qkov.rule"] == "stats"]
    assert all("stats.n_significant" in r.data.metrics for r in stats_runs)
    assert any(p.startswith("stats.") for p in stats_runs[0].data.params)
    fig = next(r for r in children if r.data.tags["qkov.rule"] == "draw_figures")
    names = [a.path for a in client.list_artifacts(fig.info.run_id, "figures")]
    assert any(n.endswith("heatmap_Q.png") for n in names), names
    records = list(tiny_run["results"].rglob("mlflow.*.json"))
    assert len(records) == 14
    assert all(json.loads(p.read_text())["status"] == "logged" for p in records)


@pytest.mark.slow
def test_rerun_does_nothing(tiny_run):
    res = run_workflow(tiny_run["work"], "-n", "--config", "experiment=tiny", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Nothing to be done" in res.stdout + res.stderr, res.stdout


@pytest.mark.slow
def test_a_local_checkpoint_runs_as_the_model_it_holds(tiny_run, tmp_path):
    """``model.source: local`` through the workflow, with the tiny run's prepared model
    folder as a user's checkpoint: prepare_model links its weights (no copy), the collect
    jobs read them, and both arms' cells.csv equal the tiny run's to the last bit (but for
    the hash of the config, which names another model source)."""
    checkpoint = next((tiny_run["results"] / "_models").glob("*/hf"))
    work = tmp_path / "local"
    targets = [f"results/tiny/tiny/math__code{arm}/split0/cells.csv" for arm in ("", ".control")]
    res = run_workflow(work, "--cores", "2", "--config", "experiment=tiny",
                       f"overrides=[model.source=local,model.path={checkpoint},"
                       "++tracking.mode=off]", "--", *targets, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    counts = job_counts(res.stdout + res.stderr)
    assert counts.get("prepare_model") == 1 and counts.get("collect") == 2, counts
    prepared = next((work / "results" / "_models").glob("*/model.json"))
    info = json.loads(prepared.read_text())
    assert info["checkpoint"]["files"]["model.safetensors"]["how"] == "linked"
    assert os.path.samefile(prepared.parent / "hf" / "model.safetensors",
                            checkpoint / "model.safetensors")
    for target in targets:       # every column but the config's hash, to the last bit
        got, want = pd.read_csv(work / target), pd.read_csv(tiny_run["work"] / target)
        assert got.config_hash.nunique() == 1 and (got.config_hash != want.config_hash).all()
        pd.testing.assert_frame_equal(got.drop(columns="config_hash"),
                                      want.drop(columns="config_hash"), check_exact=True)


@pytest.mark.slow
def test_metric_change_reruns_only_downstream_jobs(tiny_run):
    res = run_workflow(tiny_run["work"], "-n", "--config", "experiment=tiny",
                    "overrides=[metric.ridge_lambda_rel=0.01]", timeout=120)
    assert res.returncode == 0, res.stderr
    counts = job_counts(res.stdout)
    assert counts.get("chunk_scores") == 1 and counts.get("scores") == 2, counts
    assert counts.get("stats") == 2 and counts.get("draw_figures") == 2 and counts.get("summary") == 1, counts
    for rule in ("prepare_model", "prepare_data", "collect"):
        assert rule not in counts, counts


@pytest.mark.slow
def test_metric_only_ablation_reuses_the_gradient_stores(tiny_run):
    res = run_workflow(tiny_run["work"], "-n", "--config", "experiment=tiny_fisher_source_a",
                    timeout=120)
    assert res.returncode == 0, res.stderr
    counts = job_counts(res.stdout)
    assert counts.get("chunk_scores") == 1 and counts.get("scores") == 2, counts
    for rule in ("prepare_model", "prepare_data", "collect"):
        assert rule not in counts, counts
    assert "results/tiny_fisher_source_a/tiny/math__code/cells.csv" in res.stdout


# ----------------------------------------------------------------------------- tracking

def _settings(mode: str, uri: str, artifacts: str | None = None):
    """Tracking settings of a test workflow run with no parent runs yet."""
    from qkov_pipeline import tracking

    return tracking.TrackingSettings(mode=mode, uri=uri, artifacts=artifacts, timeout_s=5,
                                     prefix="qkov", workflow_run_id="test-workflow-run")


@pytest.mark.slow
def test_deferred_mode_logs_each_record_once(tiny_run, tmp_path, monkeypatch):
    """Deferred mode (clusters): the track rule logs the records the jobs left as JSON,
    under one parent run, and logging twice creates nothing new."""
    from mlflow.tracking import MlflowClient

    from qkov_pipeline import tracking

    paths = []
    for k, p in enumerate(sorted(tiny_run["results"].rglob("mlflow.*.json"))):
        rec = json.loads(p.read_text())
        rec.update(status="pending", mlflow=None)
        q = tmp_path / "records" / f"{k}.json"
        q.parent.mkdir(exist_ok=True)
        q.write_text(json.dumps(rec))
        paths.append(str(q))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = _settings("deferred", uri, (tmp_path / "artifacts").as_uri())
    first = tracking.sync(s, paths, "tiny", {"math__code.split0.n_significant": 3}, [],
                          tmp_path / "t1.json", config={"metric": {"variant": "qkov"}})
    second = tracking.sync(s, paths, "tiny", {}, [], tmp_path / "t2.json")
    assert first["parent_run_id"] == second["parent_run_id"]
    ids = {p: r["run_id"] for p, r in first["records"].items()}
    assert {p: r["run_id"] for p, r in second["records"].items()} == ids
    assert all(r["status"] == "logged_by_track" for r in first["records"].values())
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("qkov/tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("qkov.kind") == "job"]
    assert len(children) == len(paths) == 14
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {first["parent_run_id"]}
    parent = client.get_run(first["parent_run_id"])
    assert parent.data.params["metric.variant"] == "qkov"
    assert parent.data.metrics["math__code.split0.n_significant"] == 3


def test_unreachable_mlflow_never_fails_a_job(monkeypatch, tmp_path):
    """Direct mode with a tracking server that does not answer: the record stays pending
    (the track rule logs it later) and nothing raises."""
    from qkov_pipeline import hooks, tracking

    s = _settings("direct", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    rec = tracking.new_record(s, experiment="tiny", rule="stats", run_name="stats x",
                              params={"stats": {"fdr_alpha": 0.05}}, tags={},
                              wildcards={"pair": "math__code"})
    t0 = time.time()
    out = tracking.log_with_timeout(s, rec, timeout_s=5)
    assert time.time() - t0 < 15
    assert out["status"] == "pending" and out["mlflow_error"]

    class _Plan:
        experiments = {"tiny": {"resources": {}}}
        results = str(tmp_path)

        def job_meta(self):
            return {"owners": {}, "exec": {}}

    final = hooks.on_start(_Plan(), s)   # warns, does not raise
    assert final.parents == {} and final.workflow_run_id == s.workflow_run_id
    assert tracking.read_run_file(hooks.run_file(_Plan()))[0] == final


@pytest.mark.slow
def test_score_arms_benchmark_runs_on_the_tiny_stores(tiny_run, capsys):
    """benchmarks/bench_score_arms.py on the tiny run's stores: both ways agree bitwise and
    every timing is reported (the benchmark refuses to report when they differ)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_score_arms.py"
    spec = importlib.util.spec_from_file_location("bench_score_arms", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stores = sorted(str(p) for p in (tiny_run["results"] / "_stores").glob("*/grads"))
    assert len(stores) == 2, stores
    row = bench.main(["--stores", *stores, "--task-a", "math", "--task-b", "code",
                      "--threads", "1"])
    assert row["bitwise_equal"] and row["n_control"] > 0 and row["n_reference"] > 0
    assert all(row[k] > 0 for k in ("rows_floor_s", "one_pass_s", "arm_by_arm_s"))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
