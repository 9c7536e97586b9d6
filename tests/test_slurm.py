"""Sharded gradient collection, and the workflow on a REAL single-node SLURM cluster.

Sharding (everywhere, seconds): the shard plan, shards gathered by the library equal one
collector bitwise (gradients and Fisher), EMA refused, GPU locks, the planned jobs.

SLURM (``@pytest.mark.slurm``; needs root and Debian's slurmctld, slurmd, slurm-client and
munge, which .ci/run installs; skipped elsewhere, or failed when QKOV_REQUIRE_SLURM=1):
:func:`start_runs` starts munge + slurmctld + slurmd (tests/slurm_cluster.py), then runs,
at the same time and in the background,

- the tiny workflow with 2 shards per task through ``snakemake --executor slurm`` (the
  profile profiles/slurm, squeue status, a hard ``timeout -s KILL``),
- the tiny workflow with an invalid value injected (``model.family=no_such_family``, which
  the schema allows) that makes the first jobs, prepare_model and prepare_data, raise.

tests/conftest.py calls it as soon as the session is collected (when these tests are
selected and SLURM is here): the runs mostly wait on SLURM (scheduling, status polls), so
the tests before this module use the CPU meanwhile; the fixtures here wait for them. The
tests check that every job ran as a SLURM job (job ids in .snakemake/slurm_logs, each
COMPLETED in the job-completion log, SLURM_JOB_ID inside the shard jobs), that the outputs
equal the session's local unsharded tiny run's (cells.csv byte for byte, scores, Fisher),
that the MLflow runs exist (deferred tracking: the local track rule logged the jobs'
records), and that the failing rule fails the run (FAILED in the job-completion log,
non-zero exit, no hang).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import padded_batch, tiny_llama  # noqa: E402
from slurm_cluster import BackgroundRuns, SlurmCluster, unavailable_reason  # noqa: E402
from conftest import job_counts as _job_counts
from conftest import SLURM_RUNS, snakemake_cmd, workflow_env

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "slurm"
SHARDS = "++resources.collect.shards=2"   # ++: works whether conf/ has the key or not
# a hang guard; generous, as the runs share the CPU with the tests that run meanwhile
SLURM_TIMEOUT_S = int(os.environ.get("QKOV_SLURM_TIMEOUT_S", "900"))
ANALYSES = ("math__code", "math__code.control")




# ============================================================================ shard plan

def test_shard_plan_splits_whole_units_contiguously():
    from qkov_pipeline.plan import shard_plan

    sizes = {"fisher": 16, "scored": 12, "reference": 12, "control": 12}
    assert shard_plan(sizes, 1) == [{"fisher": (0, 16), "scored": (0, 12),
                                     "reference": (0, 12), "control": (0, 12)}]
    for k in range(1, 12):
        plan = shard_plan(sizes, k)
        assert len(plan) == min(k, 8)            # 8 units of <= 8 samples
        for role, n in sizes.items():            # every sample exactly once, in order
            ranges = [p[role] for p in plan if role in p]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(a % 8 == 0 for a, _ in ranges)   # whole micro-batch units
        loads = [sum(b - a for a, b in p.values()) for p in plan]
        assert min(loads) > 0
    assert [sum(b - a for a, b in p.values()) for p in shard_plan(sizes, 2)] == [28, 24]


def _collect(model, batches, ranges, partials):
    """What a collect job does: the Fisher one 8-sample unit per call, stored roles whole."""
    from interference.gradients import FisherCollector
    from qkov_pipeline.plan import MICRO_BATCH
    from interference.gradients.collect import take

    fc = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=0.02,
                         fisher_partials=partials)
    for role in ("fisher", "scored", "reference"):
        if role not in ranges:
            continue
        a, b = ranges[role]
        calls = [(u, min(u + MICRO_BATCH, b)) for u in range(a, b, MICRO_BATCH)] \
            if role == "fisher" else [(a, b)]
        for u, v in calls:
            fc.collect_fisher(model, take(batches[role], u, v), task="t", mode="mean",
                              role=role)
    return fc


def test_sharded_collection_equals_one_collector_bitwise(tmp_path):
    """Shards saved with partial sums and gathered == one collector: every g_i, norm and
    loss, and the Fisher (float64 sums, counts, ids) bitwise; rows hard-linked."""
    from interference.gradients import FisherCollector
    from qkov_pipeline.plan import shard_plan

    model = tiny_llama()
    batches = {"fisher": padded_batch(20, 12, 1, "f"), "scored": padded_batch(13, 12, 2, "s"),
               "reference": padded_batch(9, 12, 3, "r")}
    sizes = {r: len(b["sample_ids"]) for r, b in batches.items()}
    one = _collect(model, batches, {r: (0, n) for r, n in sizes.items()}, False)
    one.save_task("t", tmp_path / "one")
    ref = FisherCollector.from_saved([tmp_path / "one"])
    for k in (2, 3, 5):
        dirs = []
        for i, ranges in enumerate(shard_plan(sizes, k)):
            _collect(model, batches, ranges, True).save_task("t", tmp_path / f"{k}.{i}",
                                                              partial=True)
            dirs.append(tmp_path / f"{k}.{i}")
        FisherCollector.gather_saved(dirs, tmp_path / f"g{k}")
        got = FisherCollector.from_saved([tmp_path / f"g{k}"])
        fa, fb = ref.fisher.tasks["t"], got.fisher.tasks["t"]
        assert torch.equal(fa.state, fb.state) and fa.count == fb.count == 20
        assert fa.sample_ids == fb.sample_ids
        assert torch.equal(ref.fisher.get("t"), got.fisher.get("t"))
        sa, sb = ref.gradient_manager, got.gradient_manager
        for role in ("scored", "reference"):
            assert sa.ids("t", role) == sb.ids("t", role)
            for sid in sa.ids("t", role):
                assert torch.equal(sa.vector("t", sid), sb.vector("t", sid))
                assert sa.norms[("t", sid)] == sb.norms[("t", sid)]
                assert sa.losses[("t", sid)] == sb.losses[("t", sid)]
            assert torch.equal(sa.block("t", sa.ids("t", role), 1, "Q"),
                               sb.block("t", sb.ids("t", role), 1, "Q"))
        # rows are hard-linked from the shards, not copied
        part = next((tmp_path / f"g{k}").rglob("parts/*/t__scored.bin"))
        assert part.stat().st_nlink == 2
    # a gathered store saved again is one plain store (parts concatenated)
    got = FisherCollector.from_saved([tmp_path / "g3"])
    got.gradient_manager.save(tmp_path / "resaved", meta=got.gradient_manager.meta)
    from interference.gradients import GradientStore

    again = GradientStore.open(tmp_path / "resaved")
    assert sorted(p.name for p in (tmp_path / "resaved").glob("*.bin")) == [
        "t__reference.bin", "t__scored.bin"]
    for sid in ref.gradient_manager.ids("t", "scored"):
        assert torch.equal(again.vector("t", sid), ref.gradient_manager.vector("t", sid))


def test_ema_fisher_cannot_be_sharded(tmp_path):
    from interference.gradients import FisherCollector
    from qkov_pipeline.plan import planned_shards

    with pytest.raises(ValueError, match="cannot be sharded"):
        FisherCollector(fisher_partials=True).collect_fisher(
            tiny_llama(), padded_batch(4, 8, 0, "x"), task="t", mode="ema", role="fisher")
    fc = FisherCollector(enable_cross_task_analysis=True)
    fc.collect_fisher(tiny_llama(), padded_batch(4, 8, 0, "x"), task="t", mode="ema",
                      role="fisher")
    fc.collect_fisher(tiny_llama(), padded_batch(4, 8, 1, "y"), task="t", mode="ema",
                      role="scored")
    fc.save_task("t", tmp_path / "a")
    with pytest.raises(ValueError, match="cannot be sharded"):
        FisherCollector.gather_saved([tmp_path / "a"], tmp_path / "g")
    store_slice = {"fisher": {"mode": "ema"},
                   "data": {"roles": {"fisher": 16, "scored": 12}}}
    assert planned_shards(store_slice, 1) == 0
    with pytest.raises(ValueError, match="fisher.mode=mean"):
        planned_shards(store_slice, 2)


def test_overlapping_shards_are_refused(tmp_path):
    from interference.gradients import FisherCollector

    model = tiny_llama()
    batch = padded_batch(8, 8, 0, "x")
    for name in ("a", "b"):
        fc = FisherCollector(enable_cross_task_analysis=True, fisher_partials=True)
        fc.collect_fisher(model, batch, task="t", mode="mean", role="scored")
        fc.save_task("t", tmp_path / name, partial=True)
    with pytest.raises(ValueError, match="disjoint"):
        FisherCollector.gather_saved([tmp_path / "a", tmp_path / "b"], tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_gpu_locks_give_concurrent_jobs_different_gpus(tmp_path):
    """Two jobs that start together on a 2-GPU host take different GPUs (both asking for
    GPU 0 first), and a GPU is free again when its job ends."""
    code = ("import sys, time; from qkov_pipeline.jobs import acquire_gpu; "
            "held = []; k = acquire_gpu(['0', '1'], held, int(sys.argv[1]), sys.argv[2]); "
            "print(k, flush=True); time.sleep(float(sys.argv[3]))")
    env = workflow_env()

    def job(preferred, hold):
        return subprocess.Popen([sys.executable, "-c", code, str(preferred), str(tmp_path),
                                 str(hold)], stdout=subprocess.PIPE, text=True, env=env)
    first = job(0, 3)
    first_gpu = first.stdout.readline().strip()
    second = job(0, 0)
    assert {first_gpu, second.stdout.readline().strip()} == {"0", "1"}
    second.wait(30)
    first.wait(30)
    third = job(1, 0)
    assert third.stdout.readline().strip() == "1"
    third.wait(30)


def test_shards_are_planned_as_separate_jobs(tmp_path):
    base = ["-n", "--config", "experiment=tiny"]
    res = subprocess.run(snakemake_cmd(tmp_path, *base, f"overrides=[{SHARDS}]"),
                         capture_output=True, text=True, timeout=180, env=workflow_env())
    assert res.returncode == 0, res.stderr
    counts = _job_counts(res.stdout)
    assert counts["collect_shard"] == 4 and counts["collect"] == 2, counts
    res = subprocess.run(snakemake_cmd(tmp_path, *base, f"overrides=[{SHARDS}, fisher.mode=ema]"),
                         capture_output=True, text=True, timeout=180, env=workflow_env())
    assert res.returncode != 0
    assert "fisher.mode=mean" in res.stdout + res.stderr


# ============================================================================ SLURM

def _require_slurm() -> None:
    reason = unavailable_reason()
    if reason:
        if os.environ.get("QKOV_REQUIRE_SLURM") == "1":
            pytest.fail(f"QKOV_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


def _slurm_cmd(workdir: Path, *config: str) -> list[str]:
    return ["timeout", "-s", "KILL", str(SLURM_TIMEOUT_S), *snakemake_cmd(
        workdir, "--workflow-profile", str(PROFILE), "--executor", "slurm", "--jobs", "4",
        "--default-resources", "slurm_partition=debug", "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "1", "--config", *config)]


def start_runs(tmp_path_factory) -> BackgroundRuns:
    """Start the cluster, then on it the two runs (module docstring); returns at once."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    work = {"ok": tmp_path_factory.mktemp("slurm-tiny"),
            "fail": tmp_path_factory.mktemp("slurm-fail")}
    commands = {
        "ok": _slurm_cmd(work["ok"], "experiment=tiny", f"overrides=[{SHARDS}]"),
        "fail": _slurm_cmd(work["fail"], "experiment=tiny",
                           "overrides=[model.family=no_such_family]"),
    }
    return BackgroundRuns(cluster, cluster.root, commands, cluster.env(workflow_env()),
                          work).start()


