"""What the Snakefile does around the jobs: tracking settings, onstart/onsuccess/onerror,
and the ``track`` rule.
"""
from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

from . import tracking
from .jobs import offline_environment

logger = logging.getLogger("qkov.hooks")


RUN_FILE = ".qkov/run.json"


def run_file(plan) -> str:
    """Path of the run file (tracking settings + job meta), an input of every job."""
    return f"{plan.results}/{RUN_FILE}"


def configure_tracking(plan, main: bool = True) -> tracking.TrackingSettings:
    """Resolve the tracking settings (from the first experiment) of this invocation.

    ``main`` (the process that schedules the jobs) writes the run file when there is none,
    so that the jobs' input exists while Snakemake plans; :func:`on_start` (a real run, not
    a dry run) writes it again with the final settings before any job starts. A job that
    re-reads the Snakefile on a cluster node (main=False) writes nothing: it reads the run
    file the scheduling process wrote."""
    first = next(iter(plan.experiments.values()))
    t = first["tracking"]
    for exp, cfg in plan.experiments.items():
        if cfg["tracking"] != t:
            print(f"qkov: experiment {exp!r} has other tracking settings than "
                  f"{first['experiment']!r}; using the latter's", file=sys.stderr)
    # offline (no telemetry) in Snakemake's process and every job it starts, before MLflow
    # is imported; a tracking server that does not answer never stalls the workflow
    offline_environment()
    uri = tracking.resolve_uri(t["uri"], plan.results)
    settings = tracking.new_settings(t["mode"], uri, tracking.default_artifacts(uri, plan.results),
                                     t["timeout_s"], t["experiment_prefix"])
    if main and not Path(run_file(plan)).exists():
        tracking.write_run_file(run_file(plan), settings, plan.job_meta())
    return settings


def resolve_mode(settings: tracking.TrackingSettings, local_exec: bool) -> str:
    """``auto``: direct when jobs run on this machine or MLflow is a server; deferred when
    they run on a cluster and the store is a file (sqlite on a shared file system)."""
    if settings.mode != "auto":
        return settings.mode
    return "direct" if local_exec or not settings.uri.startswith("sqlite:") else "deferred"


def on_start(plan, settings: tracking.TrackingSettings,
             local_exec: bool = True) -> tracking.TrackingSettings:
    """Fix the tracking mode for the jobs, and in direct mode initialise the store ONCE (a
    fresh sqlite database must not be created by concurrent jobs) and open one parent run
    per experiment for this workflow run; rewrite the run file with the result (jobs read
    it when they start, after this). Returns the final settings."""
    settings = settings.replace(mode=resolve_mode(settings, local_exec))
    names = {exp: tracking.mlflow_experiment(settings.prefix, exp) for exp in plan.experiments}
    if settings.mode == "deferred":
        # the track rules (local, on this host) write; create the store here, once
        _, err = tracking.bounded(lambda: tracking.init_store(
            settings.uri, settings.artifacts, list(names.values())),
            max(settings.timeout_s, 60))
        print("qkov: MLflow tracking deferred: the track rule logs the job records"
              + (f" (store not reachable now: {err})" if err else ""), file=sys.stderr)
    elif settings.mode == "direct":
        settings = settings.replace(parents=_start_parents(plan, settings, names))
    tracking.write_run_file(run_file(plan), settings, plan.job_meta())
    return settings


def _start_parents(plan, settings: tracking.TrackingSettings, names: dict) -> dict:
    """{experiment: parent run id} of this workflow run, {} when MLflow does not answer."""
    def start():
        tracking.init_store(settings.uri, settings.artifacts, list(names.values()))
        return tracking.start_parents(settings.uri, settings.artifacts, names, {
            "qkov.workflow_parent_of": str(settings.workflow_run_id),
            "qkov.git_commit": settings.git_commit,
            "qkov.tracking_mode": "direct", "qkov.argv": " ".join(sys.argv)[:5000]},
            {exp: parent_params(cfg) for exp, cfg in plan.experiments.items()})

    parents, err = tracking.bounded(start, max(settings.timeout_s, 60))
    if parents:
        print(f"qkov: MLflow store {settings.uri}; parent runs {parents}", file=sys.stderr)
        return parents
    print(f"qkov: WARNING: MLflow is not reachable at {settings.uri} ({err}); jobs keep "
          "their records and the track rule logs them", file=sys.stderr)
    return {}


def parent_params(cfg: dict) -> dict:
    """The composed experiment config as the parent run's params (execution settings out)."""
    return {k: v for k, v in cfg.items() if k != "resources"}


def on_end(plan, ok: bool) -> None:
    """End this workflow run's parent runs (direct mode), named in the run file."""
    try:
        settings, _ = tracking.read_run_file(run_file(plan))
    except (OSError, ValueError, KeyError) as err:   # the run never got as far as writing it
        logger.warning("no run file to end the parent runs from: %s", err)
        return
    if settings.mode != "direct" or not settings.parents:
        return
    tracking.bounded(lambda: tracking.end_parents(settings.uri, settings.parents,
                                                  "FINISHED" if ok else "FAILED"),
                     settings.timeout_s)


def run_track(smk) -> None:
    """The ``track`` rule: log pending records and the experiment summary on the parent run."""
    from .jobs import _setup_logging, read_json

    _setup_logging(smk.log[0])
    exp = smk.wildcards["exp"]
    s, _ = tracking.read_run_file(smk.input.run)
    summary = read_json(smk.input.summary)
    logger.info("tracking mode %s, store %s, %d records", s.mode, s.uri,
                len(smk.input.records))
    from filelock import FileLock

    lock = FileLock(str(Path(smk.output.tracking).parents[1] / ".mlflow.lock"))
    try:
        with lock:   # one writer at a time (several experiments' track rules)
            result = tracking.sync(s, list(smk.input.records), exp, summary.get("metrics", {}),
                                   [smk.input.summary, smk.input.md], smk.output.tracking,
                                   config=json.loads(smk.params.slice))
    except Exception:
        msg = traceback.format_exc()
        if s.mode == "deferred":
            logger.error("logging the records to MLflow failed (results are complete; rerun "
                         "to retry):\n%s", msg)
            raise
        logger.warning("MLflow sync failed; records stay pending (rerun with "
                       "`--forcerun track` to retry):\n%s", msg)
        from interference.results import write_json

        write_json(smk.output.tracking, {"mode": s.mode, "uri": s.uri, "status": "error",
                                         "error": msg.splitlines()[-1], "experiment": exp})
        return
    n_new = sum(1 for r in result["records"].values() if r["status"] == "logged_by_track")
    logger.info("parent run %s; %d records, %d logged now", result.get("parent_run_id"),
                len(result["records"]), n_new)
    Path(smk.output.tracking).touch()
