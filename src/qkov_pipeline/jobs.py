"""The frame every workflow job runs in: logging, threads, device (and GPU locks), resolved
config, record, timing.

A stage script is two lines::

    from qkov_pipeline.jobs import run_stage
    run_stage(snakemake, "collect")

:func:`run_stage` builds a :class:`Job` from the ``snakemake`` object (its ``params.slice``
is the rule's resolved config slice, canonical JSON; its ``input.run`` the run file with the
tracking and execution settings, see :mod:`qkov_pipeline.hooks`), and calls
``qkov_pipeline.stages.<stage>.run(job)``. Around it, the job

- logs to the rule's log file (and stderr), with a header naming the rule, wildcards,
  config hash, threads and device;
- fixes torch's thread count from the config (``resources.<rule>.threads``), not from
  what the scheduler granted, so equal configs give bitwise-equal results;
- runs offline (:func:`offline_environment`: no telemetry, no model hub);
- checks its inputs against the sizes and digests their jobs recorded
  (:func:`check_inputs`) and stops naming the file and the rule to force when one changed;
- writes the resolved config next to its outputs (``output.config``) before running;
- writes its tracking record (``output.record``) after success, with the size and digest
  of every output, logging it to MLflow in direct mode (never failing the job because of
  MLflow); a failed job is a FAILED run.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from . import tracking
from .plan import digest

logger = logging.getLogger("qkov")

# a collect shard's and a layer chunk's numbers go into the run of the job that gathers
# them (collect, scores): when they succeed they log no MLflow run of their own (a failure
# is still a FAILED run)
RULES_WITHOUT_RUNS = ("collect_shard", "chunk_scores")


class Job:
    """What a stage sees: inputs, outputs, its config slice and execution settings.

    Attributes: ``rule``, ``wildcards`` (dict), ``slice`` (the resolved config slice),
    ``config_hash``, ``experiment`` (whose MLflow run it belongs to), ``exec`` (the rule's
    ``resources`` entry: threads, device, gradient_memory_mb, ...), ``tracking`` (the
    :class:`~qkov_pipeline.tracking.TrackingSettings`), ``input``/``output`` (snakemake's
    named lists), ``metrics`` / ``artifacts`` / ``tags`` for the record,
    ``logging_process`` (the process that logs the record as an MLflow run,
    :mod:`qkov_pipeline.tracking.process`; None for ``RULES_WITHOUT_RUNS``), ``held_locks``
    (GPU lock files held for the job's lifetime).

    Everything but the config slice comes from the declared input ``run``, the run file
    (:func:`qkov_pipeline.tracking.read_run_file`): nothing from the environment.
    """

    def __init__(self, smk):
        self.smk = smk
        self.rule = smk.rule
        self.wildcards = {k: v for k, v in smk.wildcards.items()}
        self.slice = json.loads(smk.params.slice)
        self.config_hash = digest(self.slice)
        run = getattr(smk.input, "run", None)
        if not run:
            raise ValueError(f"rule {self.rule} declares no input 'run' (the run file "
                             "with the tracking and execution settings; see the Snakefile)")
        self.tracking, self.meta = tracking.read_run_file(run)
        key = self.wildcards.get("key")
        self.experiment = self.wildcards.get("exp") or self.meta["owners"].get(key, "default")
        self.exec = self.exec_of(self.rule)
        self.threads = int(self.exec.get("threads", smk.threads))
        self.input, self.output = smk.input, smk.output
        self.metrics: dict[str, float] = {}
        self.artifacts: list[dict] = []
        self.tags: dict[str, str] = {}
        self.record: dict | None = None      # once written: the job's tracking record
        self.logging_process = None     # tracking.start_logging_process's, while it runs
        self.held_locks: list = []
        self.t0 = time.time()

    def exec_of(self, rule: str) -> dict:
        """``resources.<rule>`` of the job's experiment (execution settings of ``rule``)."""
        return dict(self.meta["exec"].get(self.experiment, {}).get(rule, {}))

    # -- helpers for stages -----------------------------------------------------------
    def device(self) -> str:
        """'cpu' or 'cuda' from resources.<rule>.device (auto | cpu | cuda)."""
        from interference.device import resolve_device

        return resolve_device(self.exec.get("device", "auto"),
                              f"rule {self.rule}: resources.{self.rule}.device")

    def artifact(self, path, directory: str | None = None) -> None:
        self.artifacts.append({"path": str(path), "dir": directory})

    def metric(self, name: str, value) -> None:
        try:
            self.metrics[name] = float(value)
        except (TypeError, ValueError):
            pass

    def timed(self, name: str):
        job = self

        class _T:
            def __enter__(self_):
                self_.t = time.time()
                logger.info("%s ...", name)

            def __exit__(self_, *exc):
                dt = time.time() - self_.t
                job.metric(f"time.{name}_s", dt)
                if exc[0] is None:
                    logger.info("%s done in %.1f s", name, dt)
        return _T()

    @property
    def run_name(self) -> str:
        parts = [self.rule] + [str(v) for v in self.wildcards.values()]
        return " ".join(parts)


def _setup_logging(log_path: str) -> None:
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.handlers[:] = []
    fh = logging.FileHandler(log_path, mode="w")
    fh.setFormatter(fmt)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    root.addHandler(fh)
    root.addHandler(sh)
    root.setLevel(logging.INFO)
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)


