"""Launch real MPI jobs from pytest: hard timeouts, exit codes, output, no leftover processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mpirun_available() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return (Path(sys.executable).parent / "mpirun").exists() or shutil.which("mpirun") is not None


requires_mpi = pytest.mark.skipif(not mpirun_available(),
                                  reason="needs mpi4py and an mpirun launcher (pip install 'mpicdc[mpi]')")


def cluster_unavailable() -> str | None:
    """Why network-namespace clusters cannot be made here (root, ip, tc), or None when they can."""
    from mpicdc.cluster import ClusterUnavailable, check_available
    try:
        check_available()
    except ClusterUnavailable as exc:
        return str(exc)
    return None


CLUSTER_UNAVAILABLE = cluster_unavailable()
requires_cluster = pytest.mark.skipif(CLUSTER_UNAVAILABLE is not None,
                                      reason=f"no network namespaces here: {CLUSTER_UNAVAILABLE}")


@dataclass
class JobResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    results: dict | None

    def explain(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.1f}s\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def leftover_processes(marker: str) -> list:
    """PIDs of processes whose command line contains ``marker`` (other than ours)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            out.append(int(proc.name))
    return out


def session_members(sid: int) -> list:
    """PIDs of the processes of session ``sid`` (everything a command started with ``start_new_session``
    forked, whatever its command line)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            pids.append(int(proc.name))
    return pids


def run_bounded(cmd: list, cwd: Path, timeout: float, marker: str | None = None, *, env: dict | None = None,
                whole_session: bool = False) -> JobResult:
    """Run ``cmd`` in its own process group with a hard timeout, BLAS at one thread per process.

    On timeout the whole group (launcher, mpirun, every rank) is SIGKILLed and the test fails.
    With ``marker`` (a string on every rank's command line), or ``whole_session`` (every process of the
    command's session), processes still alive 10 s after the command ended are killed and fail the test too.
    ``env`` replaces the environment (default: this one with this checkout on ``PYTHONPATH``).
    """
    if env is None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"did not end within {timeout}s: {' '.join(cmd)}\n{stdout}\n{stderr}")
    seconds = time.monotonic() - start
    if marker is not None or whole_session:
        def alive():
            return session_members(proc.pid) if whole_session else leftover_processes(marker)

        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = alive()
        if left:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes left behind after {' '.join(cmd)} ended: {left}")
    return JobResult(proc.returncode, stdout, stderr, seconds, None)


def run_job(np_ranks: int, args: list, tmp_path: Path, timeout: float = 120, output: bool = True) -> JobResult:
    """Run ``python -m mpicdc.launch -np N ARGS`` with a hard timeout; the job must leave no process behind."""
    out_file = tmp_path / f"result-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "mpicdc.launch", "-np", str(np_ranks), *args]
    if output:
        cmd += ["--output", str(out_file)]
    job = run_bounded(cmd, tmp_path, timeout, str(out_file) if output else None)
    if output and out_file.exists():
        job.results = json.loads(out_file.read_text())
    return job


def rank_pids(marker: str) -> dict:
    """``{rank: pid}`` of the MPI ranks whose command line contains ``marker``."""
    pids = {}
    for pid in leftover_processes(marker):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                pids[int(item.split(b"=")[1])] = pid
    return pids


class LiveJob:
    """``python -m mpicdc.launch -np N ARGS`` running in the background, its output read as it comes.

    For faults done to a job from outside (signals to a rank or the launcher at a chosen moment).
    A guard timer SIGKILLs the whole process group after ``timeout`` seconds, so nothing can hang;
    :meth:`finish` then fails the test, as it does when anything of the job outlives it.
    """

    def __init__(self, np_ranks: int, args: list, tmp_path: Path, timeout: float = 180, launcher_args=()):
        self.out = tmp_path / f"result-{time.monotonic_ns()}.json"
        cmd = [sys.executable, "-m", "mpicdc.launch", *launcher_args, "-np", str(np_ranks), *args,
               "--output", str(self.out)]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.guard = threading.Timer(timeout, self._kill)
        self.guard.start()
        self.killed = False
        self.lines: list = []

    def _kill(self):
        self.killed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in leftover_processes(str(self.out)):  # mpirun runs in a session of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait_for(self, prefix: str) -> str:
        """Read output lines until one starts with ``prefix``; returns it (fails if the job ends first)."""
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        pytest.fail(f"the job ended before printing {prefix!r}\n{''.join(self.lines)}")

    def pids(self) -> dict:
        return rank_pids(str(self.out))

    def signal_rank(self, rank: int, sig: int) -> int:
        pids = self.pids()
        assert rank in pids, f"rank {rank} not found among {pids}\n{''.join(self.lines)}"
        os.kill(pids[rank], sig)
        return pids[rank]

    def finish(self) -> JobResult:
        """Wait for the end (bounded by the guard); the job must leave no process behind."""
        rest = self.proc.stdout.read()
        self.proc.wait()
        self.guard.cancel()
        text = "".join(self.lines) + rest
        if self.killed:
            pytest.fail(f"the job did not end within its time limit\n{text}")
        deadline = time.monotonic() + 10
        while leftover_processes(str(self.out)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = leftover_processes(str(self.out))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind: {left}\n{text}"
        results = json.loads(self.out.read_text()) if self.out.exists() else None
        return JobResult(self.proc.returncode, text, "", time.monotonic() - self.start, results)
