"""Tracking settings: what every job needs to know about MLflow, resolved once per workflow
run, written to one file (``<results>/.qkov/run.json``) and handed to each job as a declared
input; plus provenance (git commit, package versions) and the params flattener."""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

RECORD_VERSION = 1
MODES = ("auto", "direct", "deferred", "off")
PACKAGES = ("torch", "transformers", "numpy", "scipy", "statsmodels", "pandas", "snakemake",
            "hydra-core", "mlflow", "safetensors", "tokenizers")


@dataclass(frozen=True)
class TrackingSettings:
    """``mode``: auto | direct | deferred | off (``auto`` is resolved at the workflow's start);
    ``uri``: the MLflow store; ``artifacts``: artifact root of experiments made here (or
    None); ``timeout_s``: the most a job waits for MLflow; ``prefix``: MLflow experiment
    names are ``<prefix>/<experiment>``; ``workflow_run_id``: this invocation; ``git_commit``;
    ``parents``: {experiment: parent run id} (direct mode, once the parents exist)."""

    mode: str = "off"
    uri: str | None = None
    artifacts: str | None = None
    timeout_s: float = 60.0
    prefix: str = "qkov"
    workflow_run_id: str | None = None
    git_commit: str = "unknown"
    parents: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"tracking mode {self.mode!r} is not one of {MODES}")
        if not float(self.timeout_s) > 0:
            raise ValueError(f"tracking timeout_s must be > 0, got {self.timeout_s!r}")

    def replace(self, **changes) -> "TrackingSettings":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "TrackingSettings":
        unknown = set(doc) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown tracking settings {sorted(unknown)}")
        return cls(**doc)


def new_settings(mode: str, uri: str, artifacts: str | None, timeout_s: float,
                 prefix: str) -> TrackingSettings:
    """Settings of a new workflow run: a fresh run id and this checkout's commit."""
    return TrackingSettings(mode=mode, uri=uri, artifacts=artifacts, timeout_s=float(timeout_s),
                            prefix=prefix, workflow_run_id=uuid.uuid4().hex,
                            git_commit=git_commit(Path(__file__).resolve().parents[3]))


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


# ----------------------------------------------------------------------------- run file

def write_run_file(path: str | Path, settings: TrackingSettings, jobs: dict) -> None:
    """Write (atomically) the run file: ``{"tracking": settings, "jobs": jobs}`` where
    ``jobs`` is :meth:`qkov_pipeline.plan.Plan.job_meta` (owners, execution settings)."""
    from interference.results import write_json

    write_json(path, {"tracking": settings.to_dict(), "jobs": jobs})


def read_run_file(path: str | Path) -> tuple[TrackingSettings, dict]:
    """(tracking settings, job meta) from a run file written by :func:`write_run_file`."""
    doc = json.loads(Path(path).read_text())
    return TrackingSettings.from_dict(doc["tracking"]), doc["jobs"]


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