def write_resolved_config(job: Job) -> None:
    import yaml

    from interference.results import SCHEMA_VERSION, atomic_path

    doc = {"rule": job.rule, "wildcards": job.wildcards, "experiment": job.experiment,
           "config_hash": job.config_hash, "schema_version": SCHEMA_VERSION,
           "execution": job.exec, "config": job.slice}
    with atomic_path(job.output.config) as tmp:
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False, width=100))


def run_stage(smk, stage: str) -> None:
    """Run ``qkov_pipeline.stages.<stage>.run(job)`` inside the job frame."""
    offline_environment()
    job = Job(smk)
    if job.rule not in RULES_WITHOUT_RUNS:      # imports MLflow while the job works
        job.logging_process = tracking.start_logging_process(job.tracking, job.experiment)
    set_freed_memory(job.exec.get("freed_memory", "return"))
    # Thread counts come from the config (resources.<rule>.threads), not from what the
    # scheduler granted: set before numpy / torch are imported, and for torch explicitly.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(job.threads)
    _setup_logging(smk.log[0])
    logger.info("rule %s  wildcards %s", job.rule, job.wildcards)
    logger.info("experiment %s  config hash %s  threads %d (scheduler granted %d)",
                job.experiment, job.config_hash, job.threads, smk.threads)
    job.tags.update({"qkov.config_hash": job.config_hash, "qkov.threads": job.threads})
    try:
        check_inputs(job)
        write_resolved_config(job)
        module = importlib.import_module(f"qkov_pipeline.stages.{stage}")
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(job.threads)
        module.run(job)
        job.metric("time.total_s", time.time() - job.t0)
        job.artifact(job.output.config, "config")
        finish(job)
    except BaseException as err:
        logger.error("rule %s failed:\n%s", job.rule, traceback.format_exc())
        if job.record and job.record.get("mlflow"):   # MLflow logged it, then the job failed
            tracking.mark_failed(job.tracking, job.record)
        else:
            tracking.log_failure(job.tracking, job.experiment, job.rule, job.run_name,
                                 job.slice, job.tags, job.wildcards,
                                 f"{type(err).__name__}: {err}", via=job.logging_process)
        raise
    finally:
        if job.logging_process is not None:
            job.logging_process.close()


# blocks at least this large are mapped on their own and unmapped when freed
MMAP_THRESHOLD_BYTES = 8 * 2**20
FREED_MEMORY = ("return", "keep")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4   # glibc's mallopt params


