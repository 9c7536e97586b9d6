"""The MLflow store: client calls with retries, one bounded-call helper, the store's
one-time creation (under a file lock, never half made), experiments and parent runs."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .settings import flatten

logger = logging.getLogger("qkov.tracking")


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


