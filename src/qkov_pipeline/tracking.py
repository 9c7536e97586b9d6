"""MLflow tracking of the workflow: one parent run per workflow run, one child run per job.

Every job writes a RECORD (JSON, next to its outputs): params (its resolved config slice,
flattened), metrics, tags and artifact paths. What happens to it depends on the mode:

- ``direct`` (default): the job logs the record as a child run right away, bounded by
  ``timeout_s``; if MLflow is slow or failing the job still succeeds and the record stays
  ``pending``. The parent run is created once, before any job starts (Snakefile
  ``onstart``), which also initialises a fresh sqlite store, so concurrent jobs never race
  on its creation.
- ``deferred``: jobs only write records; the local rule ``track`` logs every pending
  record at the end (one writer: safe where sqlite on a shared file system is not).
- ``off``: records only.

In every mode ``track`` (the last rule) logs what is still pending, idempotently: a
record's ``record_id`` is a tag of its run, so nothing is logged twice.

The store: ``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri``, else
``sqlite:///<results>/mlflow.db`` with artifacts under ``<results>/mlartifacts``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger("qkov.tracking")

ENV_MODE = "QKOV_TRACKING_MODE"
ENV_URI = "QKOV_TRACKING_URI"
ENV_ARTIFACTS = "QKOV_TRACKING_ARTIFACTS"
ENV_TIMEOUT = "QKOV_TRACKING_TIMEOUT"
ENV_PREFIX = "QKOV_TRACKING_PREFIX"
ENV_WORKFLOW_RUN = "QKOV_WORKFLOW_RUN_ID"
ENV_PARENTS = "QKOV_MLFLOW_PARENT_RUNS"   # JSON {experiment name: parent run id}
ENV_GIT = "QKOV_GIT_COMMIT"
RECORD_VERSION = 1
PACKAGES = ("torch", "transformers", "numpy", "scipy", "statsmodels", "pandas", "snakemake",
            "hydra-core", "mlflow", "safetensors", "tokenizers")


# ----------------------------------------------------------------------------- settings

def resolve_uri(uri: str | None, results: str | Path) -> str:
    """MLFLOW_TRACKING_URI > tracking.uri > sqlite:///<abs results>/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if uri:
        return uri
    return f"sqlite:///{Path(results).resolve() / 'mlflow.db'}"


def default_artifacts(uri: str, results: str | Path) -> str | None:
    """Artifact root for experiments this workflow creates in a local sqlite store."""
    if uri.startswith("sqlite:"):
        return (Path(results).resolve() / "mlartifacts").as_uri()
    return None


def mlflow_experiment(prefix: str, experiment: str) -> str:
    return f"{prefix}/{experiment}"


def settings_from_env() -> dict:
    return {"mode": os.environ.get(ENV_MODE, "off"), "uri": os.environ.get(ENV_URI),
            "artifacts": os.environ.get(ENV_ARTIFACTS) or None,
            "timeout_s": float(os.environ.get(ENV_TIMEOUT, "60")),
            "prefix": os.environ.get(ENV_PREFIX, "qkov"),
            "workflow_run_id": os.environ.get(ENV_WORKFLOW_RUN),
            "parents": json.loads(os.environ.get(ENV_PARENTS) or "{}")}


def export_settings(mode: str, uri: str, artifacts: str | None, timeout_s: float,
                    prefix: str) -> None:
    """Put the settings where jobs (local or on a cluster) find them: the environment."""
    os.environ[ENV_MODE] = mode
    os.environ[ENV_URI] = uri
    os.environ[ENV_ARTIFACTS] = artifacts or ""
    os.environ[ENV_TIMEOUT] = str(timeout_s)
    os.environ[ENV_PREFIX] = prefix
    os.environ.setdefault(ENV_WORKFLOW_RUN, uuid.uuid4().hex)
    os.environ.setdefault(ENV_GIT, git_commit(Path(__file__).resolve().parents[2]))


# ----------------------------------------------------------------------------- provenance

