"""Point-to-point messaging on one communicator: the only surface the master and worker loops see.

The loops never touch ``mpi4py`` directly: they send and receive raw ``uint8``
buffers through a :class:`Channel`, and a lost peer shows up as a completed
request (whose buffer then holds no valid header) or as :class:`PeerLost`.
:class:`MPIChannel` is the real one, over a communicator with
``MPI.ERRORS_RETURN``; tests use an in-process fake with the same methods
(``tests/fake_channel.py``) to drop, reorder, delay and duplicate messages in
milliseconds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod


class PeerLost(RuntimeError):
    """A message to or from ``rank`` failed: the peer is dead or unreachable."""

    def __init__(self, rank: int, what: str = ""):
        self.rank = rank
        super().__init__(f"rank {rank} is unreachable{': ' + what if what else ''}")


class Channel(ABC):
    """Nonblocking point-to-point on one communicator (local calls only, never collective)."""

    rank: int
    size: int
    tag_ub: int

    @abstractmethod
    def isend(self, buf, dest: int, tag: int):
        """Start sending ``buf``; returns a handle for :meth:`test`.  Raises :class:`PeerLost`."""

    @abstractmethod
    def irecv(self, buf, source: int, tag: int):
        """Post a receive into ``buf``; returns a handle for :meth:`testsome`.  Raises :class:`PeerLost`."""

    @abstractmethod
    def testsome(self, handles: list) -> list:
        """``[(index, nbytes)]`` of the receives that completed.

        ``nbytes`` is the message size, or ``None`` when the library reported the batch in
        error and could not tell which one failed (the buffer's header then tells).
        """

    @abstractmethod
    def test(self, handle) -> bool:
        """Whether a send finished (a failed send counts as finished)."""

    @abstractmethod
    def probe(self, source: int, tag: int) -> int | None:
        """Bytes of a waiting message from ``source`` with ``tag``, or ``None``.  Raises :class:`PeerLost`."""

    @abstractmethod
    def recv(self, buf, source: int, tag: int) -> None:
        """Blocking receive of a message known to be waiting (see :meth:`probe`).  Raises :class:`PeerLost`."""

    @abstractmethod
    def send(self, buf, dest: int, tag: int) -> None:
        """Blocking send.  Raises :class:`PeerLost`."""

    def failed(self) -> set:
        """Ranks known to have failed (ULFM); empty where the library cannot tell."""
        return set()


class MPIChannel(Channel):
    """A :class:`Channel` over an ``mpi4py`` communicator whose error handler returns errors."""

    def __init__(self, MPI, comm):
        self._MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.tag_ub = int(comm.Get_attr(MPI.TAG_UB))
        # Every send request stays referenced here until MPI has released it: mpi4py frees a
        # request whose last reference goes, and Open MPI aborts the job when a freed send
        # later fails (a peer declared dead with a send still in flight).
        self._inflight: list = []

    def _lost(self, rank: int, exc) -> PeerLost:
        return PeerLost(rank, str(exc))

    def isend(self, buf, dest, tag):
        if len(self._inflight) > 64:
            self._inflight = [h for h in self._inflight if not self._released(h)]
        try:
            handle = self.comm.Isend([buf, self._MPI.BYTE], dest=dest, tag=tag)
        except self._MPI.Exception as exc:
            raise self._lost(dest, exc) from None
        self._inflight.append(handle)
        return handle

    def _released(self, handle) -> bool:
        """Free a send that completed without error; True once MPI has released the request.

        A send that failed (its peer was declared dead) is never freed: Open MPI may still
        report on it later, and an error on a freed request aborts the whole job.
        """
        try:
            if not handle.Get_status():  # looks without freeing
                return False
            handle.Test()  # completed: frees it
        except self._MPI.Exception:
            return False
        return handle == self._MPI.REQUEST_NULL

    def irecv(self, buf, source, tag):
        try:
            return self.comm.Irecv([buf, self._MPI.BYTE], source=source, tag=tag)
        except self._MPI.Exception as exc:
            raise self._lost(source, exc) from None

    def testsome(self, handles):
        MPI = self._MPI
        before = [h == MPI.REQUEST_NULL for h in handles]
        statuses = [MPI.Status() for _ in handles]
        try:
            done = MPI.Request.Testsome(handles, statuses) or []
            # mpi4py fills statuses in completion order: statuses[k] belongs to done[k]
            return [(i, statuses[k].Get_count(MPI.BYTE)) for k, i in enumerate(done)]
        except MPI.Exception:  # some completed in error: find them by their now-null handles
            return [(i, None) for i, h in enumerate(handles) if h == MPI.REQUEST_NULL and not before[i]]

    def test(self, handle):
        try:
            return handle.Get_status()  # never frees: _inflight frees sends that completed cleanly
        except self._MPI.Exception:  # failed: the caller may drop it; _inflight keeps it for good
            return True

    def probe(self, source, tag):
        status = self._MPI.Status()
        try:
            if not self.comm.Iprobe(source=source, tag=tag, status=status):
                return None
        except self._MPI.Exception as exc:
            raise self._lost(source, exc) from None
        return status.Get_count(self._MPI.BYTE)

    def recv(self, buf, source, tag):
        try:
            self.comm.Recv([buf, self._MPI.BYTE], source=source, tag=tag)
        except self._MPI.Exception as exc:
            raise self._lost(source, exc) from None

    def send(self, buf, dest, tag):
        try:
            self.comm.Send([buf, self._MPI.BYTE], dest=dest, tag=tag)
        except self._MPI.Exception as exc:
            raise self._lost(dest, exc) from None

    def failed(self):
        from mpicdc.runtime.mpienv import failed_ranks
        return failed_ranks(self._MPI, self.comm)
