"""Launch real MPI jobs from pytest: hard timeouts, exit codes, output, no leftover processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
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


def run_bounded(cmd: list, cwd: Path, timeout: float, marker: str | None = None) -> JobResult:
    """Run ``cmd`` in its own process group with a hard timeout, BLAS at one thread per process.

    On timeout the whole group (launcher, mpirun, every rank) is SIGKILLed and the test fails.
    With ``marker`` (a string on every rank's command line), processes still alive 10 s after the
    command ended are killed and fail the test too.
    """
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
    if marker is not None:
        deadline = time.monotonic() + 10
        while leftover_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = leftover_processes(marker)
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