def git_commit(repo: str | Path) -> str:
    """HEAD commit of repo, '+dirty' when tracked files differ; 'unknown' without git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        if not head:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b.c': 'value'} with JSON-ish leaf strings (MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj and any(isinstance(x, (dict, list)) for x in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix or "value"] = json.dumps(obj) if not isinstance(obj, str) else obj
    return out


# ----------------------------------------------------------------------------- records

def new_record(*, experiment: str, rule: str, run_name: str, params: dict, tags: dict,
               wildcards: dict) -> dict:
    s = settings_from_env()
    return {"record_version": RECORD_VERSION, "record_id": uuid.uuid4().hex,
            "workflow_run_id": s["workflow_run_id"],
            "mlflow_experiment": mlflow_experiment(s["prefix"], experiment),
            "experiment": experiment, "rule": rule, "run_name": run_name,
            "params": flatten(params), "metrics": {}, "artifacts": [],
            "tags": {"qkov.rule": rule, "qkov.experiment": experiment,
                     "qkov.wildcards": json.dumps(wildcards, sort_keys=True),
                     **{f"qkov.wildcard.{k}": str(v) for k, v in wildcards.items()},
                     "qkov.git_commit": os.environ.get(ENV_GIT) or "unknown",
                     "qkov.host": platform.node(), "qkov.python": platform.python_version(),
                     **{f"qkov.version.{k}": v for k, v in package_versions().items()},
                     **{k: str(v) for k, v in tags.items()}},
            "started": time.time(), "status": "pending", "mlflow": None}


def write_record(path: str | Path, record: dict) -> None:
    from interference.results import write_json

    write_json(path, record)


def read_record(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- MLflow calls

def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _retry(fn, attempts: int = 5, what: str = "MLflow call"):
    delay = 0.5
    for k in range(attempts):
        try:
            return fn()
        except Exception as err:  # sqlite "database is locked", HTTP errors, ...
            if k == attempts - 1:
                raise
            logger.warning("%s failed (%s: %s); retrying in %.1f s", what,
                           type(err).__name__, str(err)[:200], delay)
            time.sleep(delay)
            delay *= 2


def experiment_id(client, name: str, artifacts: str | None) -> str:
    def get_or_create():
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            loc = f"{artifacts}/{name.replace('/', '_')}" if artifacts else None
            return client.create_experiment(name, artifact_location=loc)
        except Exception:
            exp = client.get_experiment_by_name(name)   # another process won the race
            if exp is None:
                raise
            return exp.experiment_id
    return _retry(get_or_create, what=f"experiment {name!r}")


def init_store(uri: str, artifacts: str | None, experiments: list[str]) -> None:
    """Create the store's tables and the experiments, once: under a file lock beside a
    sqlite store, a fresh database is built under a temporary name and renamed into place
    (a crash or a concurrent start never leaves a half-made one), and an unusable database
    that holds no run (a crash during its creation by an older version) is moved aside and
    made again; the jobs' records stay pending until ``track`` logs them."""
    if not uri.startswith("sqlite:///"):
        client = _client(uri)
        for name in experiments:
            experiment_id(client, name, artifacts)
        return
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db.parent / f".{db.name}.init.lock")):
        if db.exists() and not _usable(db):
            _set_aside(db)
            _forget_engine(uri)
        if not db.exists():
            tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            _client(f"sqlite:///{tmp}").search_experiments(max_results=1)  # creates tables
            os.replace(tmp, db)
        client = _client(uri)
        for name in experiments:
            experiment_id(client, name, artifacts)


def _usable(db: Path) -> bool:
    """The sqlite store's schema is complete (MLflow's latest revision is stamped). Read
    with sqlite3, not MLflow: an MLflow connection to a broken file would stay open."""
    import sqlite3

    from mlflow.store.db.utils import _get_latest_schema_revision

    try:
        with contextlib.closing(sqlite3.connect(db)) as con:
            rows = con.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error as err:
        rows, why = [], str(err)
    else:
        why = f"schema version {rows[0][0] if rows else 'none'}"
    if rows and rows[0][0] == _get_latest_schema_revision():
        return True
    logger.warning("MLflow store %s is not usable (%s)", db, why)
    return False


def _forget_engine(uri: str) -> None:
    """Drop MLflow's cached connection to a store file that was moved aside (this process
    tried it before), so the new file is opened."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()
    except (ImportError, AttributeError):
        pass


def _set_aside(db: Path) -> None:
    """Move an unusable sqlite store aside, unless it holds runs (then stop: never lose one)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(db)) as con:
            n_runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.Error:
        n_runs = 0                     # no runs table: its creation never finished
    if n_runs:
        raise RuntimeError(f"MLflow store {db} holds {n_runs} runs but its schema is "
                           "incomplete or old; it was left as it is. Back it up and run "
                           f"`mlflow db upgrade sqlite:///{db}`, or move it away (the next run "
                           "makes a new one and `snakemake --forcerun track` logs every record)")
    aside = db.with_name(f"{db.name}.unusable-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(db, aside)
    print(f"qkov: the MLflow store {db} was left unusable by an interrupted creation and "
          f"held no run; moved to {aside.name} and made again", file=sys.stderr)


def start_parents(uri: str, artifacts: str | None, experiments: dict[str, str],
                  tags: dict, configs: dict[str, dict] | None = None) -> dict[str, str]:
    """One RUNNING parent run per MLflow experiment, with the experiment's composed config
    as params (``configs[exp]``); returns {experiment: run id}."""
    from mlflow.entities import Param

    client = _client(uri)
    out = {}
    for exp, mlflow_name in experiments.items():
        eid = experiment_id(client, mlflow_name, artifacts)
        run = _retry(lambda: client.create_run(eid, run_name=f"workflow {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                               tags={**tags, "qkov.kind": "workflow",
                                                     "qkov.experiment": exp}),
                     what="create parent run")
        rid = run.info.run_id
        params = [Param(k[:250], v[:6000]) for k, v in
                  sorted(flatten((configs or {}).get(exp, {})).items())]
        for k in range(0, len(params), 100):
            _retry(lambda: client.log_batch(rid, params=params[k:k + 100]), what="log params")
        out[exp] = rid
    return out