@pytest.fixture(scope="module")
def background(request, tmp_path_factory):
    """The cluster and its runs: started by tests/conftest.py at collection, else now."""
    _require_slurm()
    runs = request.config.stash.get(SLURM_RUNS, None)
    if isinstance(runs, BaseException):
        raise runs
    runs = runs or start_runs(tmp_path_factory)
    yield runs
    runs.stop()


@pytest.fixture(scope="module")
def cluster(background):
    return background.cluster


@pytest.fixture(scope="module")
def slurm_runs(background, tiny_run):
    """The SLURM runs once ended, and the session's local tiny run (run meanwhile if it was
    not yet)."""
    out = background.wait()
    out["local"] = tiny_run["work"]
    print(f"\nSLURM runs: ok {out['ok']['elapsed']:.0f} s, fail {out['fail']['elapsed']:.0f} s "
          "after their start")
    return out


def _slurm_job_ids(work: Path) -> dict[str, str]:
    """SLURM job id -> rule, from the plugin's per-job logs."""
    ids = {}
    for p in (work / ".snakemake" / "slurm_logs").rglob("*.log"):
        ids[p.stem] = p.relative_to(work / ".snakemake" / "slurm_logs").parts[0][len("rule_"):]
    return ids


@pytest.mark.slurm
def test_tiny_workflow_runs_as_slurm_jobs(slurm_runs, cluster):
    run = slurm_runs["ok"]
    assert run["rc"] == 0, (f"rc {run['rc']} after {run['elapsed']:.0f} s (137 = killed by the "
                            f"{SLURM_TIMEOUT_S} s timeout):\n{run['output'][-8000:]}\n"
                            f"{cluster.logs()}")
    ids = _slurm_job_ids(run["work"])
    rules = sorted(ids.values())
    # every job but the local track rule was a SLURM job: 2 shards per task, then gathered
    assert rules == sorted(["prepare_model"] + ["prepare_data"] * 2 +
                           ["collect_shard"] * 4 +
                           ["collect"] * 2 + ["chunk_scores"] + ["scores"] * 2 + ["stats"] * 2 +
                           ["tables"] * 2 + ["draw_figures"] * 2 + ["summary"]), rules
    states = cluster.completed_jobs()
    assert {i: states.get(i) for i in ids} == {i: "COMPLETED" for i in ids}
    for store in (run["work"] / "results" / "_stores").iterdir():
        info = json.loads((store / "store.json").read_text())
        assert info["n_shards"] == 2
        shard_jobs = [s["device_info"]["slurm_job_id"] for s in info["shards"]]
        assert len(set(shard_jobs)) == 2 and all(ids.get(j) == "collect_shard"
                                                 for j in shard_jobs), shard_jobs
        assert not (store / "shards").exists() or not any((store / "shards").rglob("*.json"))
    assert "localrule track" in run["output"]


