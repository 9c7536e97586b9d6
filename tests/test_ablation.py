"""Ablations, sweeps, the ablation summary, `snakemake figures` and the HTML report.

No-run checks: every conf/experiment file composes and validates; metric-only ablations
share the default's gradient stores and data ablations do not; a sweep plans the ablation
summary. Then ONE ablation of the tiny run (``tiny_fisher_source_a``, metric only) in a copy
of the session's tiny run (tests/conftest.py ``tiny_run``; the original stays as
tests/test_workflow.py expects it): it must run no gradient job and leave every file of the
tiny experiment byte- and mtime-identical; the sweep ``[tiny, tiny_fisher_source_a]``
builds the ablation summary from the two; `--report` builds the HTML report of both.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_workflow
from conftest import job_counts

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
ABLATION = "tiny_fisher_source_a"
SWEEP = ["tiny", ABLATION]
GRADIENT_RULES = ("prepare_model", "prepare_data", "collect")
# ablations the issue asks for: name -> the setting it changes (None: the default's value)
METRIC_ONLY = {"fisher_source_a": "a", "fisher_source_b": "b", "fisher_source_pooled": None,
               "variant_signed": "signed", "variant_symmetric": "symmetric",
               "variant_qkov": None, "gj_norm_l2": "l2", "aggregate_mean": "mean",
               "ridge_lambda_rel_0.01": 0.01, "ridge_lambda_rel_0.0001": 0.0001,
               "ridge_lambda_0": 0.0, "ridge_lambda_0.00000001": None}
NEW_STORES = ("samples_32", "samples_96", "max_length_64", "max_length_256",
              "store_dtype_float32", "store_dtype_float16", "model_pythia_160m",
              "model_qwen2_0_5b")
SAME_STORES = ("store_dtype_bfloat16",)       # the default's value of a store setting
# The ablation's jobs leave their MLflow runs to the final `track` rule (deferred mode, as on
# SLURM): each job then skips importing MLflow, 3-5 s of CPU. The tiny run and the two-seed
# sweep (tests/test_evidence.py) test direct logging.
DEFERRED = "tracking.mode=deferred"




def _ok(res):
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    return res


# ----------------------------------------------------------------------------- no run

def test_every_experiment_file_composes_and_validates():
    from qkov_pipeline import config as qc

    names = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    assert set(METRIC_ONLY) | set(NEW_STORES) | set(SAME_STORES) <= set(names)
    for name in names:
        cfg = qc.compose(CONF, name)
        qc.validate(cfg, SCHEMA)
        assert cfg["experiment"] == name


def test_metric_only_ablations_reuse_the_default_stores():
    """Stores are keyed by what determines them: a metric ablation finds the default's keys,
    a data, dtype or model ablation gets its own."""
    from qkov_pipeline import config as qc
    from qkov_pipeline import plan as qp

    default = qc.compose(CONF, None)

    def stores(cfg):
        return sorted(qp.Plan.store_key(cfg, t, s) for s in cfg["data"]["split_seeds"]
                      for t in qp.pair_tasks(cfg))

    for name, value in METRIC_ONLY.items():
        cfg = qc.compose(CONF, name)
        assert stores(cfg) == stores(default), name
        diff = qp.canonical(cfg["metric"]) != qp.canonical(default["metric"])
        assert diff == (value is not None), name
    for name in NEW_STORES:
        assert set(stores(qc.compose(CONF, name))).isdisjoint(stores(default)), name
    for name in SAME_STORES:
        assert stores(qc.compose(CONF, name)) == stores(default), name


def test_sweep_plan_and_ablated_settings():
    from qkov_pipeline import plan as qc
    from qkov_pipeline import plan as qf

    plan = qc.build_plan(CONF, SCHEMA, ["fisher_source_pooled", "fisher_source_a",
                                        "variant_signed"])
    sweep = qf.sweep_plan(plan)
    assert sweep["name"] == "fisher_source_pooled+fisher_source_a+variant_signed"
    assert sweep["dir"] == f"results/_ablations/{sweep['name']}"
    assert sweep["pairs"] == ["math__code", "math__code.control"]
    s = json.loads(sweep["slice"])
    assert s["baseline"] == "fisher_source_pooled" and s["flip"] == ["variant_signed"]
    assert s["ablated"] == {
        "fisher_source_pooled": {"metric.fisher_source": "pooled", "metric.variant": "qkov"},
        "fisher_source_a": {"metric.fisher_source": "a", "metric.variant": "qkov"},
        "variant_signed": {"metric.fisher_source": "pooled", "metric.variant": "signed"}}
    assert qf.sweep_plan(qc.build_plan(CONF, SCHEMA, ["fisher_source_a"])) is None
    long = qf.sweep_name([f"experiment_{k}" for k in range(20)])
    assert len(long) <= 100 and long.startswith("experiment_0+experiment_1+")


def test_ablation_summary_across_models_marks_other_grids_na(tmp_path):
    """A model ablation compares maps of other shapes: correlation n/a, counts still drawn."""
    from interference.figures import rank_correlations, write_ablation_summary

    rng = np.random.default_rng(0)
    maps = {"a": {b: rng.normal(size=(2, 4)) for b in "QKVO"},
            "b": {b: rng.normal(size=(2, 4)) for b in "QKVO"},
            "big": {b: rng.normal(size=(3, 6)) for b in "QKVO"}}
    kv = {"a": [0, 0, 1, 1], "b": [0, 0, 1, 1], "big": [0, 0, 0, 1, 1, 1]}
    rho = rank_correlations(maps, kv_head_of=kv)
    assert np.isnan(rho.loc["a", "big"]) and np.isnan(rho.loc["big", "b"])
    assert rho.loc["big", "big"] == pytest.approx(1.0) and np.isfinite(rho.loc["a", "b"])

    def cells(n_sig):
        df = pd.DataFrame({"block": ["Q"] * 4, "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                           "kv_group": "", "statistic": 0.0, "p_value": 0.5, "q_value": 0.5,
                           "effect_size": 0.0,
                           "significant": [k < n_sig for k in range(4)]})
        df["q_significant"] = df["significant"]
        return df

    entries = write_ablation_summary(maps, {"a": cells(1), "b": cells(2), "big": cells(0)},
                                     tmp_path, kv_head_of=kv)
    assert (tmp_path / "ablation_summary.png").is_file()
    counts = pd.read_csv(tmp_path / "ablation_summary_counts.csv").set_index("variant")
    assert counts["significant"].to_dict() == {"a": 1, "b": 2, "big": 0}
    assert entries and all(e["caption"] for e in entries)


def test_dry_run_of_a_sweep_plans_the_ablation_summary(tmp_path):
    res = _ok(run_workflow(tmp_path, "-n", "--config",
                           "experiment=[fisher_source_a,fisher_source_b]", timeout=120))
    counts = job_counts(res.stdout)
    # both variants score the default's two stores: collected once
    assert counts["collect"] == 2 and counts["chunk_scores"] == 2 and counts["scores"] == 4, counts
    assert counts["draw_ablation_summary"] == 1, counts
    assert "results/_ablations/fisher_source_a+fisher_source_b/math__code/ablation_summary.png" \
        in res.stdout
    res = run_workflow(tmp_path, "-n", "ablation_summary", "--config", "experiment=tiny",
                       timeout=120)
    assert res.returncode != 0
    assert "two or more experiments" in res.stdout + res.stderr


# ----------------------------------------------------------------------------- tiny run

def _snapshot(results: Path) -> dict[str, tuple[int, str]]:
    """path -> (mtime_ns, sha256) of every file (the MLflow database and the run file
    ``.qkov/run.json`` aside: every workflow run on the folder rewrites them)."""
    out = {}
    for p in sorted(results.rglob("*")):
        if p.is_file() and not p.name.startswith("mlflow.db") and p.name != ".mlflow.lock" \
                and p.relative_to(results).parts[0] != ".qkov":
            out[str(p.relative_to(results))] = (p.stat().st_mtime_ns,
                                                hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def ablation(tiny_run, tmp_path_factory):
    """The tiny run copied, then: the ablation, the sweep's summary, the report, and a dry
    run of `snakemake figures` with the gradient stores moved away."""
    work = tmp_path_factory.mktemp("qkov-ablation")
    shutil.copytree(tiny_run["work"], work, symlinks=True, dirs_exist_ok=True)
    results = work / "results"
    before = _snapshot(results)
    out = {"work": work, "results": results, "before": before, "times": {}}
    t0 = time.time()
    out["run"] = _ok(run_workflow(work, "--cores", "2", "--config", f"experiment={ABLATION}",
                                  f"overrides=[{DEFERRED}]", timeout=600))
    out["after_ablation"] = _snapshot(results)
    t1 = time.time()
    out["sweep"] = _ok(run_workflow(work, "--cores", "2", "ablation_summary", "--config",
                                    f"experiment=[{','.join(SWEEP)}]", f"overrides=[{DEFERRED}]",
                                    timeout=300))
    out["after_sweep"] = _snapshot(results)
    t2 = time.time()
    out["report"] = _ok(run_workflow(work, "--report", str(work / "report.html"), "--config",
                                     f"experiment=[{','.join(SWEEP)}]", timeout=300))
    t3 = time.time()
    out["times"] = {"ablation": t1 - t0, "sweep": t2 - t1, "report": t3 - t2}
    print("ablation test timings (s):", {k: round(v, 1) for k, v in out["times"].items()})
    return out


def _unchanged(before: dict, after: dict) -> list[str]:
    return [p for p, v in before.items() if after.get(p) != v]


@pytest.mark.slow
def test_ablation_reuses_stores_and_leaves_the_tiny_experiment_alone(ablation):
    counts = job_counts(ablation["run"].stdout + ablation["run"].stderr)
    for rule in GRADIENT_RULES:
        assert rule not in counts, counts   # no gradient job: the stores are reused
    assert counts.get("scores") == 2 and counts.get("track") == 1, counts
    changed = _unchanged(ablation["before"], ablation["after_ablation"])
    assert not changed, f"the ablation touched files of the tiny run: {changed[:10]}"
    r = ablation["results"]
    pair = r / ABLATION / "tiny" / "math__code"
    for f in ("cells.csv", "split0/stats.json", "figures/figures.json", "figures/heatmap_Q.png",
              "figures/forensics.png"):
        assert (pair / f).is_file(), f
    assert (r / ABLATION / "summary.md").is_file() and (r / ABLATION / "tracking.json").is_file()
    n_sig = int(pd.read_csv(pair / "cells.csv")["significant"].sum())
    captions = {e["path"]: e["caption"]
                for e in json.loads((pair / "figures" / "figures.json").read_text())}
    assert f"{n_sig} cells significant" in captions["pvalue_histogram.png"]
    resolved = (pair / "split0" / "config.scores.yaml").read_text()
    assert "fisher_source: a" in resolved
    # the setting took effect: other maps than tiny's
    a = json.loads((pair / "split0" / "stats.json").read_text())["layer_head_avg"]["Q"]
    t = json.loads((r / "tiny" / "tiny" / "math__code" / "split0" / "stats.json")
                   .read_text())["layer_head_avg"]["Q"]
    assert not np.allclose(a["estimate"], t["estimate"])


@pytest.mark.slow
def test_ablation_has_its_own_mlflow_experiment(ablation):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ablation['results'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"qkov/{ABLATION}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("qkov.kind") == "workflow"]
    children = [r for r in runs if r.data.tags.get("qkov.kind") == "job"]
    assert parents and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} <= {
        r.info.run_id for r in parents}
    rules = sorted(r.data.tags["qkov.rule"] for r in children)
    assert rules == sorted(["scores", "scores", "stats", "stats", "tables", "tables",
                            "draw_figures", "draw_figures", "summary"])


@pytest.mark.slow
def test_sweep_builds_the_ablation_summary(ablation):
    counts = job_counts(ablation["sweep"].stdout + ablation["sweep"].stderr)
    assert counts == {"draw_ablation_summary": 1, "ablation_summary": 1, "total": 2}, counts
    changed = _unchanged(ablation["after_ablation"], ablation["after_sweep"])
    assert not changed, changed[:10]
    d = ablation["results"] / "_ablations" / "+".join(SWEEP)
    doc = json.loads((d / "ablation.json").read_text())
    assert doc["variants"] == SWEEP and doc["baseline"] == "tiny"
    assert doc["ablated"] == {"tiny": {"metric.fisher_source": "pooled"},
                              ABLATION: {"metric.fisher_source": "a"}}
    assert set(doc["analyses"]) == {"math__code", "math__code.control"}
    for pair, a in doc["analyses"].items():
        for f in ("ablation_summary.png", "ablation_summary.pdf",
                  "ablation_summary_correlations.csv", "ablation_summary_counts.csv"):
            assert (d / pair / f).is_file(), (pair, f)
        counts = pd.read_csv(d / pair / "ablation_summary_counts.csv").set_index("variant")
        for v in SWEEP:   # the counts are those of each variant's cells.csv
            cells = pd.read_csv(ablation["results"] / v / "tiny" / pair / "cells.csv")
            assert counts.loc[v, "significant"] == int(cells["significant"].sum()), (pair, v)
            assert a["variants"][v]["n_significant"] == int(cells["significant"].sum())
        corr = pd.read_csv(d / pair / "ablation_summary_correlations.csv")
        pooled = corr[(corr.block == "pooled") & (corr.variant_a == "tiny")
                      & (corr.variant_b == ABLATION)]["spearman"].item()
        assert -1 <= pooled <= 1 and pooled == pytest.approx(
            a["variants"][ABLATION]["spearman_vs_baseline"])
        assert a["variants"]["tiny"]["spearman_vs_baseline"] == pytest.approx(1.0)
    md = (d / "ablation.md").read_text()
    assert "metric.fisher_source" in md and "| tiny_fisher_source_a | tiny |" in md


@pytest.mark.slow
def test_sweep_groups_its_variants_in_mlflow(ablation):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ablation['results'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("qkov/ablations")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    sweeps = [r for r in runs if r.data.tags.get("qkov.kind") == "ablation_sweep"]
    variants = [r for r in runs if r.data.tags.get("qkov.kind") == "ablation_variant"]
    assert len(sweeps) == 1 and sweeps[0].data.tags["qkov.sweep"] == "+".join(SWEEP)
    assert sorted(r.info.run_name for r in variants) == sorted(SWEEP)
    for r in variants:
        assert r.data.tags["mlflow.parentRunId"] == sweeps[0].info.run_id
        assert r.data.params["ablation.metric.fisher_source"] == (
            "a" if r.info.run_name == ABLATION else "pooled")
        assert "math__code.n_significant" in r.data.metrics
        assert "math__code.spearman_vs_baseline" in r.data.metrics
        # linked to the parent run that holds the variant's job runs
        tracked = json.loads((ablation["results"] / r.info.run_name / "tracking.json")
                             .read_text())["parent_run_id"]
        assert r.data.tags["qkov.experiment_run_id"] == tracked
    arts = [a.path for a in client.list_artifacts(sweeps[0].info.run_id, "math__code")]
    assert "math__code/ablation_summary.png" in arts


@pytest.mark.slow
def test_report_is_self_contained_and_captioned(ablation):
    html = (ablation["work"] / "report.html").read_text()
    assert len(html) > 100_000
    # offline: nothing is loaded from elsewhere
    assert not re.search(r"<script[^>]+src=[\"']https?:", html)
    assert not re.search(r"<link[^>]+href=[\"']https?:", html)
    assert not re.search(r"@import\s+url\([\"']?https?:", html)
    captions = re.findall(r'"caption": "(.*?)", "mime_type"', html)
    # per experiment: 2 analyses x (10 figures and tables + the cell explorer + cells.csv) + the
    # run summary;
    # the sweep: 2 ablation summaries + its table
    assert len(captions) == 2 * (2 * 12 + 1) + 3, len(captions)
    assert all(c.strip() for c in captions), "a report item without caption"
    for phrase in ("Q heatmap.", "K heatmap.", "V heatmap.", "O heatmap.", "Q, K, V, O panel.",
                   "Block comparison.", "Top conflicting cells.", "Sample-pair forensics.",
                   "p-value histogram.", "Run summary", "Ablation summary", "Ablation table",
                   "Cells table of analysis", "Cell explorer"):
        assert phrase in html, phrase
    for name in ("heatmap_K.png", "forensics.png", "ablation_summary.png", "summary.md"):
        assert name in html, name


@pytest.mark.slow
def test_figures_target_redraws_without_gradients(ablation):
    """`snakemake figures --forcerun draw_figures` redraws every figure from the saved
    results even with the gradient stores gone (dry run)."""
    stores = ablation["results"] / "_stores"
    moved = ablation["work"] / "_stores_moved"
    stores.rename(moved)
    try:
        res = _ok(run_workflow(ablation["work"], "-n", "figures", "--forcerun", "draw_figures",
                               "--config", f"experiment=[{','.join(SWEEP)}]", timeout=120))
    finally:
        moved.rename(stores)
    counts = job_counts(res.stdout)
    assert counts.get("draw_figures") == 4 and counts.get("figures") == 1, counts
    for rule in GRADIENT_RULES + ("scores", "stats"):
        assert rule not in counts, counts