def end_parents(uri: str, parents: dict[str, str], status: str) -> None:
    client = _client(uri)
    for run_id in parents.values():
        try:
            run = client.get_run(run_id)
            if run.info.status == "RUNNING":
                _retry(lambda: client.set_terminated(run_id, status), what="end parent run")
        except Exception as err:
            logger.warning("could not end parent run %s: %s", run_id, err)


def find_runs(client, experiment_name: str, tag: str, value: str):
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                              max_results=10)


def log_record(uri: str, artifacts: str | None, record: dict, parent_run_id: str | None,
               status: str = "FINISHED") -> str:
    """Create the child run of a record (params, metrics, tags, artifacts) and end it with
    ``status``; returns its id. Idempotent: a run with the record's id that ended with
    ``status`` is reused, another one (unfinished, or FAILED before) replaced."""
    from mlflow.entities import Metric, Param, RunTag

    client = _client(uri)
    name = record["mlflow_experiment"]
    for run in find_runs(client, name, "qkov.record_id", record["record_id"]):
        if run.info.status == status:
            return run.info.run_id
        client.delete_run(run.info.run_id)
    eid = experiment_id(client, name, artifacts)
    tags = {**record["tags"], "qkov.record_id": record["record_id"],
            "qkov.workflow_run_id": str(record.get("workflow_run_id")), "qkov.kind": "job"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = _retry(lambda: client.create_run(eid, run_name=record["run_name"], tags=tags),
                 what="create run")
    rid = run.info.run_id
    ts = int(record.get("started", time.time()) * 1000)
    params = [Param(k[:250], v[:6000]) for k, v in sorted(record["params"].items())]
    metrics = [Metric(k[:250], float(v), ts, 0) for k, v in sorted(record["metrics"].items())
               if v is not None and _finite(v)]
    for k in range(0, len(params), 100):
        _retry(lambda: client.log_batch(rid, params=params[k:k + 100]), what="log params")
    for k in range(0, len(metrics), 500):
        _retry(lambda: client.log_batch(rid, metrics=metrics[k:k + 500]), what="log metrics")
    for art in record["artifacts"]:
        path = Path(art["path"])
        if path.is_file():
            _retry(lambda: client.log_artifact(rid, str(path), art.get("dir")),
                   what=f"log artifact {path.name}")
    _retry(lambda: client.set_terminated(rid, status), what="end run")
    return rid


def _has_run(client, run_id: str | None) -> bool:
    """The store holds a FINISHED run ``run_id`` (not one of a store made again since)."""
    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.status == "FINISHED"
    except Exception:
        return False


def _finite(v) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and abs(f) != float("inf")


def bounded(fn, timeout_s: float, name: str = "mlflow") -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, why)`` when fn raised or gave no answer within
    ``timeout_s`` (it runs in a daemon thread, so a hung MLflow never holds the job)."""
    box: dict = {}

    def work():
        try:
            box["value"] = fn()
        except Exception as err:  # MLflow never fails the job
            box["error"] = f"{type(err).__name__}: {err}"

    th = threading.Thread(target=work, daemon=True, name=name)
    th.start()
    th.join(timeout_s)
    if "value" in box:
        return box["value"], None
    return None, box.get("error", f"no answer within {timeout_s:.0f} s")


def log_with_timeout(record: dict, timeout_s: float | None = None) -> dict:
    """Direct mode: log the record as a child of this workflow run's parent, within
    timeout_s; on failure or timeout, or without a parent run (MLflow was down when the
    workflow started), the record stays pending and ``track`` logs it under its parent."""
    s = settings_from_env()
    if s["mode"] != "direct" or not s["uri"]:
        return record
    parent = s["parents"].get(record["experiment"])
    if not parent:
        record["mlflow_error"] = "no parent run (MLflow was unreachable at the start)"
        return record
    run_id, why = bounded(lambda: log_record(s["uri"], s["artifacts"], record, parent),
                          timeout_s if timeout_s is not None else s["timeout_s"], "mlflow-log")
    if why is None:
        record["status"] = "logged"
        record["mlflow"] = {"run_id": run_id, "uri": s["uri"], "parent_run_id": parent}
    else:
        record["status"] = "pending"
        record["mlflow_error"] = why
        logger.warning("MLflow logging deferred (%s); the track rule will log this record", why)
    return record


def log_failure(experiment: str, rule: str, run_name: str, params: dict, tags: dict,
                wildcards: dict, error: str) -> None:
    """Direct mode: a FAILED child run for a job that failed (its error as a tag); never
    raises, at most ``timeout_s`` (no record file: Snakemake removes a failed job's outputs)."""
    s = settings_from_env()
    parent = s["parents"].get(experiment)
    if s["mode"] != "direct" or not s["uri"] or not parent:
        return
    record = new_record(experiment=experiment, rule=rule, run_name=run_name, params=params,
                        tags={**tags, "qkov.error": error[:4000]}, wildcards=wildcards)
    _, why = bounded(lambda: log_record(s["uri"], s["artifacts"], record, parent, "FAILED"),
                     s["timeout_s"], "mlflow-failed")
    if why:
        logger.warning("could not record the failure in MLflow: %s", why)


def mark_failed(record: dict) -> None:
    """End a record's MLflow run as FAILED (its job failed after logging it)."""
    info = record.get("mlflow") or {}
    if info.get("run_id"):
        bounded(lambda: _client(info["uri"]).set_terminated(info["run_id"], "FAILED"),
                settings_from_env()["timeout_s"], "mlflow-failed")


# ----------------------------------------------------------------------------- ablation sweeps

def experiment_run(doc: dict, variant: str, results: Path, settings: dict) -> str | None:
    """The variant's MLflow parent run that holds its job runs: the one its tracking.json
    names when that is newer than its cells tables (nothing reran since), else this
    invocation's (its jobs run now)."""
    current = (settings.get("parents") or {}).get(variant)
    tracking_json = results / variant / "tracking.json"
    cells = [Path(a["variants"][variant]["cells_csv"]) for a in doc["analyses"].values()
             if variant in a["variants"]]
    try:
        if tracking_json.is_file() and all(tracking_json.stat().st_mtime >= c.stat().st_mtime
                                           for c in cells):
            return json.loads(tracking_json.read_text()).get("parent_run_id") or current
    except (OSError, ValueError):
        pass
    return current


def log_sweep(doc: dict, out: Path, settings: dict, lock_path: Path) -> dict:
    """MLflow: experiment ``<prefix>/ablations``, one parent run per sweep (its figures and
    tables as artifacts) and one child run per variant: params ``variant`` and the ablated
    settings (``ablation.<key>``), metrics per analysis (significant cells per block,
    Spearman and Jaccard against the baseline). Select the children and Compare."""
    from filelock import FileLock
    from mlflow.entities import Metric, Param

    from interference._tables import BLOCKS
    from interference.settings import param_value

    uri, prefix = settings["uri"], settings["prefix"]
    name = f"{prefix}/ablations"
    tags = {"qkov.sweep": doc["sweep"], "qkov.workflow_run_id": str(settings["workflow_run_id"]),
            "qkov.git_commit": os.environ.get(ENV_GIT) or "unknown"}
    with FileLock(str(lock_path)):
        client = _client(uri)
        eid = experiment_id(client, name, settings["artifacts"])
        parent = _retry(lambda: client.create_run(
            eid, run_name=f"sweep {doc['sweep']}",
            tags={**tags, "qkov.kind": "ablation_sweep", "qkov.baseline": doc["baseline"],
                  "qkov.variants": ",".join(doc["variants"])[:5000]}), what="create sweep run")
        pid = parent.info.run_id
        ts = int(time.time() * 1000)
        keys = sorted(set().union(*(set(a) for a in doc["ablated"].values())))
        client.log_batch(pid, params=[Param("variants", ",".join(doc["variants"])[:6000]),
                                      Param("baseline", doc["baseline"]),
                                      Param("ablated_keys", ",".join(keys)[:6000] or "none")],
                         metrics=[Metric(f"{pair}.spearman_{k}", a[f"spearman_{k}"], ts, 0)
                                  for pair, a in doc["analyses"].items() for k in ("min", "mean")
                                  if a[f"spearman_{k}"] is not None])
        for p in sorted(out.rglob("*")):
            if p.is_file() and p.suffix in (".png", ".pdf", ".csv", ".md", ".json") \
                    and not p.name.startswith(("mlflow.", "config.")):
                _retry(lambda: client.log_artifact(pid, str(p), str(p.parent.relative_to(out))
                                                   if p.parent != out else None),
                       what=f"log artifact {p.name}")
        children = {}
        for v in doc["variants"]:
            ctags = {**tags, "qkov.kind": "ablation_variant", "qkov.experiment": v,
                     "mlflow.parentRunId": pid}
            link = experiment_run(doc, v, out.parents[1], settings)
            if link:
                ctags["qkov.experiment_run_id"] = link
            run = _retry(lambda: client.create_run(eid, run_name=v, tags=ctags),
                         what="create variant run")
            rid = run.info.run_id
            params = [Param("variant", v), Param("baseline", doc["baseline"])]
            params += [Param(f"ablation.{k}"[:250], param_value(doc["ablated"][v].get(k))[:6000])
                       for k in keys]
            metrics = []
            for pair, a in doc["analyses"].items():
                r = a["variants"].get(v)
                if r is None:
                    continue
                vals = {"n_significant": r["n_significant"], "n_q_significant": r["n_q_significant"],
                        "spearman_vs_baseline": r["spearman_vs_baseline"],
                        "jaccard_vs_baseline": r["jaccard_vs_baseline"],
                        **{f"{b}.n_significant": r["n_significant_by_block"][b] for b in BLOCKS}}
                metrics += [Metric(f"{pair}.{k}", float(x), ts, 0) for k, x in vals.items()
                            if x is not None and _finite(x)]
            client.log_batch(rid, params=params, metrics=metrics)
            client.set_terminated(rid, "FINISHED")
            children[v] = rid
        client.set_terminated(pid, "FINISHED")
    return {"experiment": name, "parent_run_id": pid, "variant_run_ids": children}


# ----------------------------------------------------------------------------- track rule

def sync(record_paths: list[str], experiment: str, summary: dict | None,
         summary_artifacts: list[str], out_path: str | Path, config: dict | None = None) -> dict:
    """Log every pending record (and the experiment's summary on the parent run).

    The parent: this workflow run's (direct mode) or one created here, tagged with the
    workflow run id (deferred mode, or direct mode when MLflow was down at start).
    """
    from interference.results import write_json

    s = settings_from_env()
    result = {"mode": s["mode"], "uri": s["uri"], "experiment": experiment,
              "workflow_run_id": s["workflow_run_id"], "records": {}, "parent_run_id": None}
    if s["mode"] == "off" or not s["uri"]:
        for p in record_paths:
            result["records"][p] = {"status": read_record(p).get("status"), "run_id": None}
        write_json(out_path, result)
        return result
    client = _client(s["uri"])
    name = mlflow_experiment(s["prefix"], experiment)
    parent = s["parents"].get(experiment)
    created_parent = False
    if not parent:
        found = find_runs(client, name, "qkov.workflow_parent_of", str(s["workflow_run_id"]))
        if found:
            parent = found[0].info.run_id
        else:
            parent = start_parents(s["uri"], s["artifacts"], {experiment: name}, {
                "qkov.workflow_parent_of": str(s["workflow_run_id"]),
                "qkov.git_commit": os.environ.get(ENV_GIT) or "unknown",
                "qkov.tracking_mode": s["mode"]}, {experiment: config or {}})[experiment]
            created_parent = True
    result["parent_run_id"] = parent
    for p in record_paths:
        rec = read_record(p)
        info = rec.get("mlflow") or {}
        if rec.get("status") == "logged" and _has_run(client, info.get("run_id")):
            result["records"][p] = {"status": "logged", "run_id": info["run_id"]}
            continue
        rid = log_record(s["uri"], s["artifacts"], rec,
                         parent if rec.get("experiment") == experiment else None)
        result["records"][p] = {"status": "logged_by_track", "run_id": rid}
    if summary:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(k[:250], float(v), ts, 0) for k, v in sorted(summary.items())
                   if _finite(v)]
        for k in range(0, len(metrics), 500):
            _retry(lambda: client.log_batch(parent, metrics=metrics[k:k + 500]),
                   what="log summary")
    for art in summary_artifacts:
        if Path(art).is_file():
            _retry(lambda: client.log_artifact(parent, art), what="log summary artifact")
    if created_parent:
        client.set_terminated(parent, "FINISHED")
    write_json(out_path, result)
    return result