def set_freed_memory(policy: str = "return", threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """What the C heap does with large freed blocks (``resources.<rule>.freed_memory``;
    glibc's mallopt; False where the C library is not glibc, which then keeps its own
    policy):

    - 'return': each block of ``threshold`` bytes or more is mapped on its own and given
      back to the system when freed. glibc's default raises its threshold after each
      large free, up to 32 MB, and keeps what is freed below it, so a job that builds and
      frees activations micro-batch after micro-batch held GBs it no longer used
      (benchmarks/RESULTS.md, "Heap retention": the collect stage's peak cut by a quarter
      at the same speed).
    - 'keep': nothing is mapped on its own and the heap is trimmed only above 2 GB free
      at its top, so a freed block is reused by the next one of its size. Each block made
      afresh costs a page fault per 4 KB; a scoring job makes and frees the same blocks
      once per (layer, block) and set of samples (the default run's scoring job: 36.3 ->
      20.0 s, bitwise the same scores; RESULTS.md, session 19). Resident memory stays
      near the job's peak until it ends.
    """
    import ctypes
    import ctypes.util

    if policy not in FREED_MEMORY:
        raise ValueError(f"freed_memory must be one of {FREED_MEMORY}, got {policy!r}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if policy == "return":
            return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))       # mallopt takes a C int
    except (OSError, AttributeError):
        return False


def offline_environment() -> None:
    """No phone-home from any process the workflow starts: Hugging Face offline, MLflow's
    telemetry off (mlflow >= 3.2 reads MLFLOW_DISABLE_TELEMETRY / DO_NOT_TRACK), and a
    tracking server that does not answer never stalls a job for minutes."""
    for var, value in OFFLINE_ENV.items():
        os.environ.setdefault(var, value)


OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false",
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def finish(job: Job) -> None:
    """Write the job's record: its metrics, and the size and digest of every output (the
    next job checks them, :func:`check_inputs`); written pending first, so an MLflow run
    never exists for a job whose record could not be written."""
    from interference.results import output_digests

    record = tracking.new_record(job.tracking, experiment=job.experiment, rule=job.rule,
                                 run_name=job.run_name, params=job.slice,
                                 tags=job.tags, wildcards=job.wildcards)
    record["metrics"] = job.metrics
    record["artifacts"] = job.artifacts
    record["finished"] = time.time()
    where = Path(job.output.record).parent
    record["outputs"] = output_digests([p for p in job.output if p != job.output.record], where)
    tracking.write_record(job.output.record, record)
    job.record = record if job.rule in RULES_WITHOUT_RUNS else \
        tracking.log_with_timeout(job.tracking, record, via=job.logging_process)
    tracking.write_record(job.output.record, record)
    logger.info("finished in %.1f s (MLflow record: %s)", time.time() - job.t0,
                record["status"])


def check_inputs(job: Job) -> None:
    """Verify every input against the size and digest its producing job recorded (in the
    ``mlflow.<rule>.json`` beside it); a missing, truncated or changed file stops the job
    naming the file, what was expected and found, and ``snakemake --forcerun <rule>``."""
    from interference.results import size_text, verify_inputs

    t0 = time.time()
    n_files, n_bytes = verify_inputs(list(job.input))
    job.metric("time.verify_inputs_s", time.time() - t0)
    if n_files:
        logger.info("verified %d input files (%s) in %.2f s", n_files, size_text(n_bytes),
                    time.time() - t0)


def read_json(path) -> Any:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- devices

