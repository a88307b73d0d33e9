"""One owner for a job's communicators: the private duplicates, their channels and the progress thread.

Modelled on heat's ``MPICommunication``: the communicator a job is given (by
default ``MPI.COMM_WORLD``) is never used for the package's own traffic; the
job ``Dup``\\ s it once for the data path, once for control messages and once
for the progress thread, and :meth:`JobComms.close` frees exactly those.
"""
from __future__ import annotations

from mpicdc.runtime.channel import MPIChannel
from mpicdc.runtime.mpienv import Deadline, detector_timeout_s, init_mpi, start_progress_thread, ulfm_enabled


class JobComms:
    """The job's communicators.  Creating one is collective over ``world``; a context manager.

    Attributes
    ----------
    world : the communicator the job was given (ranks and size come from it).
    data, ctrl : :class:`~mpicdc.runtime.channel.MPIChannel` on private duplicates of ``world``.
    ulfm : whether ULFM fault tolerance is on (a dead rank does not end the job).
    """

    def __init__(self, MPI, world):
        self.MPI, self.world = MPI, world
        self.rank, self.size = world.Get_rank(), world.Get_size()
        self.ulfm = ulfm_enabled(MPI)
        self._dups = [world.Dup() for _ in range(3)]
        for dup in self._dups:
            dup.Set_errhandler(MPI.ERRORS_RETURN)
        self.data, self.ctrl = MPIChannel(MPI, self._dups[0]), MPIChannel(MPI, self._dups[1])
        self._progress = start_progress_thread(MPI, self._dups[2], rank=self.rank,
                                               frozen_limit_s=detector_timeout_s() if self.ulfm else None)
        self.processes: dict = {}  # rank -> (host, pid), reported by each worker at start-up
        self.closed = False

    @classmethod
    def open(cls, comm=None, *, timeout_s: float = 60.0) -> "JobComms":
        """Initialise MPI (if needed) and duplicate ``comm``; ends the process if that blocks past ``timeout_s``.

        ``MPI_Init`` and ``Dup`` block until every rank takes part: a rank killed
        in that window would otherwise leave the others waiting forever.
        """
        MPI = init_mpi(timeout_s)
        deadline = Deadline(timeout_s, f"start-up did not complete within {timeout_s:g} s: a rank died or cannot "
                                       "be reached while the job's communicators were set up")
        try:
            return cls(MPI, MPI.COMM_WORLD if comm is None else comm)
        finally:
            deadline.cancel()

    def close(self) -> None:
        """Stop the progress thread and free the duplicates (local; safe to call twice)."""
        if self.closed:
            return
        self.closed = True
        stop, thread = self._progress
        stop.set()
        thread.join(1.0)
        for dup in self._dups:
            try:
                dup.Free()
            except self.MPI.Exception:
                pass

    def __enter__(self) -> "JobComms":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
