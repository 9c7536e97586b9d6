"""MLflow tracking of the workflow: one parent run per workflow run, one child run per job.

Every job writes a RECORD (JSON, next to its outputs): params (its resolved config slice,
flattened), metrics, tags and artifact paths. What happens to it depends on the mode:

- ``direct`` (default): the job logs the record as a child run right away, bounded by
  ``timeout_s``, through a process started with the job that has imported MLflow and
  opened the store meanwhile (:mod:`.process`); if MLflow is slow or failing the job
  still succeeds and the record stays ``pending``. The parent run is created once,
  before any job starts (Snakefile ``onstart``), which also initialises a fresh sqlite
  store, so concurrent jobs never race on its creation.
- ``deferred``: jobs only write records; the local rule ``track`` logs every pending
  record at the end (one writer: safe where sqlite on a shared file system is not).
- ``off``: records only.

In every mode ``track`` (the last rule) logs what is still pending, idempotently: a
record's ``record_id`` is a tag of its run, so nothing is logged twice.

The settings (:class:`TrackingSettings`) reach a job only through its declared input
``run`` (the run file, :func:`read_run_file`), never through the environment.

The store: ``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri``, else
``sqlite:///<results>/mlflow.db`` with artifacts under ``<results>/mlartifacts``.

Modules: :mod:`.settings` (settings, run file, provenance), :mod:`.store` (client,
retries, bounded calls, store creation, parent runs), :mod:`.records` (job records and
their child runs), :mod:`.process` (the process that imports MLflow while a job works and
logs its record), :mod:`.replay` (the ``track`` rule), :mod:`.sweep` (ablation sweeps).
"""
from .records import (log_failure, log_record, log_with_timeout, mark_failed, new_record,
                      read_record, start_logging_process, write_record)
from .replay import sync
from .settings import (MODES, PACKAGES, RECORD_VERSION, TrackingSettings, default_artifacts,
                       flatten, git_commit, mlflow_experiment, new_settings, package_versions,
                       read_run_file, resolve_uri, write_run_file)
from .store import (bounded, end_parents, experiment_id, find_runs, init_store,
                    start_parents)
from .sweep import experiment_run, log_sweep, record_sweep

__all__ = ["MODES", "PACKAGES", "RECORD_VERSION", "TrackingSettings", "bounded",
           "default_artifacts", "end_parents", "experiment_id", "experiment_run", "find_runs",
           "flatten", "git_commit", "init_store", "log_failure", "log_record", "log_sweep",
           "log_with_timeout", "mark_failed", "mlflow_experiment", "new_record",
           "new_settings", "package_versions", "read_record", "read_run_file", "resolve_uri",
           "record_sweep", "start_logging_process", "start_parents", "sync", "write_record",
           "write_run_file"]