def set_threads(job: Job, ex: dict) -> int:
    """torch's (and the BLAS libraries') thread count from ``ex["threads"]`` (a rule's
    resources), else the job's threads."""
    import torch

    threads = int(ex.get("threads", job.threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)
    return threads


def acquire_gpu(ids: list[str], held: list, preferred: int = 0,
                lock_dir: str | Path | None = None, poll_s: float = 1.0) -> int:
    """Index (into ``ids``, the visible GPUs) of a GPU no other qkov job on this host holds.

    One lock file per GPU (``fcntl.flock``, released when its file is closed or the process
    ends, also when it is killed); tries ``preferred`` first, then the next ones; waits while
    all are taken. The open lock file is appended to ``held`` (the caller keeps it for as
    long as it uses the GPU, e.g. :attr:`Job.held_locks`).
    ``lock_dir``: ``$QKOV_GPU_LOCK_DIR`` or ``<tmp>/qkov-gpu-locks-<uid>``.
    """
    import fcntl

    lock_dir = Path(lock_dir or os.environ.get("QKOV_GPU_LOCK_DIR") or
                    Path(tempfile.gettempdir()) / f"qkov-gpu-locks-{os.getuid()}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    order = [(int(preferred) + k) % n for k in range(n)]
    waited = False
    while True:
        for k in order:
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(ids[k]))
            fh = open(lock_dir / f"gpu-{name}.lock", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()} {platform.node()}\n")
            fh.flush()
            held.append(fh)
            return k
        if not waited:
            logger.info("all %d GPUs are held by other jobs (%s); waiting", n, lock_dir)
            waited = True
        time.sleep(poll_s)


def choose_devices(held: list, want: str = "auto", slot: int = 0, n: int = 1
                   ) -> tuple[list[str], dict]:
    """The torch devices of a collect job and how they were chosen (for the manifest): the
    CPU, or ``n`` GPUs (resources.collect.gpu; more than one: the model is placed over
    them, interference.placement).

    ``held``: where GPU locks are kept (:attr:`Job.held_locks`); ``want``:
    resources.collect.device (auto | cpu | cuda). Several visible GPUs and no scheduler
    assignment: ``n`` free ones by lock (:func:`acquire_gpu`, ``slot``'s first);
    otherwise the first ``n`` visible GPUs (SLURM's ``--gpus`` makes them the job's own).
    """
    info = {"host": platform.node(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    from interference.device import resolve_device

    if resolve_device(want, "resources.collect.device") == "cpu":
        return ["cpu"], dict(info, how="config" if want == "cpu" else "no CUDA device")
    import torch

    count, n = torch.cuda.device_count(), max(1, int(n))
    if n > count:
        raise RuntimeError(f"the job asks for {n} GPUs (resources.collect.gpu) but sees "
                           f"{count} (CUDA_VISIBLE_DEVICES={info['cuda_visible_devices']})")
    visible = (info["cuda_visible_devices"] or "").split(",")
    ids = [v.strip() for v in visible] if len(visible) == count and all(visible) else \
        [str(k) for k in range(count)]
    if count == n or info["slurm_job_id"] or os.environ.get("QKOV_GPU_LOCKS") == "0":
        idx = list(range(n))
        how = ("first visible GPU" if n == 1 else f"first {n} visible GPUs") + (
            " (SLURM)" if info["slurm_job_id"] else "")
    else:
        idx = [acquire_gpu(ids, held, (slot * n + k) % count) for k in range(n)]
        how = f"lock (slot {slot} of {count} GPUs)"
    torch.cuda.set_device(idx[0])
    info.update(how=how, index=idx[0], gpu=ids[idx[0]], name=torch.cuda.get_device_name(idx[0]))
    if n > 1:
        info.update(indices=idx, gpus=[ids[k] for k in idx])
    return [f"cuda:{k}" for k in idx], info


def log_placement(model, info: dict) -> None:
    """Log where a model placed over several GPUs is, block range and GiB per device, and
    keep it in the job's device info (the manifest's ``device_info.placement``)."""
    from interference.placement import placement_summary

    where = placement_summary(model)
    if where is None:
        return
    info["placement"] = where
    for dev, e in where.items():
        logger.info("model on %s: %s .. %s (%d blocks, %.1f GiB of weights)", dev,
                    e["blocks"][0], e["blocks"][1], e["n_blocks"], e["gib"])
