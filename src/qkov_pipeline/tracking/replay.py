"""The ``track`` rule's replay: log every record still pending, idempotently, under the
workflow run's parent run, and the experiment's summary on that parent."""
from __future__ import annotations

import time
from pathlib import Path

from .records import log_record, read_record
from .settings import TrackingSettings, mlflow_experiment
from .store import _client, _finite, _has_run, _retry, find_runs, start_parents


def sync(settings: TrackingSettings, record_paths: list[str], experiment: str, summary: dict | None,
         summary_artifacts: list[str], out_path: str | Path, config: dict | None = None) -> dict:
    """Log every pending record (and the experiment's summary on the parent run).

    The parent: this workflow run's (direct mode) or one created here, tagged with the
    workflow run id (deferred mode, or direct mode when MLflow was down at start).
    """
    from interference.results import write_json

    s = settings
    result = {"mode": s.mode, "uri": s.uri, "experiment": experiment,
              "workflow_run_id": s.workflow_run_id, "records": {}, "parent_run_id": None}
    if s.mode == "off" or not s.uri:
        for p in record_paths:
            result["records"][p] = {"status": read_record(p).get("status"), "run_id": None}
        write_json(out_path, result)
        return result
    client = _client(s.uri)
    name = mlflow_experiment(s.prefix, experiment)
    parent = s.parents.get(experiment)
    created_parent = False
    if not parent:
        found = find_runs(client, name, "qkov.workflow_parent_of", str(s.workflow_run_id))
        if found:
            parent = found[0].info.run_id
        else:
            parent = start_parents(s.uri, s.artifacts, {experiment: name}, {
                "qkov.workflow_parent_of": str(s.workflow_run_id),
                "qkov.git_commit": s.git_commit,
                "qkov.tracking_mode": s.mode}, {experiment: config or {}})[experiment]
            created_parent = True
    result["parent_run_id"] = parent
    for p in record_paths:
        rec = read_record(p)
        info = rec.get("mlflow") or {}
        if rec.get("status") == "logged" and _has_run(client, info.get("run_id")):
            result["records"][p] = {"status": "logged", "run_id": info["run_id"]}
            continue
        rid = log_record(s.uri, s.artifacts, rec,
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
