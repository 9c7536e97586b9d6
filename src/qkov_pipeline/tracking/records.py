"""Job records: the JSON a job writes next to its outputs (params, metrics, tags, artifact
digests) and its MLflow child run, logged within a time bound (direct mode) or left pending
for the ``track`` rule."""
from __future__ import annotations

import json
import logging
import platform
import time
import uuid
from pathlib import Path

from .settings import (RECORD_VERSION, TrackingSettings, flatten, mlflow_experiment,
                       package_versions)
from .store import _client, _finite, _retry, bounded, experiment_id, find_runs

logger = logging.getLogger("qkov.tracking")


def new_record(settings: TrackingSettings, *, experiment: str, rule: str, run_name: str, params: dict, tags: dict,
               wildcards: dict) -> dict:
    s = settings
    return {"record_version": RECORD_VERSION, "record_id": uuid.uuid4().hex,
            "workflow_run_id": s.workflow_run_id,
            "mlflow_experiment": mlflow_experiment(s.prefix, experiment),
            "experiment": experiment, "rule": rule, "run_name": run_name,
            "params": flatten(params), "metrics": {}, "artifacts": [],
            "tags": {"qkov.rule": rule, "qkov.experiment": experiment,
                     "qkov.wildcards": json.dumps(wildcards, sort_keys=True),
                     **{f"qkov.wildcard.{k}": str(v) for k, v in wildcards.items()},
                     "qkov.git_commit": s.git_commit,
                     "qkov.host": platform.node(), "qkov.python": platform.python_version(),
                     **{f"qkov.version.{k}": v for k, v in package_versions().items()},
                     **{k: str(v) for k, v in tags.items()}},
            "started": time.time(), "status": "pending", "mlflow": None}


def write_record(path: str | Path, record: dict) -> None:
    from interference.results import write_json

    write_json(path, record)


def read_record(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def log_record(uri: str, artifacts: str | None, record: dict, parent_run_id: str | None,
               status: str = "FINISHED") -> str:
    """Create the child run of a record (params, metrics, tags, artifacts) and end it with
    ``status``; returns its id. Idempotent: a run with the record's id that ended with
    ``status`` is reused, another one (unfinished, or FAILED before) replaced."""
    from mlflow.entities import Metric, Param

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


def start_logging_process(settings: TrackingSettings, experiment: str):
    """Direct mode with a parent run: a :class:`~.process.LoggingProcess` that warms up
    while the job works; None otherwise, or when it cannot start (the job then logs in its
    own process)."""
    from .process import LoggingProcess, ProcessGone

    s = settings
    if s.mode != "direct" or not s.uri or not s.parents.get(experiment):
        return None
    try:
        return LoggingProcess(s.uri, s.artifacts, mlflow_experiment(s.prefix, experiment))
    except (OSError, ProcessGone) as err:      # no python to start; it died at once
        logger.warning("could not start the MLflow logging process (%s); logging in the job",
                       err)
        return None


def _log_via(process, settings: TrackingSettings, record: dict, parent: str,
             status: str) -> str:
    """:func:`log_record` through ``process`` (:func:`start_logging_process`), or in this
    process when there is none or it ended without an answer (idempotent: a run it logged
    before it ended is reused)."""
    from .process import ProcessGone

    if process is not None:
        try:
            return process.log(record, parent, status)
        except ProcessGone as err:
            logger.warning("the MLflow logging process ended (%s); logging in the job", err)
    return log_record(settings.uri, settings.artifacts, record, parent, status)


def log_with_timeout(settings: TrackingSettings, record: dict,
                     timeout_s: float | None = None, via=None) -> dict:
    """Direct mode: log the record as a child of this workflow run's parent, within
    timeout_s, through the logging process ``via`` when given (:func:`start_logging_process`).
    On failure or timeout, or without a parent run (MLflow was down when the workflow
    started), the record stays pending and ``track`` logs it under its parent."""
    s = settings
    if s.mode != "direct" or not s.uri:
        return record
    parent = s.parents.get(record["experiment"])
    if not parent:
        record["mlflow_error"] = "no parent run (MLflow was unreachable at the start)"
        return record
    run_id, why = bounded(lambda: _log_via(via, s, record, parent, "FINISHED"),
                          timeout_s if timeout_s is not None else s.timeout_s, "mlflow-log")
    if why is None:
        record["status"] = "logged"
        record["mlflow"] = {"run_id": run_id, "uri": s.uri, "parent_run_id": parent}
    else:
        record["status"] = "pending"
        record["mlflow_error"] = why
        logger.warning("MLflow logging deferred (%s); the track rule will log this record", why)
    return record


def log_failure(settings: TrackingSettings, experiment: str, rule: str, run_name: str,
                params: dict, tags: dict, wildcards: dict, error: str, via=None) -> None:
    """Direct mode: a FAILED child run for a job that failed (its error as a tag), through
    the logging process ``via`` when given; never raises, at most ``timeout_s`` (no record
    file: Snakemake removes a failed job's outputs)."""
    s = settings
    parent = s.parents.get(experiment)
    if s.mode != "direct" or not s.uri or not parent:
        return
    record = new_record(s, experiment=experiment, rule=rule, run_name=run_name, params=params,
                        tags={**tags, "qkov.error": error[:4000]}, wildcards=wildcards)
    _, why = bounded(lambda: _log_via(via, s, record, parent, "FAILED"), s.timeout_s,
                     "mlflow-failed")
    if why:
        logger.warning("could not record the failure in MLflow: %s", why)


def mark_failed(settings: TrackingSettings, record: dict) -> None:
    """End a record's MLflow run as FAILED (its job failed after logging it)."""
    info = record.get("mlflow") or {}
    if info.get("run_id"):
        bounded(lambda: _client(info["uri"]).set_terminated(info["run_id"], "FAILED"),
                settings.timeout_s, "mlflow-failed")


