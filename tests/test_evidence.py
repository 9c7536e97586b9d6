"""Evidence a reviewer can check (issue 10): the negative control beside every pair,
replication over split seeds with a stability report, lengths and scales in the summary,
packed and length-matched data, shared gradient stores, a versioned results schema.

One extra workflow run is shared by the workflow checks here and in test_reliability.py
(``sweep_run``): the tiny preset with two split seeds AND its metric-only ablation
(``tiny_fisher_source_a``), 4 jobs at a time on a fresh MLflow store. The data checks run
on the tokenizers alone (seconds).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import job_counts, run_workflow

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
BLOCKS = ("Q", "K", "V", "O")
SWEEP = ["tiny", "tiny_fisher_source_a"]
SWEEP_OVERRIDES = ["data.split_seeds=[0,1]"]


# ----------------------------------------------------------------------------- runs



_RUNS: dict[str, dict] = {}


def shared_run(key: str, make):
    """One run per test session, whichever module asks first (a fixture imported into two
    modules would otherwise run twice)."""
    if key not in _RUNS:
        _RUNS[key] = make()
    return _RUNS[key]


@pytest.fixture(scope="session")
def sweep_run(tmp_path_factory):
    def make():
        from qkov_pipeline.plan import build_plan

        work = tmp_path_factory.mktemp("qkov-sweep")
        t0 = time.time()
        res = run_workflow(work, "--cores", "4", "--config", f"experiment=[{','.join(SWEEP)}]",
                            "overrides=[" + ",".join(f'"{o}"' for o in SWEEP_OVERRIDES) + "]",
                            timeout=900)
        elapsed = time.time() - t0
        if res.returncode != 0:
            pytest.fail(f"the two-seed sweep failed after {elapsed:.0f} s:\n"
                        f"{res.stdout[-6000:]}\n{res.stderr[-6000:]}")
        counts = job_counts(res.stdout + res.stderr)
        return {"work": work, "results": work / "results", "elapsed": elapsed,
                "stdout": res.stdout + res.stderr, "counts": counts, "n_jobs": counts["total"],
                "plan": build_plan(CONF, SCHEMA, SWEEP, SWEEP_OVERRIDES),
                "pair": work / "results" / "tiny" / "tiny" / "math__code",
                "control": work / "results" / "tiny" / "tiny" / "math__code.control"}
    return shared_run("sweep", make)


@pytest.fixture(scope="session")
def tiny_reference(request, tmp_path_factory):
    """The uninterrupted tiny run: test_workflow's shared ``tiny_run`` when a conftest
    provides it, else one run of our own (shared by this session)."""
    try:
        return request.getfixturevalue("tiny_run")
    except pytest.FixtureLookupError:
        pass

    def make():
        work = tmp_path_factory.mktemp("qkov-tiny-ref")
        res = run_workflow(work, "--cores", "2", "--config", "experiment=tiny", timeout=900)
        if res.returncode != 0:
            pytest.fail(f"tiny run failed:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}")
        return {"work": work, "results": work / "results"}
    return shared_run("tiny", make)


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def bpe():
    from interference.models import build_tokenizer

    return build_tokenizer("bpe", vocab_size=512)


def test_packed_math_samples_partition_the_problems_and_name_their_members(bpe):
    from interference.data import load_task, pack_records

    src = load_task("math", n=60, seed=0)
    packs = pack_records(src, bpe, 64, task="math")
    assert packs == pack_records(src, bpe, 64, task="math")           # deterministic
    assert pack_records(load_task("math", n=90, seed=0), bpe, 64, task="math")[:len(packs) - 1] \
        == packs[:-1]                                                # prefix-stable
    members = [m for p in packs for m in p["members"]]
    assert members == [r["id"] for r in src]                         # a partition, in order
    for p in packs:
        first, last = map(int, re.fullmatch(r"math:packed:(\d{6})-(\d{6})", p["id"]).groups())
        assert p["members"] == [r["id"] for r in src[first:last + 1]]
        assert p["prompt"] == "\n\n".join(r["prompt"] + r["answer"] for r in src[first:last + 1])
        n_tok = len(bpe(p["prompt"])["input_ids"])
        assert n_tok <= 64 or len(p["members"]) == 1
    assert np.mean([len(p["members"]) for p in packs]) > 1.1


def test_packed_roles_are_disjoint_by_member_problem(bpe):
    from interference.data import check_disjoint, prepare_task

    batches, records, meta = prepare_task(
        "math", bpe, n_fisher=10, n_scored=8, n_reference=8, seed=3, max_length=96,
        extra_roles={"control": 8}, task_kwargs={"n": 150}, pack=True)
    check_disjoint({r: [m for x in recs for m in x["members"]] for r, recs in records.items()})
    assert meta["packing"]["mean_members"] > 1.5 and meta["n_source_records"] == 150
    assert set(meta["content"]) == {x["id"] for recs in records.values() for x in recs}
    for role, b in batches.items():
        assert b["input_ids"].shape[1] <= 96
        assert (b["labels"][:, 1:] != -100).sum(1).min() > 0
    with pytest.raises(ValueError, match="set loss_tokens='all'"):
        prepare_task("math", bpe, n_fisher=2, n_scored=2, n_reference=2, max_length=64,
                     loss_tokens="answer", task_kwargs={"n": 40}, pack=True)


def test_tail_truncation_keeps_the_solution_and_matching_trims_its_start(bpe):
    from interference.data import IGNORE, load_task, match_lengths, tokenize_records

    code = load_task("code")[:12]
    head = tokenize_records(code, bpe, 64, keep="head")
    tail = tokenize_records(code, bpe, 64, keep="tail")
    assert tail.meta["keep"] == "tail" and tail.meta["n_truncated"] == head.meta["n_truncated"] > 0
    for i, rec in enumerate(code):
        full = bpe(rec["prompt"] + rec["answer"])["input_ids"]
        row = tail["input_ids"][i][tail["attention_mask"][i].bool()].tolist()
        assert row == full[-len(row):]                               # the end: the solution
        assert head["input_ids"][i][head["attention_mask"][i].bool()].tolist() == full[:len(row)]
    math = tokenize_records(load_task("math", n=12, seed=0), bpe, 64)
    out = match_lengths({"code": tail, "math": math})
    assert sorted(out["code"].meta["n_loss_tokens"]) == sorted(out["math"].meta["n_loss_tokens"])
    for i in range(len(code)):
        before = tail["input_ids"][i][tail["attention_mask"][i].bool()].tolist()
        after = out["code"]["input_ids"][i][out["code"]["attention_mask"][i].bool()].tolist()
        assert after == before[len(before) - len(after):]            # trimmed at the start
        lab = out["code"]["labels"][i]
        assert int((lab[1:] != IGNORE).sum()) == out["code"].meta["n_loss_tokens"][i]
        assert lab[0] == IGNORE


@pytest.mark.slow
def test_default_data_keeps_code_as_code_and_trims_it_only_modestly():
    """The SmolLM2 default (64 Fisher, 48 scored/reference/control, 128 tokens): math is
    packed (~3 problems a sample), HumanEval keeps its end, and after length matching about
    half of each code sample is the canonical solution, not the docstring. (Before: math
    problems of ~30 tokens cut HumanEval to its signature and docstring start.)"""
    from interference.data import load_task
    from interference.models import build_tokenizer
    from qkov_pipeline.config import compose
    from qkov_pipeline.plan import data_slice
    from qkov_pipeline.stages.data import prepare_group

    cfg = compose(CONF)
    assert cfg["tasks"]["math"]["pack"] and cfg["tasks"]["code"]["keep"] == "tail"
    tok = build_tokenizer("smollm2")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = prepare_group(data_slice(cfg, "code", 0), tok)
    math_meta = out["math"][2]
    assert math_meta["packing"]["mean_members"] > 2.5
    solutions = {r["id"]: r["answer"] for r in load_task("code")}
    shares, trims = [], []
    for role in ("fisher", "scored"):
        b = out["code"][0][role]
        before = b.meta["length_matching"]["before"]
        for i, sid in enumerate(b["sample_ids"]):
            row = b["input_ids"][i][b["attention_mask"][i].bool()].tolist()
            sol = tok(solutions[sid], add_special_tokens=False)["input_ids"]
            shares.append(min(len(sol), len(row)) / len(row))
            trims.append(1 - b.meta["n_loss_tokens"][i] / before[i])
    assert np.mean(shares) > 0.4, np.mean(shares)
    assert np.mean(trims) < 0.2, np.mean(trims)
    lengths = {t: sorted(out[t][0]["scored"].meta["n_loss_tokens"]) for t in ("math", "code")}
    assert lengths["math"] == lengths["code"] and np.mean(lengths["code"]) > 90


def test_defaults_are_pinned_in_conf():
    from qkov_pipeline.config import compose

    d = compose(CONF)
    assert d["model"]["name"] == "smollm2" and d["data"]["max_length"] == 128
    assert (d["data"]["n_fisher"], d["data"]["n_scored"], d["data"]["n_reference"]) == (64, 48, 48)
    assert d["data"]["split_seeds"] == [0] and d["control"]["enabled"]
    assert d["control"]["n_control"] == 48 and d["data"]["match_lengths"]
    p = compose(CONF, "paper")
    assert p["data"]["split_seeds"] == [0, 1, 2]
    assert (p["data"]["n_fisher"], p["data"]["n_scored"], p["data"]["n_reference"]) == (96, 64, 64)


# ----------------------------------------------------------------------------- workflow

@pytest.mark.slow
def test_control_runs_beside_every_pair_and_the_summary_counts_its_flags(sweep_run):
    for exp in SWEEP:
        base = sweep_run["results"] / exp / "tiny"
        for analysis in ("math__code", "math__code.control"):
            for f in ("cells.csv", "stability.json", "split0/cells.csv", "split1/cells.csv",
                      "figures/figures.json", "figures/heatmap_panel.png"):
                assert (base / analysis / f).is_file(), base / analysis / f
        summary = json.loads((sweep_run["results"] / exp / "summary.json").read_text())
        c = summary["control"]["math__code"]
        control = summary["analyses"]["math__code.control"]
        assert c["control_n_significant"] == sum(r["n_significant"]
                                                 for r in control["seeds"].values())
        assert c["n_seeds"] == 2 and c["n_cells"] == 24
        assert summary["metrics"]["math__code.control_n_significant"] == c["control_n_significant"]
        md = (sweep_run["results"] / exp / "summary.md").read_text()
        assert "## Negative control" in md and "| math__code | 2 |" in md
        assert any(figs.endswith("heatmap_panel.png") for figs in control["figures"])
        # the figure that shows the control's count beside the pair's, and its data
        assert (sweep_run["results"] / exp / "control_vs_pair.png").is_file()
        bars = pd.read_csv(sweep_run["results"] / exp / "control_vs_pair.csv")
        assert bars.loc[bars["arm"] == "control", "n_significant"].sum() == c["control_n_significant"]
        assert bars.loc[bars["arm"] == "pair", "n_significant"].sum() == c["pair_n_significant"]
        assert "control_vs_pair.png" in md
    # the control's own cells table: B replaced by A' (task_b is A), same cells
    cells = pd.read_csv(sweep_run["control"] / "cells.csv", dtype={"kv_group": str})
    assert set(cells["arm"]) == {"control"} and set(cells["task_b"]) == {"math"}
    heat = json.loads((sweep_run["control"] / "split0" / "heatmap.json").read_text())
    assert all(i.startswith("math:") for i in heat["meta"]["sample_ids_b"])
    assert not set(heat["meta"]["sample_ids_b"]) & set(heat["meta"]["sample_ids_a"])


@pytest.mark.slow
def test_two_seed_run_has_stability_columns_report_and_figure(sweep_run):
    pair = sweep_run["pair"]
    cells = pd.read_csv(pair / "cells.csv", dtype={"kv_group": str})
    per_seed = {s: pd.read_csv(pair / f"split{s}" / "cells.csv", dtype={"kv_group": str})
                .set_index("name") for s in (0, 1)}
    assert (cells["n_split_seeds"] == 2).all()
    expect = sum(per_seed[s].loc[cells["name"], "significant"].astype(bool).to_numpy().astype(int)
                 for s in (0, 1))
    assert (cells["n_seeds_significant"].to_numpy() == expect).all()
    assert cells["n_seeds_q_significant"].between(0, 2).all()
    assert (cells["split_seed"] == 0).all()                          # the primary seed's stats
    stab = json.loads((pair / "stability.json").read_text())
    assert stab["n_seeds"] == 2 and len(stab["pairs"]) == 1
    row = stab["pairs"][0]
    for b in BLOCKS:
        assert -1 <= row[f"spearman_{b}"] <= 1
    assert stab["summary"]["n_cells_flagged_by"]["2"] == int((cells["n_seeds_significant"] == 2).sum())
    assert stab["schema_version"] and stab["config_hash"]
    figures = pair / "figures"
    for f in ("stability.png", "stability_cells.csv", "stability_pairs.csv"):
        assert (figures / f).is_file(), f
    flags = pd.read_csv(figures / "stability_cells.csv")
    assert flags["n_seeds"].eq(2).all() and flags["n_seeds_flagged"].sum() == expect.sum()
    md = (sweep_run["results"] / "tiny" / "summary.md").read_text()
    assert "## Replication across split seeds" in md


@pytest.mark.slow
def test_metric_only_ablation_ran_no_gradient_job(sweep_run):
    """Two experiments that differ in the metric only: 4 gradient stores (2 tasks x 2 split
    seeds) serve both; each experiment scored its own."""
    counts = sweep_run["counts"]
    assert counts["collect"] == 4 and counts["prepare_data"] == 4, counts
    assert counts["chunk_scores"] == 2 * 2 and counts["scores"] == 2 * 2 * 2, counts
    assert counts["stats"] == 8, counts
    stores = sorted(p.name for p in (sweep_run["results"] / "_stores").iterdir())
    assert len(stores) == 4
    for exp in SWEEP:
        heat = json.loads((sweep_run["results"] / exp / "tiny" / "math__code" / "split0"
                           / "heatmap.json").read_text())
        assert heat["meta"]["settings"]["fisher_source"] == ("a" if exp.endswith("_a") else "pooled")
    # the ablation's scores read the default's stores: same store keys in both plans
    plan = sweep_run["plan"]
    assert plan.analysis_stores("tiny", "tiny", "math__code", 1) == \
        plan.analysis_stores("tiny_fisher_source_a", "tiny", "math__code", 1)


@pytest.mark.slow
def test_summary_reports_each_tasks_loss_gradient_norm_and_length(sweep_run):
    summary = json.loads((sweep_run["results"] / "tiny" / "summary.json").read_text())
    for task in ("math", "code"):
        for seed in ("0", "1"):
            roles = summary["tasks"][task][seed]
            assert roles["scored"]["mean_loss"] > 0 and roles["scored"]["mean_grad_norm"] > 0
            assert roles["scored"]["mean_tokens"] > 10
    # length matching: the scored samples of both tasks have the same mean length
    a, b = (summary["tasks"][t]["0"]["scored"]["mean_tokens"] for t in ("math", "code"))
    assert a == pytest.approx(b)
    md = (sweep_run["results"] / "tiny" / "summary.md").read_text()
    assert "mean loss" in md and "mean gradient norm" in md and "mean tokens" in md
    # the packed math samples name their member problems in the data manifest
    data = [p for p in (sweep_run["results"] / "_data").glob("math-*/manifest.json")]
    man = json.loads(data[0].read_text())
    recs = [r for role in man["roles"].values() for r in role["records"]]
    assert all(r["id"].startswith("math:packed:") and r["members"] for r in recs)
    assert man["meta"]["packing"]["target_tokens"] == 64


@pytest.mark.slow
def test_tables_carry_schema_version_units_and_config_hash(sweep_run):
    from interference.results import SCHEMA_VERSION

    for table in (sweep_run["pair"] / "cells.csv", sweep_run["pair"] / "split1" / "cells.csv"):
        cells = pd.read_csv(table, dtype={"kv_group": str})
        side = json.loads(table.with_name("cells.schema.json").read_text())
        assert side["schema_version"] == SCHEMA_VERSION
        assert (cells["schema_version"].astype(str) == SCHEMA_VERSION).all()
        assert set(side["columns"]) == set(cells.columns)
        missing = [c for c, u in side["columns"].items() if not u["unit"]]
        assert not missing, missing
        assert side["columns"]["effect_size"]["unit"].startswith("Cohen's d")
        resolved = (table.parent / ("config.stats.yaml" if table.parent.name.startswith("split")
                                    else "config.tables.yaml")).read_text()
        assert f"config_hash: {side['config_hash']}" in resolved
    stats = json.loads((sweep_run["pair"] / "split0" / "stats.json").read_text())
    assert stats["schema_version"] == SCHEMA_VERSION and stats["units"] and stats["config_hash"]
    summary = json.loads((sweep_run["results"] / "tiny" / "summary.json").read_text())
    assert summary["schema_version"] == SCHEMA_VERSION and summary["units"]


@pytest.mark.slow
def test_figures_regenerate_from_older_results_or_say_clearly_why_not(sweep_run, tmp_path):
    """Results of schema 1.0 (no units sidecar, no per-seed columns) still draw; results of
    another major version are refused with the file, its version and the fix."""
    import matplotlib

    matplotlib.use("Agg")
    from interference.figures import make_all_figures

    old = tmp_path / "old"
    shutil.copytree(sweep_run["pair"], old)
    cells = pd.read_csv(old / "cells.csv", dtype={"kv_group": str})
    cells = cells.drop(columns=["n_seeds_q_significant", "n_seeds_significant", "n_split_seeds",
                                "ci_low_by", "ci_high_by"])
    cells["schema_version"] = "1.0"
    cells.to_csv(old / "cells.csv", index=False)
    (old / "cells.schema.json").unlink()
    heat = json.loads((old / "split0" / "heatmap.json").read_text())
    heat["schema_version"] = "1.0"
    (old / "split0" / "heatmap.json").write_text(json.dumps(heat))
    paths = make_all_figures(old / "split0", old / "cells.csv", tmp_path / "figs")
    assert (tmp_path / "figs" / "heatmap_panel.png").is_file() and len(paths) > 10
    # another major version: a clear refusal, for the heatmap and for the cells table
    heat["schema_version"] = "2.0"
    (old / "split0" / "heatmap.json").write_text(json.dumps(heat))
    with pytest.raises(ValueError, match=r"heatmap.json: the heatmap written with results schema "
                                         r"2.0, which this version .* cannot read. Regenerate"):
        make_all_figures(old / "split0", old / "cells.csv", tmp_path / "figs2")
    heat["schema_version"] = "1.0"
    (old / "split0" / "heatmap.json").write_text(json.dumps(heat))
    cells["schema_version"] = "0.9"
    cells.to_csv(old / "cells.csv", index=False)
    with pytest.raises(ValueError, match=r"cells.csv: the cells table written with results schema "
                                         r"0.9.*--forcerun"):
        make_all_figures(old / "split0", old / "cells.csv", tmp_path / "figs3")
    cells["schema_version"] = "1.0"
    cells.drop(columns=["q_value"]).to_csv(old / "cells.csv", index=False)
    with pytest.raises(ValueError, match=r"cells.csv lacks columns \['q_value'\] \(schema 1.0\): "
                                         r"regenerate it"):
        make_all_figures(old / "split0", old / "cells.csv", tmp_path / "figs4")
