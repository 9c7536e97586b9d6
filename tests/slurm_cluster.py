"""A real single-node SLURM cluster for tests: munge + slurmctld + slurmd from Debian packages.

Recipe measured in /work/shared/notes/slurm-single-node.md: as root, no systemd;
``proctrack/linuxproc`` and ``TaskPlugin=task/none`` work in containers; ``DefMemPerCPU`` so
a job that asks for no memory does not take the whole node; no accounting database (the
Snakemake plugin then needs ``--slurm-status-command squeue``; ``MinJobAge=300`` keeps
finished jobs visible to squeue long enough); ``jobcomp/filetxt`` writes one line per
finished job (``JobState=COMPLETED``), the evidence that jobs really ran under SLURM.

Everything of the cluster (config, state, spool, logs, pid files) lives in one folder and
the ports are picked free, so a stale cluster elsewhere does not interfere. Clients find
it through ``SLURM_CONF`` (:meth:`SlurmCluster.env`) -- except ``srun`` inside a job:
snakemake-executor-plugin-slurm-jobstep drops every ``SLURM_*`` variable but the job's
identity before its nested ``srun``, so the config is also written to the default path
``/etc/slurm/slurm.conf`` (only where no other config is; removed again by ``stop()``).

    with SlurmCluster(tmp_path / "slurm") as c:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=c.env(), check=True)

Command line (for trying things by hand)::

    python tests/slurm_cluster.py start /tmp/slurm    # prints: export SLURM_CONF=...
    python tests/slurm_cluster.py stop /tmp/slurm
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# written by tests/slurm_cluster.py"
BINARIES = ("slurmctld", "slurmd", "munged", "sinfo", "sbatch", "squeue", "scontrol", "scancel")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def unavailable_reason() -> str | None:
    """None when a cluster can be started here, else why not."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the SLURM test starts munge/slurmctld/slurmd and needs root"
    missing = [b for b in BINARIES if which(b) is None]
    if missing:
        return (f"SLURM/munge not installed (missing {', '.join(missing)}); as root: "
                f"apt-get install -y --no-install-recommends {' '.join(PACKAGES)} "
                "(.ci/run does this)")
    if not Path("/etc/munge/munge.key").is_file():
        return "munge has no key (/etc/munge/munge.key); reinstall the munge package"
    if DEFAULT_CONF.is_file() and MARKER not in DEFAULT_CONF.read_text(errors="replace"):
        return f"{DEFAULT_CONF} exists (a real SLURM node?); not starting a test cluster here"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class SlurmCluster:
    """One node (this host), one partition ``debug``; start() / stop() or a context."""

    partition = "debug"

    def __init__(self, root: str | Path, cpus: int | None = None,
                 def_mem_per_cpu: int = 500):
        self.root = Path(root).resolve()
        self.host = socket.gethostname().split(".")[0]
        self.cpus = int(cpus or os.cpu_count() or 1)
        self.def_mem_per_cpu = def_mem_per_cpu
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "log" / "jobcomp.log"
        self.ctld_log = self.root / "log" / "slurmctld.log"
        self.slurmd_log = self.root / "log" / "slurmd.log"
        self.ctld_pid = self.root / "run" / "slurmctld.pid"
        self.slurmd_pid = self.root / "run" / "slurmd.pid"
        self.munged_pid: int | None = None     # set only when this object started munged
        self.started = False

    # -- configuration ---------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])
        return env

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        mem = max(_mem_mb() - 1024, 1024)
        self.conf.write_text("\n".join([
            MARKER,
            "ClusterName=ci",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.ctld_pid}",
            f"SlurmdPidFile={self.slurmd_pid}",
            f"SlurmctldLogFile={self.ctld_log}",
            f"SlurmdLogFile={self.slurmd_log}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={self.def_mem_per_cpu}",
            "ReturnToService=2",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "MinJobAge=300",
            "KillWait=5",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={mem} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE "
            "State=UP",
            ""]))
        if DEFAULT_CONF.is_file() and MARKER not in DEFAULT_CONF.read_text(errors="replace"):
            raise RuntimeError(f"{DEFAULT_CONF} exists and is not a test cluster's; not "
                               "overwriting it")
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.conf, DEFAULT_CONF)

    # -- munge -----------------------------------------------------------------------
    @staticmethod
    def munge_works() -> bool:
        munge, unmunge = which("munge"), which("unmunge")
        if not (munge and unmunge):
            return False
        try:
            cred = subprocess.run([munge, "-n"], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            return subprocess.run([unmunge], input=cred.stdout, capture_output=True,
                                  timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def _start_munge(self) -> None:
        if self.munge_works():
            return          # a munged is already running (not ours: leave it alone)
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        for d in ("/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        pidfile = run / "munged.pid"
        subprocess.run(["runuser", "-u", "munge", "--", which("munged")], check=True,
                       capture_output=True, timeout=30)
        for _ in range(100):
            if self.munge_works():
                self.munged_pid = _read_pid(pidfile)
                (self.root / "run" / "munged.ours").write_text(f"{self.munged_pid}\n")
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not start (see /var/log/munge/munged.log)")

    # -- start / stop ----------------------------------------------------------------
    def start(self, timeout: float = 60) -> "SlurmCluster":
        self.write_conf()
        self._start_munge()
        env = self.env()
        try:
            subprocess.run([which("slurmctld"), "-f", str(self.conf)], check=True, env=env,
                           capture_output=True, text=True, timeout=60)
            subprocess.run([which("slurmd"), "-f", str(self.conf)], check=True, env=env,
                           capture_output=True, text=True, timeout=60)
        except subprocess.CalledProcessError as err:
            self.stop()
            raise RuntimeError(f"{err.cmd} failed: {err.stderr}\n{self.logs()}") from None
        self.started = True
        t0 = time.time()
        state = ""
        while time.time() - t0 < timeout:
            res = subprocess.run([which("sinfo"), "-h", "-o", "%T"], env=env,
                                 capture_output=True, text=True, timeout=30)
            state = res.stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.3)
        logs = self.logs()
        self.stop()
        raise RuntimeError(f"SLURM node not idle after {timeout:.0f} s (state {state!r})\n{logs}")

    def stop(self, timeout: float = 30) -> None:
        env = self.env()
        pids = [p for p in (_read_pid(self.ctld_pid), _read_pid(self.slurmd_pid)) if p]
        if self.conf.is_file() and any(_pid_alive(p) for p in pids):
            # jobs left by a run that was killed: cancel them (all jobs here are the test's)
            res = subprocess.run([which("squeue"), "-h", "-o", "%i"], env=env,
                                 capture_output=True, text=True, timeout=30)
            jobs = res.stdout.split()
            if jobs:
                subprocess.run([which("scancel"), *jobs], env=env, capture_output=True,
                               timeout=30)
        if self.conf.is_file() and which("scontrol"):
            subprocess.run([which("scontrol"), "shutdown"], env=env, capture_output=True,
                           timeout=60)
        t0 = time.time()
        while any(_pid_alive(p) for p in pids) and time.time() - t0 < timeout:
            time.sleep(0.2)
        for p in pids:   # the daemons this cluster started, by their pid files
            if _pid_alive(p):
                os.kill(p, signal.SIGKILL)
        self.munged_pid = self.munged_pid or _read_pid(self.root / "run" / "munged.ours")
        if self.munged_pid and _pid_alive(self.munged_pid):
            os.kill(self.munged_pid, signal.SIGTERM)
            t0 = time.time()
            while _pid_alive(self.munged_pid) and time.time() - t0 < 10:
                time.sleep(0.1)
        (self.root / "run" / "munged.ours").unlink(missing_ok=True)
        if DEFAULT_CONF.is_file() and self.conf.is_file() and \
                DEFAULT_CONF.read_text(errors="replace") == self.conf.read_text():
            DEFAULT_CONF.unlink()
        self.munged_pid = None
        self.started = False

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- evidence --------------------------------------------------------------------
    def completed_jobs(self) -> dict[str, str]:
        """JobId -> JobState of every finished job, from the job-completion log."""
        out = {}
        if self.jobcomp.is_file():
            for line in self.jobcomp.read_text().splitlines():
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                if "JobId" in fields:
                    out[fields["JobId"]] = fields.get("JobState", "?")
        return out

    def logs(self, n: int = 40) -> str:
        parts = []
        for p in (self.ctld_log, self.slurmd_log):
            if p.is_file():
                lines = p.read_text(errors="replace").splitlines()[-n:]
                parts.append(f"--- {p}\n" + "\n".join(lines))
        return "\n".join(parts)


class BackgroundRuns:
    """Commands run at once on a started cluster, in the background: ``start()`` returns
    at once, ``wait()`` blocks until every command has ended. The SLURM test starts its
    workflow runs this way as soon as the session is collected (tests/conftest.py), so
    that SLURM's waiting (status polls, scheduling) overlaps the tests that run before it.

    ``commands``: name -> argv; each writes its output to ``<root>/<name>.log``.
    """

    def __init__(self, cluster: SlurmCluster, root: Path, commands: dict[str, list[str]],
                 env: dict, work: dict[str, Path] | None = None):
        self.cluster, self.root, self.commands, self.env = cluster, Path(root), commands, env
        self.work = dict(work or {})        # name -> the run's working directory
        self.procs: dict[str, subprocess.Popen] = {}
        self.watchers: dict[str, threading.Thread] = {}
        self.ended: dict[str, float] = {}
        self.t0 = 0.0
        self.stopped = False

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self) -> "BackgroundRuns":
        self.t0 = time.time()
        for name, cmd in self.commands.items():
            with open(self.log(name), "w") as log:
                self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                    env=self.env, start_new_session=True)
            self.watchers[name] = threading.Thread(target=self._watch, args=(name,),
                                                   daemon=True)
            self.watchers[name].start()
        return self

    def _watch(self, name: str) -> None:
        """Note when the command ends (its elapsed time), whenever wait() is called."""
        self.procs[name].wait()
        self.ended[name] = time.time() - self.t0

    def wait(self) -> dict[str, dict]:
        """name -> {rc, elapsed (s from start to its end), work, output}, once every
        command has ended."""
        for watcher in self.watchers.values():
            watcher.join()
        return {name: {"rc": proc.returncode, "elapsed": self.ended[name],
                       "work": self.work.get(name),
                       "output": self.log(name).read_text(errors="replace")}
                for name, proc in self.procs.items()}

    def stop(self) -> None:
        """Kill what still runs (its process group: Snakemake and its local jobs), cancel
        the cluster's jobs and stop the cluster. Once; later calls do nothing."""
        if self.stopped:
            return
        self.stopped = True
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        self.cluster.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print(__doc__)
        return 2
    reason = unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    cluster = SlurmCluster(argv[2])
    if argv[1] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
