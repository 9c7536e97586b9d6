"""Fault injection (issue 19): every row of the issue's table, and each kind of intermediate
corrupted in turn, ends in a clear error or an identical rerun.

The intermediates are built once: the session's tiny run (``conftest.tiny_run``, shared
with test_workflow). Each test corrupts a copy. One Snakemake run (a changed store, the
scores job forced) checks the job frame end to end: the job stops before using the store,
MLflow records it as FAILED, and no process of the run resolves or connects to any host
but this one. docs/reliability.md names a test here for each row.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import snakemake_cmd, workflow_env  # noqa: E402

PAIR = "tiny/tiny/math__code"


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def tiny(tiny_run, tmp_path_factory):
    """A private copy of the tiny run's results (its MLflow store and logs left out)."""
    dst = tmp_path_factory.mktemp("faults") / "results"
    shutil.copytree(tiny_run["results"], dst, ignore=shutil.ignore_patterns(
        "mlflow.db", "mlartifacts", "logs", "benchmarks"))
    return dst


def one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    assert found, f"nothing matches {pattern} under {root}"
    return found[0]


def scale_floats(path: Path, n: int = 100, factor: float = 1000.0) -> None:
    """Multiply n float32 values in the middle of a file by ``factor``; size kept."""
    before = path.read_bytes()
    data = bytearray(before)
    n = min(n, len(data) // 8)
    start = (len(data) // 2) & ~3
    with np.errstate(all="ignore"):
        vals = np.frombuffer(bytes(data[start:start + 4 * n]), dtype=np.float32) * factor
    data[start:start + 4 * n] = vals.astype(np.float32).tobytes()
    if bytes(data) == before:               # zeros (or inf) stay: change one byte instead
        data[start] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


# every kind of intermediate: (folder glob, file corrupted, input path a job declares, rule)
KINDS = {
    "prepared data": ("_data/math-*", "tensors.safetensors", "tensors.safetensors",
                      "prepare_data"),
    "gradient store rows (factored)": ("_stores/math-*", "grads/math__reference.bin", "grads",
                                       "collect"),
    "Fisher": ("_stores/math-*", "grads/fisher.safetensors", "grads", "collect"),
    "store index": ("_stores/math-*", "grads/index.json", "grads", "collect"),
    "scores": (f"{PAIR}/split0", "scores.npz", "scores.npz", "scores"),
    "statistics": (f"{PAIR}/split0", "stats.json", "stats.json", "stats"),
    "cells per seed": (f"{PAIR}/split0", "cells.csv", "cells.csv", "stats"),
    "permutation null": (f"{PAIR}/split0", "null_top.npz", "null_top.npz", "stats"),
    "cells table": (PAIR, "cells.csv", "cells.csv", "tables"),
}


@pytest.mark.parametrize("how", ["changed", "truncated"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_intermediate_changed_or_truncated_is_refused_naming_file_and_fix(
        tiny, tmp_path, kind, how):
    """The check every job runs on its inputs (qkov_pipeline.jobs.check_inputs): the size
    and xxh3-128 digest its producer recorded; the message names the file, what was
    expected and found, and the rule to force."""
    from interference.results import IntegrityError, verify_inputs

    pattern, rel, declared, rule = KINDS[kind]
    src = one(tiny, pattern)
    folder = tmp_path / src.name
    shutil.copytree(src, folder)
    assert verify_inputs([folder / declared])[0] >= 1          # intact: checked, passes
    target = folder / rel
    scale_floats(target) if how == "changed" else truncate(target)
    with pytest.raises(IntegrityError) as err:
        verify_inputs([folder / declared])
    msg = str(err.value)
    assert str(target) in msg and f"snakemake --forcerun {rule}" in msg
    if how == "changed":
        assert "changed since it was written" in msg and "expected xxh3_128" in msg
    else:
        assert "truncated" in msg and "expected" in msg and "found" in msg


def test_truncated_store_fisher_or_scores_give_clear_errors_in_the_library(tiny, tmp_path):
    """Readers used outside the workflow: no mmap, safetensors or zipfile error."""
    from interference.gradients.fisher import FisherCollector
    from interference.gradients.store import GradientStore
    from interference.results import IntegrityError, load_heatmap

    grads = tmp_path / "grads"
    shutil.copytree(one(tiny, "_stores/math-*") / "grads", grads)
    rows = one(grads, "*.bin")
    truncate(rows)
    with pytest.raises(IntegrityError, match=rf"{rows}: expected \d+ bytes .*found \d+ bytes"
                                             r".*snakemake --forcerun collect"):
        GradientStore.open(grads)
    shutil.rmtree(grads)
    shutil.copytree(one(tiny, "_stores/math-*") / "grads", grads)
    truncate(grads / "fisher.safetensors")
    with pytest.raises(IntegrityError, match=r"fisher\.safetensors: cannot read the Fisher.*"
                                             r"truncated or damaged.*--forcerun collect"):
        FisherCollector.from_saved([grads])
    split = tmp_path / "split0"
    shutil.copytree(tiny / PAIR / "split0", split)
    truncate(split / "scores.npz")
    with pytest.raises(IntegrityError, match=r"scores\.npz: cannot read it .*--forcerun scores"):
        load_heatmap(split)


def test_dense_store_truncated_or_changed_and_read_without_warnings(tmp_path):
    """A dense store (rows spilled to disk and saved): intact reads warn nothing (no
    'array is not writable'); a truncated row file is refused naming it; a changed one is
    refused by the digests its job recorded."""
    from interference.gradients.store import GradientStore
    from interference.results import IntegrityError, output_digests, verify_inputs

    entries = {(0, "Q"): (0, 2, 4), (0, "K"): (8, 2, 4)}
    store = GradientStore(16, entries, memory_mb=0.0, spill_dir=tmp_path / "spill")
    g = torch.Generator().manual_seed(0)
    for k in range(6):
        store.add("math", "scored", f"math:{k}", torch.randn(16, generator=g))
    folder = tmp_path / "store"
    store.save(folder / "grads", meta={"task": "math"})
    (folder / "mlflow.collect.json").write_text(json.dumps(
        {"rule": "collect", "outputs": output_digests([folder / "grads"], folder)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block = GradientStore.open(folder / "grads").block("math", ["math:0", "math:5"], 0, "K")
    assert block.shape == (2, 2, 4)
    scale_floats(folder / "grads" / "math__scored.bin", n=4)
    with pytest.raises(IntegrityError, match=r"math__scored\.bin changed since it was written"):
        verify_inputs([folder / "grads"])
    truncate(folder / "grads" / "math__scored.bin")
    with pytest.raises(IntegrityError, match=r"math__scored\.bin: expected 384 bytes \(6 rows "
                                             r"of 64 bytes\), found 192 bytes"):
        GradientStore.open(folder / "grads")


def test_a_collectors_own_spill_folder_goes_when_the_script_ends(tmp_path):
    """A FisherCollector whose rows spill to a temporary folder it made (no spill_dir)
    removes the folder when the script ends while the collector still holds the store (a
    reference cycle whose __del__ never ran: each such script left its rows, 1.4 GB for the
    B6 sizes, in /tmp), also after the store was released and spilled to again. A folder
    the caller gave is the caller's and stays."""
    script = (
        "import os, sys\n"
        f"sys.path[:0] = [{str(ROOT / 'src')!r}, {str(ROOT / 'tests')!r}]\n"
        "from conftest import padded_batch, tiny_llama\n"
        "from interference.gradients import FisherCollector\n"
        "fc = FisherCollector(enable_cross_task_analysis=True, gradient_memory_mb=0.0,\n"
        "                     spill_dir=sys.argv[1] or None)\n"
        "model = tiny_llama()\n"
        "fc.collect_fisher(model, padded_batch(4, 10, 0, 'a'), 'a', role='scored')\n"
        "fc._store.release()      # a pass's rows dropped; the next pass spills anew\n"
        "fc.collect_fisher(model, padded_batch(4, 10, 1, 'b'), 'b', role='scored')\n"
        "spilled = [p for p in os.scandir(fc._store.spill_dir) if p.stat().st_size]\n"
        "print(fc._store.spill_dir, len(spilled))\n")
    for given in ("", str(tmp_path / "mine")):
        tmp = tmp_path / f"tmp{len(given)}"
        tmp.mkdir()
        res = subprocess.run([sys.executable, "-c", script, given], capture_output=True,
                             text=True, env=dict(os.environ, TMPDIR=str(tmp)), timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        folder, n_files = res.stdout.split()
        assert int(n_files) > 0                      # rows were spilled there
        assert Path(folder).exists() == bool(given), (folder, given)
        assert not [p for p in tmp.iterdir() if p.name.startswith("qkov-grads-")]


# ----------------------------------------------------------------------------- end to end

SITECUSTOMIZE = '''
import os, sys
_LOG = os.environ.get("QKOV_SOCKET_LOG")
_LOCAL = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "")

def _hook(event, args):
    if event not in ("socket.connect", "socket.getaddrinfo"):
        return
    host = args[0] if event == "socket.getaddrinfo" else args[1]
    if isinstance(host, tuple):
        host = host[0]
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host is None or str(host) in _LOCAL or str(host).startswith("/"):
        return
    with open(_LOG, "a") as fh:
        fh.write(f"{os.getpid()} {event} {host!r} {' '.join(sys.argv[:3])}\\n")

if _LOG:
    sys.addaudithook(_hook)
'''
CI_VARS = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
           "BUILDKITE", "CIRCLECI", "TF_BUILD", "TEAMCITY_VERSION", "CODEBUILD_BUILD_ARN",
           "BITBUCKET_BUILD_NUMBER", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
           "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture(scope="module")
def changed_store_run(tiny_run, tmp_path_factory):
    """The tiny run copied, one store file's floats scaled x1000 (size and mtime kept), then
    ``snakemake --forcerun scores`` for one heatmap, every process audited for sockets. The
    environment is a user's: no CI or pytest variables (MLflow turns its telemetry off by
    itself there) and no offline variables but the ones the project sets."""
    work = tmp_path_factory.mktemp("faults-e2e") / "work"
    shutil.copytree(tiny_run["work"], work, symlinks=True,
                    ignore=shutil.ignore_patterns("locks", "incomplete"))
    rows = one(work / "results", "_stores/math-*/grads/math__reference.bin")
    stat = rows.stat()
    scale_floats(rows)
    os.utime(rows, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    site = work.parent / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = work.parent / "sockets.log"
    env = workflow_env()
    for var in CI_VARS:
        env.pop(var, None)
    env.update(QKOV_SOCKET_LOG=str(log), PYTHONPATH=os.pathsep.join([str(site),
                                                                      env["PYTHONPATH"]]))
    target = f"results/{PAIR}/split0/heatmap.json"
    res = subprocess.run(snakemake_cmd(work, target, "--cores", "1", "--config",
                                       "experiment=tiny", "--forcerun", "scores"),
                         capture_output=True, text=True, timeout=600, env=env)
    return {"work": work, "tiny_work": tiny_run["work"], "rows": rows, "res": res,
            "out": res.stdout + res.stderr,
            "sockets": log.read_text() if log.is_file() else "", "env": env}


def test_a_changed_store_stops_the_scoring_job_naming_the_file_and_the_fix(changed_store_run):
    r = changed_store_run
    assert r["res"].returncode != 0, r["out"][-3000:]
    rows = r["rows"].relative_to(r["work"])
    assert f"{rows} changed since it was written" in r["out"], r["out"][-3000:]
    assert "expected xxh3_128" in r["out"] and "snakemake --forcerun collect" in r["out"]
    # the job that reads the stores (chunk_scores) stops, before its scores are written
    assert "mmap length" not in r["out"] and "Error in rule chunk_scores" in r["out"]
    # Snakemake removed the failed job's output and the scores job never ran: nothing
    # computed from the changed store (the heatmap is still the first run's)
    split = Path("results") / PAIR / "split0"
    assert not (r["work"] / split / "chunks" / "0").exists()
    assert (r["work"] / split / "heatmap.json").read_bytes() == \
        (r["tiny_work"] / split / "heatmap.json").read_bytes()


def test_no_process_of_a_workflow_run_contacts_another_host(changed_store_run):
    """Snakemake's process (which imports MLflow for the parent runs) and the job's: no
    name lookup or connection to anything but this machine (MLflow telemetry, Hugging
    Face). Fails when qkov_pipeline.jobs.offline_environment sets nothing."""
    assert changed_store_run["sockets"] == "", changed_store_run["sockets"]
    assert "Error in rule chunk_scores" in changed_store_run["out"]  # the job ran (and failed)


def test_a_failed_job_is_a_failed_mlflow_run_under_its_parent(changed_store_run):
    db = changed_store_run["work"] / "results" / "mlflow.db"
    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute(
            "SELECT r.status, (SELECT value FROM tags t WHERE t.run_uuid = r.run_uuid AND "
            "t.key = 'mlflow.parentRunId'), (SELECT value FROM tags t WHERE t.run_uuid = "
            "r.run_uuid AND t.key = 'qkov.error') FROM runs r JOIN tags k ON k.run_uuid = "
            "r.run_uuid WHERE k.key = 'qkov.rule' AND k.value = 'chunk_scores' AND "
            "r.lifecycle_stage = 'active'").fetchall()
    failed = [r for r in rows if r[0] == "FAILED"]
    assert len(failed) == 1, rows
    assert failed[0][1] and "changed since it was written" in failed[0][2]


def test_after_a_failed_job_the_same_command_reruns_it(changed_store_run):
    """A plain ``snakemake`` does nothing when the failed job's consumers are up to date
    (Snakemake regenerates a missing intermediate only when something needs it); the
    documented command, the failed command again, plans the failed job."""
    work, env = changed_store_run["work"], changed_store_run["env"]
    target = f"results/{PAIR}/split0/heatmap.json"
    again = subprocess.run(snakemake_cmd(work, target, "-n", "--cores", "1", "--config",
                                         "experiment=tiny", "--forcerun", "scores"),
                           capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "rule chunk_scores:" in again.stdout + again.stderr


# ----------------------------------------------------------------------------- MLflow store

def _settings(uri: str, parents: dict | None = None):
    """Direct-mode tracking settings of a test workflow run."""
    from qkov_pipeline import tracking as T

    return T.TrackingSettings(mode="direct", uri=uri, artifacts=None, timeout_s=60,
                              prefix="qkov", workflow_run_id="wf-test", parents=parents or {})


def _runs(db: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return con.execute(
            "SELECT r.status, (SELECT value FROM tags t WHERE t.run_uuid = r.run_uuid AND "
            "t.key = 'mlflow.parentRunId'), (SELECT value FROM tags t WHERE t.run_uuid = "
            "r.run_uuid AND t.key = 'qkov.kind') FROM runs r "
            "WHERE r.lifecycle_stage = 'active'").fetchall()


def _job_runs(tmp_path) -> list[tuple]:
    """(status, run name, params as a dict) of every job run in the test's store."""
    db = tmp_path / "mlflow.db"
    with contextlib.closing(sqlite3.connect(db)) as con:
        runs = con.execute("SELECT r.run_uuid, r.status, r.name FROM runs r JOIN tags k ON "
                           "k.run_uuid = r.run_uuid WHERE k.key = 'qkov.kind' AND k.value = "
                           "'job' AND r.lifecycle_stage = 'active'").fetchall()
        return [(st, name, dict(con.execute("SELECT key, value FROM params WHERE run_uuid "
                                            "= ?", (rid,)).fetchall()))
                for rid, st, name in runs]


def _store_with_parent(tmp_path):
    """Direct-mode settings on a fresh sqlite store with a RUNNING parent run for 'tiny'."""
    from qkov_pipeline import tracking as T

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    T.init_store(uri, None, ["qkov/tiny"])
    parents = T.start_parents(uri, None, {"tiny": "qkov/tiny"}, {})
    return _settings(uri, parents)


def test_store_left_half_made_by_a_crash_is_made_again_and_track_logs_every_record(
        tmp_path, monkeypatch):
    """kill -9 while MLflow creates its tables leaves some of them (``table review_queues
    already exists`` on every later start). The next start moves the empty, unusable file
    aside and makes the store again; the records the jobs kept pending are logged by
    ``track`` (``--forcerun track``) under the experiment's parent, each once."""
    from qkov_pipeline import tracking as T

    db = tmp_path / "mlflow.db"
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute("CREATE TABLE review_queues (queue_id INTEGER)")
        con.commit()
    uri = f"sqlite:///{db}"
    s = _settings(uri)
    records = []
    for k in range(2):
        rec = T.new_record(s, experiment="tiny", rule="scores", run_name=f"scores {k}",
                           params={"a": k}, tags={}, wildcards={"seed": k})
        assert T.log_with_timeout(s, rec)["status"] == "pending"      # no parent run yet
        records.append(tmp_path / f"mlflow.scores.{k}.json")
        T.write_record(records[-1], rec)
    T.init_store(uri, None, ["qkov/tiny"])
    assert list(tmp_path.glob("mlflow.db.unusable-*"))
    late = T.new_record(s, experiment="tiny", rule="stats", run_name="stats", params={},
                        tags={}, wildcards={})
    assert T.log_with_timeout(s, late)["status"] == "pending"   # store usable, still no parent
    records.append(tmp_path / "mlflow.stats.json")
    T.write_record(records[-1], late)
    for _ in range(2):                      # track, then `--forcerun track`
        out = T.sync(s, [str(p) for p in records], "tiny", None, [], tmp_path / "tracking.json")
    runs = _runs(db)
    jobs = [r for r in runs if r[2] == "job"]
    parents = [r for r in runs if r[2] == "workflow"]
    assert len(jobs) == 3 and len(parents) == 1 and all(r[0] == "FINISHED" for r in jobs)
    assert {r[1] for r in jobs} == {out["parent_run_id"]}


def test_two_experiments_started_at_once_on_a_fresh_store_both_get_their_parent(tmp_path):
    """Two workflow starts at the same moment on a store that does not exist yet (the
    race gave ``duplicate column name: step`` and runs without a parent)."""
    db = tmp_path / "mlflow.db"
    code = ("import sys; from qkov_pipeline import tracking as T; u = sys.argv[1]; "
            "e = sys.argv[2]; T.init_store(u, None, ['qkov/' + e]); "
            "print(T.start_parents(u, None, {e: 'qkov/' + e}, {})[e])")
    env = workflow_env()
    procs = [subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{db}", f"exp{k}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for k in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 2
    assert sum(1 for r in _runs(db) if r[2] == "workflow") == 2
    assert not list(tmp_path.glob(".mlflow.db.*.tmp"))


# ----------------------------------------------------------------------------- a failing job

class FakeSmk:
    """The ``snakemake`` object a script gets, for :func:`qkov_pipeline.jobs.run_stage`."""

    def __init__(self, folder: Path, settings, rule: str = "probe", **resources):
        from qkov_pipeline import tracking as T

        run = folder / ".qkov" / "run.json"
        T.write_run_file(run, settings, {"owners": {},
                                         "exec": {"tiny": {rule: {"threads": 1, **resources}}}})
        outs = {"out": str(folder / "out.txt"), "config": str(folder / f"config.{rule}.yaml"),
                "record": str(folder / f"mlflow.{rule}.json")}
        self.rule, self.wildcards, self.threads = rule, {"exp": "tiny"}, 1
        self.params = SimpleNamespace(slice=json.dumps({"v": 1}))
        self.config, self.log = {}, [str(folder / "job.log")]
        self.input = _Named({"run": str(run)})
        self.output = _Named(outs)


class _Named(list):
    def __init__(self, d: dict):
        super().__init__(d.values())
        self.__dict__.update(d)


@pytest.fixture
def probe_stage(monkeypatch):
    """A stage module ``qkov_pipeline.stages.probe`` whose behaviour a test sets."""
    import logging
    import types

    mod = types.ModuleType("qkov_pipeline.stages.probe")
    monkeypatch.setitem(sys.modules, "qkov_pipeline.stages.probe", mod)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "2"))
    handlers, environ = logging.getLogger().handlers[:], dict(os.environ)
    yield mod
    logging.getLogger().handlers[:] = handlers
    os.environ.clear()
    os.environ.update(environ)


def test_a_job_failing_after_mlflow_logged_it_is_failed_and_the_rerun_logs_it_once(
        tmp_path, monkeypatch, probe_stage):
    """The disk fills while the job writes its record (after MLflow logged the run): the
    run is FAILED, not FINISHED; the rerun's run is the only FINISHED one."""
    from qkov_pipeline import jobs
    from qkov_pipeline import tracking as T

    s = _store_with_parent(tmp_path)
    probe_stage.run = lambda job: Path(job.output.out).write_text("result")
    real_write, calls = T.write_record, []

    def full_disk_on_final_write(path, record):
        calls.append(record["status"])
        if record["status"] == "logged":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, record)

    monkeypatch.setattr(T, "write_record", full_disk_on_final_write)
    with pytest.raises(OSError):
        jobs.run_stage(FakeSmk(tmp_path, s), "probe")
    assert calls[0] == "pending"            # written before MLflow saw it
    monkeypatch.setattr(T, "write_record", real_write)
    jobs.run_stage(FakeSmk(tmp_path, s), "probe")                    # the rerun
    runs = [r for r in _runs(tmp_path / "mlflow.db") if r[2] == "job"]
    assert sorted(r[0] for r in runs) == ["FAILED", "FINISHED"], runs
    assert all(r[1] == s.parents["tiny"] for r in runs)
    rec = json.loads((tmp_path / "mlflow.probe.json").read_text())
    assert rec["status"] == "logged" and rec["outputs"]["out.txt"]["bytes"] == 6


def test_the_job_frame_sets_the_rules_freed_memory_before_the_stage_runs(
        tmp_path, monkeypatch, probe_stage):
    """resources.<rule>.freed_memory reaches jobs.set_freed_memory before the stage runs
    ('return' where the rule does not say); the heap itself: tests/test_reliability.py."""
    from qkov_pipeline import jobs

    calls = []
    monkeypatch.setattr(jobs, "set_freed_memory", calls.append)
    probe_stage.run = lambda job: (calls.append(("stage", job.exec.get("freed_memory"))),
                                   Path(job.output.out).write_text("result"))
    s = _settings(None, {}).replace(mode="off")
    jobs.run_stage(FakeSmk(tmp_path, s, freed_memory="keep"), "probe")
    jobs.run_stage(FakeSmk(tmp_path, s), "probe")
    assert calls == ["keep", ("stage", "keep"), "return", ("stage", None)]


def test_disk_full_while_drawing_figures_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    """The figures stage writes into a temporary folder moved into place on success; a
    failure part way (ENOSPC after a heatmap was written) leaves the folder as it was."""
    import interference.figures.make as make
    from qkov_pipeline.stages import figures as stage
    from test_reliability import FakeJob

    pair = tiny / PAIR
    out = tmp_path / "figures"
    out.mkdir()

    def heatmaps_then_no_space(heatmap, cells, out_dir, *a, **k):
        (Path(out_dir) / "heatmap_Q.png").write_bytes(b"part")     # drawn, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(make, "write_block_heatmaps", heatmaps_then_no_space)
    cfg = json.loads(json.dumps({"figures": {"n_top": 5, "n_forensic_cells": 1, "n_pairs": 2,
                                             "n_bootstrap": 50, "seed": 0}}))
    job = FakeJob(cfg, {"heatmap": str(pair / "split0" / "heatmap.json"),
                        "cells": str(pair / "cells.csv"),
                        "stats": [str(pair / "split0" / "stats.json")],
                        "null_top": str(pair / "split0" / "null_top.npz"),
                        "data": [str(p) for p in sorted(tiny.glob("_data/*/manifest.json"))]},
                  {"manifest": str(out / "figures.json")}, rule="draw_figures")
    with pytest.raises(OSError, match="No space left"):
        stage.run(job)
    assert sorted(tmp_path.rglob("*")) == [out], sorted(tmp_path.rglob("*"))


# ----------------------------------------------------------------------------- messages

def test_malformed_jsonl_names_the_line_and_a_non_object_row_its_type(tmp_path):
    from interference.data import load_task

    good = '{"id": %d, "prompt": "p", "answer": "a"}\n'
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(good % k for k in range(30)) + '{"id": 30, "prompt": oops}\n')
    with pytest.raises(ValueError, match=r"mine\.jsonl: line 31 is not valid JSON "
                                         r"\(Expecting value at column 22\)"):
        load_task("jsonl", path=str(path))
    path.write_text(good % 0 + "\n" + '["a", "list"]\n')
    with pytest.raises(ValueError, match=r"line 3 is a JSON array, not an object with fields "
                                         r"\['id', 'prompt', 'answer'\]"):
        load_task("jsonl", path=str(path))


def test_config_refuses_unknown_sources_unsafe_names_and_no_bootstrap():
    """Before any job (the Snakefile validates while it parses, so also in a dry run)."""
    from test_reliability import tiny_cfg

    cases = {("tasks.code.source=nosuch",): r"tasks\.code\.source='nosuch' is not a registered "
                                            r"task source \(known: .*'jsonl'",
             ("model.name=..",): r"model\.name='\.\.': names become folders",
             ("model.name=.hidden",): r"model\.name='\.hidden'",
             ("stats.n_bootstrap=0",): r"stats\.n_bootstrap=0: .*at least 100 resamples",
             ("+task@tasks.mine=jsonl", "tasks.mine.kwargs.path=/no/such.jsonl",
              "pairs=[[math,mine]]"): r"tasks\.mine\.kwargs\.path: task file not found"}
    for overrides, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern):
            tiny_cfg(*overrides)
    tiny_cfg("stats.n_bootstrap=100")


def test_disk_check_states_small_sizes_in_mb(tmp_path, caplog):
    import logging

    from interference.gradients.collect import check_disk, logger

    small = {"final_bytes": 3 * 2**20, "peak_bytes": 3 * 2**20}
    with caplog.at_level(logging.INFO, logger=logger.name):
        check_disk(tmp_path, small, 0.9)
    assert "3.0 MB on disk (peak 3.0 MB while saving)" in caplog.text
    with pytest.raises(RuntimeError, match=r"needs up to 3\.0 MB while saving \(3\.0 MB kept\)"
                                           r" but \d+(\.\d)? [KMGT]?B are free"):
        check_disk(tmp_path, small, 1e-12)
    assert "0.00 GB" not in caplog.text


def test_a_job_learns_its_settings_only_from_its_run_file(tmp_path, monkeypatch, probe_stage):
    """No run file among the inputs: a clear error before anything runs. A job of a rule
    that logs no run of its own (a collect shard, a layer chunk) writes its record and
    logs no run, also in direct mode with a parent run, and starts no logging process."""
    from qkov_pipeline import jobs
    from qkov_pipeline import tracking as T

    s = _settings(f"sqlite:///{tmp_path / 'mlflow.db'}", {"tiny": "parent-run"})
    logged, started = [], []
    monkeypatch.setattr(T, "log_with_timeout", lambda *a, **k: logged.append(a))
    monkeypatch.setattr(T, "start_logging_process", lambda *a: started.append(a))
    smk = FakeSmk(tmp_path, s)
    smk.input = _Named({})
    with pytest.raises(ValueError, match="declares no input 'run'"):
        jobs.run_stage(smk, "probe")

    assert "chunk_scores" in jobs.RULES_WITHOUT_RUNS
    probe_stage.run = lambda job: Path(job.output.out).write_text("result")
    jobs.run_stage(FakeSmk(tmp_path, s, rule="chunk_scores"), "probe")
    assert json.loads((tmp_path / "mlflow.chunk_scores.json").read_text())["status"] == \
        "pending"
    assert logged == [] and started == []


def test_a_job_logs_its_run_through_a_process_that_warmed_up_while_it_worked(
        tmp_path, probe_stage):
    """The job frame starts the logging process before the stage runs; the stage's
    record is logged through it (the run the store then holds has the job's params), and
    the process has ended when the job has. A failing stage is a FAILED run, logged the
    same way. Fails when the frame starts the process after the stage, or logs without
    it, or leaves it running."""
    from qkov_pipeline import jobs

    s = _store_with_parent(tmp_path)
    seen = {}

    def work(job):
        proc = job.logging_process
        seen["alive"] = proc is not None and proc.proc.poll() is None
        seen["proc"] = proc
        Path(job.output.out).write_text("result")

    probe_stage.run = work
    jobs.run_stage(FakeSmk(tmp_path, s), "probe")
    record = json.loads((tmp_path / "mlflow.probe.json").read_text())
    assert seen["alive"] and record["status"] == "logged", record
    assert seen["proc"].answered and seen["proc"].proc.poll() is not None   # and ended
    assert _job_runs(tmp_path) == [("FINISHED", "probe tiny", {"v": "1"})]

    def fail(job):
        seen["proc"] = job.logging_process
        raise RuntimeError("stage broke")

    probe_stage.run = fail
    with pytest.raises(RuntimeError, match="stage broke"):
        jobs.run_stage(FakeSmk(tmp_path, s), "probe")
    assert seen["proc"] is not None and seen["proc"].answered
    assert sorted(r[0] for r in _job_runs(tmp_path)) == ["FAILED", "FINISHED"]


def test_a_logging_process_that_ends_or_hangs_never_loses_a_record(tmp_path, monkeypatch):
    """A logging process that dies as it starts: the job has none (and logs in its own
    process). One killed before the job asks: the job logs its run itself. One that
    never answers: the record stays pending within the timeout (the track rule logs it)
    and the process is ended. Fails when a dead process loses the run, or a hung one holds
    the job past its timeout."""
    from qkov_pipeline import tracking as T
    from qkov_pipeline.tracking import process as P

    s = _store_with_parent(tmp_path)

    def record(k):
        return T.new_record(s, experiment="tiny", rule="stats", run_name=f"stats {k}",
                            params={"k": k}, tags={}, wildcards={})

    def gone(self, doc):
        raise P.ProcessGone("its input is closed (BrokenPipeError)")

    with monkeypatch.context() as m:                # one that dies before its first line
        m.setattr(P.LoggingProcess, "_send", gone)
        assert T.start_logging_process(s, "tiny") is None

    dead = T.start_logging_process(s, "tiny")
    dead.proc.kill()
    dead.proc.wait()
    assert T.log_with_timeout(s, record(0), via=dead)["status"] == "logged"
    dead.close()

    hung = P.LoggingProcess.__new__(P.LoggingProcess)   # a process that reads and never answers
    hung.closed = hung.answered = False
    hung.proc = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                                  "for line in sys.stdin: pass"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    t0 = time.time()
    out = T.log_with_timeout(s, record(1), timeout_s=3, via=hung)
    assert time.time() - t0 < 10 and out["status"] == "pending", out
    assert "no answer within 3 s" in out["mlflow_error"]
    hung.close()
    assert hung.proc.poll() is not None
    time.sleep(1)          # the abandoned call must not log the run in the job meanwhile
    assert [r[1] for r in _job_runs(tmp_path)] == ["stats 0"]


def test_tracking_settings_refuse_an_unknown_mode_or_key():
    from qkov_pipeline import tracking as T

    with pytest.raises(ValueError, match="tracking mode 'sometimes' is not one of"):
        T.TrackingSettings(mode="sometimes")
    with pytest.raises(ValueError, match=r"unknown tracking settings \['colour'\]"):
        T.TrackingSettings.from_dict({"mode": "off", "colour": "red"})
    s = T.TrackingSettings(mode="direct", uri="sqlite:///x.db", parents={"tiny": "r1"})
    assert T.TrackingSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