@pytest.mark.slurm
def test_slurm_sharded_outputs_equal_the_local_run(slurm_runs):
    from safetensors.torch import load_file

    assert slurm_runs["ok"]["rc"] == 0
    slurm = slurm_runs["ok"]["work"] / "results"
    local = Path(slurm_runs["local"]) / "results"
    for pair in ANALYSES:
        a = (local / "tiny" / "tiny" / pair / "cells.csv").read_bytes()
        b = (slurm / "tiny" / "tiny" / pair / "cells.csv").read_bytes()
        assert a == b, f"{pair}/cells.csv differs between the local and the SLURM run"
        sa = np.load(local / "tiny" / "tiny" / pair / "split0" / "scores.npz")
        sb = np.load(slurm / "tiny" / "tiny" / pair / "split0" / "scores.npz")
        assert sorted(sa.files) == sorted(sb.files)
        for k in sa.files:
            assert np.array_equal(sa[k], sb[k]), (pair, k)
        ha = json.loads((local / "tiny" / "tiny" / pair / "split0" / "heatmap.json").read_text())
        hb = json.loads((slurm / "tiny" / "tiny" / pair / "split0" / "heatmap.json").read_text())
        for h in (ha, hb):
            h["meta"].pop("collector_token", None)     # a random id of the scoring run
        assert ha == hb, pair
    stores_a = {p.name: p for p in (local / "_stores").iterdir()}
    stores_b = {p.name: p for p in (slurm / "_stores").iterdir()}
    assert sorted(stores_a) == sorted(stores_b)      # same store keys: shards are execution
    for key in stores_a:
        fa = load_file(str(stores_a[key] / "grads" / "fisher.safetensors"))["state"]
        fb = load_file(str(stores_b[key] / "grads" / "fisher.safetensors"))["state"]
        assert torch.equal(fa, fb), key
        ia = json.loads((stores_a[key] / "store.json").read_text())
        ib = json.loads((stores_b[key] / "store.json").read_text())
        for role, entry in ia["roles"].items():
            for k in ("n", "sample_ids", "mean_loss", "mean_tokens", "grad_norms", "losses"):
                assert entry.get(k) == ib["roles"][role].get(k), (key, role, k)


