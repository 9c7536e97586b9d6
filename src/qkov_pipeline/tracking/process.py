"""The logging process of a job: a process started with the job that imports MLflow and opens
the store while the job works, then logs the job's record when the job asks.

Importing mlflow and opening its sqlite store take about 1.6 s of one core on an idle
2-core host, 2-3 s beside another job (benchmarks/RESULTS.md, session 20). Done in the
job's own process they came after its work, on the critical path of every job that logs a
run. A job's start (imports, loading a model) keeps one core busy, and a second process
needs no share of the job's interpreter lock, so the warm-up is mostly hidden there.

Protocol, one JSON line each way: the job sends ``{"uri", "artifacts", "experiment"}`` and
the process warms up; the job sends ``{"record", "parent", "status"}``, it answers
``{"run_id"}`` or ``{"error"}`` (:func:`..records.log_record`, with its retries) and exits.
When its input ends before a request (the job died or had nothing to log) it exits without
logging. Its own stdout is kept for answers; anything MLflow prints goes to stderr.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]   # the folder that holds qkov_pipeline


class ProcessGone(RuntimeError):
    """The process ended (or could not start) before it answered."""


class LoggingProcess:
    """The job's side: :meth:`log` sends a record and waits for the run id; :meth:`close`
    ends the process whatever it is doing (a timeout, a job that logs nothing; after an
    answer the run is already in the store). ``answered``: whether it answered."""

    def __init__(self, uri: str, artifacts: str | None, experiment: str):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "qkov_pipeline.tracking.process"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.closed = self.answered = False
        self._send({"uri": uri, "artifacts": artifacts, "experiment": experiment})

    def _send(self, doc: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(doc) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as err:
            raise ProcessGone(f"its input is closed ({type(err).__name__})") from None

    def log(self, record: dict, parent: str | None, status: str = "FINISHED") -> str:
        """The run id of ``record``'s child run of ``parent``, ended with ``status``.
        Raises ProcessGone when the process ended without an answer, RuntimeError with
        MLflow's error when logging failed."""
        self._send({"record": record, "parent": parent, "status": status})
        line = self.proc.stdout.readline()
        if not line:
            if self.closed:       # by the job, after its timeout: no second try here
                raise RuntimeError("the job ended its logging process")
            raise ProcessGone(f"it exited with code {self.proc.wait()} before answering")
        self.answered = True
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["run_id"]

    def close(self) -> None:
        self.closed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def main() -> int:
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                     # MLflow's prints go to stderr, answers stay apart
    first = sys.stdin.readline()
    if not first:
        return 0
    hello = json.loads(first)
    from .records import log_record
    from .store import _client, experiment_id

    try:                              # warm up: import, open the store, find the experiment
        experiment_id(_client(hello["uri"]), hello["experiment"], hello["artifacts"])
    except Exception:                 # noqa: BLE001 - log_record retries and reports it
        pass
    line = sys.stdin.readline()
    if not line:
        return 0
    req = json.loads(line)
    try:
        answer = {"run_id": log_record(hello["uri"], hello["artifacts"], req["record"],
                                       req["parent"], req["status"])}
    except Exception as err:          # noqa: BLE001 - the job decides what a failure means
        answer = {"error": f"{type(err).__name__}: {err}"}
    answers.write(json.dumps(answer) + "\n")
    answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