@pytest.mark.slurm
def test_mlflow_runs_exist_after_the_slurm_run(slurm_runs):
    """Deferred tracking: the jobs wrote records only; the local track rule logged them."""
    from mlflow.tracking import MlflowClient

    assert slurm_runs["ok"]["rc"] == 0
    results = slurm_runs["ok"]["work"] / "results"
    tracking = json.loads((results / "tiny" / "tracking.json").read_text())
    assert tracking["mode"] == "deferred"
    assert {r["status"] for r in tracking["records"].values()} == {"logged_by_track"}
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("qkov/tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("qkov.kind") == "workflow"]
    children = [r for r in runs if r.data.tags.get("qkov.kind") == "job"]
    assert len(parents) == 1
    assert sorted(r.data.tags["qkov.rule"] for r in children) == sorted(
        ["prepare_model", "prepare_data", "prepare_data", "collect",
         "collect", "scores",
         "scores", "stats", "stats", "tables", "tables", "draw_figures", "draw_figures",
         "summary"])
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    collect = [r for r in children if r.data.tags["qkov.rule"] == "collect"]
    assert all(r.data.metrics["shards.n"] == 2 for r in collect)
    assert all("shard1.time.collect_s" in r.data.metrics for r in collect)


@pytest.mark.slurm
def test_a_failing_rule_fails_the_slurm_run(slurm_runs, cluster):
    run = slurm_runs["fail"]
    assert run["rc"] not in (0, 124, 137), f"rc {run['rc']}:\n{run['output'][-5000:]}"
    # the first jobs build from the bad model config (the data jobs build its tokenizer)
    assert "Error in rule prepare_" in run["output"], run["output"][-5000:]
    ids = _slurm_job_ids(run["work"])
    states = cluster.completed_jobs()
    failed = [i for i, rule in ids.items() if states.get(i) == "FAILED"]
    first = {"prepare_model", "prepare_data"}
    assert failed and all(ids[i] in first for i in failed), (ids, states)
    assert set(ids.values()) <= first                        # nothing ran after them
    assert not list((run["work"] / "results").glob("_models/*/model.json"))
