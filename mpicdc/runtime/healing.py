"""Healing with spare ranks: a lost worker's blocks move to an idle spare, restoring the tolerance.

``--spares K`` starts ``K`` idle ranks after the plan's ranks.  When a rank of the plan is lost
(dead under ULFM, silent, or quarantined for wrong values), the master's :class:`Healer` picks
an idle spare and tells it on the control channel which rank of the plan it now stands for
(``ASSIGN``, the plan rank in the header's block slot).  The spare loads that rank's shard
(``rank-NNN.h5``) and answers ``READY`` (or ``REFUSED`` when it cannot); only then does the
master put the spare's rank in that rank's place in its plan (:func:`reassign`), so the next
layers send it work and decode from it.  Requests meanwhile are served by decoding around the
loss, as without spares: nothing waits for a spare.

States of one takeover (:class:`Takeover`): ``pending`` (ASSIGN sent) -> ``healed`` (READY
arrived: the plan has the spare) or ``spare lost`` / ``refused`` / ``timed out`` (the spare
leaves the pool and the lost rank waits for the next spare).  A spare that dies while idle is
removed from the pool.  The spare's side is :func:`spare_loop`.

A spare that cannot see the shard file (a device holding only its own files) answers ``FETCH``
instead; the master reads its copy of the file in a background thread and sends it (``SHARD``:
a header and the file's bytes); the spare checks its sha256 against the manifest, writes it into
its weights folder and loads it.  A master without the file answers ``REFUSED``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpicdc.runtime import wire
from mpicdc.runtime.channel import Channel, PeerLost
from mpicdc.runtime.worker import MasterLost, WorkerState, worker_loop

log = logging.getLogger(__name__)


def reassign(plan, old: int, new: int):
    """``plan`` with rank ``new`` computing every block rank ``old`` computed.  Pure."""
    if any(new in lp.ranks for lp in plan.layers):
        raise ValueError(f"rank {new} already computes blocks of this plan; it cannot also take rank {old}'s")
    layers = tuple(dataclasses.replace(lp, ranks=tuple(new if r == old else r for r in lp.ranks))
                   if old in lp.ranks else lp for lp in plan.layers)
    return dataclasses.replace(plan, layers=layers)


def plan_ranks(plan) -> set:
    """Every rank that computes a block of ``plan``."""
    return {r for lp in plan.layers for r in lp.ranks}


@dataclass
class Takeover:
    """One spare taking the place of one lost rank; times are the master's ``perf_counter``."""

    logical: int         # the rank of the prepared plan whose shard file the spare loads
    replaced: int        # the lost rank (the logical one, or an earlier spare)
    spare: int
    reason: str          # dead, silent or quarantined
    lost_at: float       # when the master first saw the loss (checked before every layer)
    lost_request: int
    assigned_at: float
    ready_at: float | None = None
    healed_request: int | None = None
    outcome: str = "pending"  # healed, spare lost, refused, timed out
    handle: object = None
    buf: object = None
    read: object = None  # _FileRead of the shard being sent to a spare that cannot see it
    streamed: bool = False

    @property
    def seconds(self) -> float | None:
        """Time from the loss to full tolerance (the spare in the plan), or None if not healed."""
        return None if self.ready_at is None else self.ready_at - self.lost_at

    def to_dict(self) -> dict:
        return {"logical": self.logical, "replaced": self.replaced, "spare": self.spare, "reason": self.reason,
                "lost_request": self.lost_request, "healed_request": self.healed_request,
                "outcome": self.outcome, "seconds": self.seconds, "streamed": self.streamed,
                "load_seconds": None if self.ready_at is None else self.ready_at - self.assigned_at}


class Healer:
    """The master's spare pool, the map from ranks in the plan to the prepared ranks, and the takeovers.

    :meth:`step` is called before every layer (local, never blocks): it drops dead idle spares,
    collects spares' answers (swapping a ready spare into ``coordinator.plan``) and sends an
    idle spare to every rank of the plan newly lost.

    Parameters
    ----------
    ctrl : the master's control channel.
    coordinator : the :class:`~mpicdc.runtime.master.Coordinator` whose ``plan`` is healed.
    spares : the idle spare ranks, used in this order.
    timeout_s : how long a spare may take to load (or be sent) a shard and answer before it is given up.
    silent_grace_s : a silent rank (alive, not answering) is replaced only after being silent this
        long: a brief stall (CPU contention) re-admits it without spending a spare.  Dead and
        quarantined ranks are replaced at once.
    manifest : the master's :class:`~mpicdc.store.Manifest`, whose shard files it sends to a spare
        that cannot see its own (``None``: such a spare is refused).
    """

    def __init__(self, ctrl: Channel, coordinator, spares, timeout_s: float = 60.0, silent_grace_s: float = 1.0,
                 manifest=None):
        self.ctrl, self.coordinator, self.timeout_s = ctrl, coordinator, timeout_s
        self.silent_grace_s, self.manifest = silent_grace_s, manifest
        self.pool = list(spares)
        self.logical: dict = {}     # spare in the plan -> the prepared rank it stands for
        self.active: dict = {}      # spare -> its pending Takeover
        self.takeovers: list = []   # every takeover, in order
        self._seen: dict = {}       # lost rank of the plan -> (time, request) first seen
        self._told_empty: set = set()

    def step(self) -> None:
        c = self.coordinator
        for spare in [s for s in self.pool if s in c.dead]:
            self.pool.remove(spare)
            log.warning("spare rank %d failed while idle; removed from the pool (%d spare(s) left)", spare,
                        len(self.pool))
        self._collect()
        gone = c.dead | c.silent | c.quarantined
        busy = {t.replaced for t in self.active.values()}
        self._seen = {r: seen for r, seen in self._seen.items() if r in gone or r in busy}  # re-admitted
        now = time.perf_counter()
        for rank in sorted(plan_ranks(c.plan) & gone - busy):
            self._seen.setdefault(rank, (now, c.next_request - 1))
            if self._reason(rank) == "silent" and now - self._seen[rank][0] < self.silent_grace_s:
                continue
            while self.pool and rank not in {t.replaced for t in self.active.values()}:
                self._assign(rank, self._reason(rank))
            if rank not in {t.replaced for t in self.active.values()} and rank not in self._told_empty:
                self._told_empty.add(rank)
                log.warning("no spare left to take rank %d's place; its blocks are decoded around (tolerance "
                            "reduced)", rank)

    def _reason(self, rank: int) -> str:
        c = self.coordinator
        return "dead" if rank in c.dead else "quarantined" if rank in c.quarantined else "silent"

    def _assign(self, rank: int, reason: str) -> None:
        """Send the next idle spare to take ``rank``'s place (a spare found dead leaves the pool)."""
        spare = self.pool.pop(0)
        logical = self.logical.get(rank, rank)
        lost_at, lost_request = self._seen[rank]
        request = self.coordinator.next_request - 1
        t = Takeover(logical, rank, spare, reason, lost_at, lost_request, time.perf_counter(),
                     buf=np.zeros(wire.HEADER_BYTES, dtype=np.uint8))
        try:
            t.handle = self.ctrl.irecv(t.buf, spare, wire.TAG_SPARE)
            self.ctrl.isend(wire.message(wire.Header(wire.ASSIGN, request, -1, logical)), spare, wire.TAG_SPARE)
        except PeerLost:
            t.outcome = "spare lost"
            self.takeovers.append(t)
            log.warning("spare rank %d is unreachable; removed from the pool", spare)
            return
        self.active[spare] = t
        self.takeovers.append(t)
        log.warning("rank %d is %s: spare rank %d takes its place (loading rank %d's shard); its blocks are "
                    "decoded around meanwhile", rank, reason, spare, logical)

    def _collect(self) -> None:
        """Test the pending takeovers' answers; a ready spare goes into the plan."""
        if not self.active:
            return
        for t in [t for t in self.active.values() if t.read is not None and not t.read.is_alive()]:
            self._send_shard(t)
        spares = list(self.active)
        answered = {spares[i] for i, _ in self.ctrl.testsome([self.active[s].handle for s in spares])}
        now = time.perf_counter()
        for spare in spares:
            t = self.active.get(spare)
            if t is None:
                continue
            if spare in answered:
                head = wire.Header.unpack(t.buf)
                if head.kind == wire.READY and head.block == t.logical:
                    self._heal(t, now)
                elif head.kind == wire.FETCH:
                    self._read_shard(t)
                elif head.kind == wire.REFUSED:
                    self._give_up(t, "refused", "could not load the shard (its log says why)")
                else:
                    self._give_up(t, "spare lost", "was lost before it was ready")
            elif spare in self.coordinator.dead:
                self._give_up(t, "spare lost", "was lost before it was ready")
            elif now - t.assigned_at > self.timeout_s:
                self._give_up(t, "timed out", f"did not answer within {self.timeout_s:g} s")

    def _read_shard(self, t: Takeover) -> None:
        """The spare cannot see its shard: read the master's copy in the background (sent by :meth:`_send_shard`)."""
        t.buf[:] = 0
        try:
            t.handle = self.ctrl.irecv(t.buf, t.spare, wire.TAG_SPARE)
        except PeerLost:
            self._give_up(t, "spare lost", "was lost before it was ready")
            return
        if self.manifest is None:
            t.read = _FileRead(None, t.logical)
            t.read.error = "the master has no weights folder to send it from"
            return
        t.read = _FileRead(self.manifest.path(t.logical), t.logical)
        t.read.start()
        log.warning("spare rank %d cannot see rank %d's shard; sending it the master's copy", t.spare, t.logical)

    def _send_shard(self, t: Takeover) -> None:
        read, t.read = t.read, None
        try:
            if read.error:
                self.ctrl.isend(wire.message(wire.Header(wire.REFUSED, -1, -1, t.logical)), t.spare, wire.TAG_SPARE)
                self._give_up(t, "refused", f"cannot see rank {t.logical}'s shard and the master cannot send it "
                                            f"({read.error})")
                return
            self.ctrl.isend(read.message, t.spare, wire.TAG_SPARE)  # the channel keeps it until sent
            t.streamed = True
        except PeerLost:
            self._give_up(t, "spare lost", "was lost before it was ready")

    def _heal(self, t: Takeover, now: float) -> None:
        c = self.coordinator
        c.plan = reassign(c.plan, t.replaced, t.spare)
        self.logical[t.spare] = t.logical
        self.logical.pop(t.replaced, None)
        self._seen.pop(t.replaced, None)
        t.ready_at, t.healed_request, t.outcome = now, c.next_request - 1, "healed"
        del self.active[t.spare]
        log.warning("spare rank %d now computes rank %d's blocks (%.2f s after rank %d was found %s): "
                    "tolerance restored; %d spare(s) left", t.spare, t.logical, t.seconds, t.replaced,
                    t.reason, len(self.pool))

    def _give_up(self, t: Takeover, outcome: str, why: str) -> None:
        t.outcome = outcome
        self.active.pop(t.spare, None)
        log.warning("spare rank %d %s; removed from the pool, rank %d waits for the next spare", t.spare, why,
                    t.replaced)


class _FileRead(threading.Thread):
    """Read one shard file into a ``SHARD`` message off the master's thread: ``message`` or ``error``."""

    def __init__(self, path: Path | None, rank: int):
        super().__init__(name="mpicdc-shard-read", daemon=True)
        self.path, self.rank = path, rank
        self.message, self.error = None, ""

    def run(self) -> None:
        try:
            size = self.path.stat().st_size
            if size >= 1 << 32:
                raise OSError(f"{self.path}: {size} bytes, more than one message header can describe")
            message = np.empty(wire.HEADER_BYTES + size, dtype=np.uint8)
            wire.Header(wire.SHARD, -1, -1, self.rank, (size,)).pack_into(message)
            with open(self.path, "rb") as f:
                if f.readinto(memoryview(message)[wire.HEADER_BYTES:]) != size:
                    raise OSError(f"{self.path}: changed while being read")
            self.message = message
        except OSError as exc:
            self.error = str(exc)


class ShardMissing(FileNotFoundError):
    """A spare cannot see the shard file it should load; the master may send it (``FETCH``)."""

    def __init__(self, path: Path, sha256: str):
        self.path, self.sha256 = Path(path), sha256
        super().__init__(f"{path}: no such shard file on this rank")


def load_shard(manifest, rank: int) -> dict:
    """A spare's blocks once it stands for ``rank``: that rank's shard from its weights folder.

    Raises :class:`ShardMissing` when the file is not there (so it can be fetched from the master).
    """
    from mpicdc import store

    path = manifest.path(rank)
    if not path.is_file():
        raise ShardMissing(path, manifest.checksums.get(rank, ""))
    return store.load_rank(manifest.directory, rank, manifest)


def spare_loop(ctrl: Channel, data: Channel, state: WorkerState, load, stop_event) -> None:
    """A spare rank: idle until the master's ``ASSIGN``, then load that rank's shard and serve as it.

    ``state`` is a :class:`WorkerState` without blocks; ``load(rank)`` returns a rank's blocks
    (:func:`load_shard`) or raises (:class:`ShardMissing`: the file is asked of the master,
    installed, and loaded again).  Returns when the
    watchdog saw ``STOP``; raises :class:`MasterLost` when the master is gone.  Local.
    """
    buf = np.zeros(wire.HEADER_BYTES, dtype=np.uint8)
    try:
        handle = ctrl.irecv(buf, 0, wire.TAG_SPARE)
        while not ctrl.testsome([handle]):
            if stop_event.is_set():
                return
            time.sleep(0.01)
    except PeerLost:
        raise MasterLost(f"spare rank {state.rank} lost the master") from None
    head = wire.Header.unpack(buf)
    if head.kind != wire.ASSIGN:
        raise MasterLost(f"spare rank {state.rank} lost the master")
    logical = head.block
    try:
        try:
            blocks = _load_at_low_priority(load, logical)
        except ShardMissing as missing:
            log.warning("spare rank %d: %s; asking the master for it", state.rank, missing)
            _fetch(ctrl, head, missing, stop_event)
            blocks = _load_at_low_priority(load, logical)
        plan = reassign(state.plan, logical, state.rank)
    except (ValueError, OSError, RuntimeError) as exc:
        if stop_event.is_set():  # the job ended while this spare was taking over
            return
        log.error("spare rank %d cannot take rank %d's place: %s", state.rank, logical, exc)
        _answer(ctrl, wire.REFUSED, head)
        stop_event.wait()
        return
    _answer(ctrl, wire.READY, head)
    worker_loop(data, dataclasses.replace(state, plan=plan, blocks=blocks), stop_event)


def _fetch(ctrl: Channel, head: wire.Header, missing: ShardMissing, stop_event) -> None:
    """Ask the master for a shard file this spare cannot see; check its sha256 and install it.

    Raises ``OSError`` when the master cannot send it, the bytes do not match the manifest's
    sha256, or the folder cannot be written; returns quietly if the job stops meanwhile.
    """
    _answer(ctrl, wire.FETCH, head)
    try:
        while (nbytes := ctrl.probe(0, wire.TAG_SPARE)) is None:
            if stop_event.wait(0.01):
                raise OSError("the job stopped while the shard was being sent")
        message = np.empty(nbytes, dtype=np.uint8)
        ctrl.recv(message, 0, wire.TAG_SPARE)
    except PeerLost:
        raise MasterLost(f"spare rank {ctrl.rank} lost the master") from None
    got = wire.Header.unpack(message)
    if got.kind != wire.SHARD or got.block != head.block:
        raise OSError(f"the master cannot send {missing.path.name} (see its log)")
    body = message[wire.HEADER_BYTES:]
    digest = hashlib.sha256(memoryview(body)).hexdigest()
    if missing.sha256 and digest != missing.sha256:
        raise OSError(f"{missing.path.name} as received has sha256 {digest[:16]}..., the manifest says "
                      f"{missing.sha256[:16]}...")
    partial = missing.path.with_name(f".{missing.path.name}.{os.getpid()}.partial")
    body.tofile(partial)
    os.replace(partial, missing.path)
    log.warning("spare rank %d: received %s (%d bytes, sha256 matches the manifest)", ctrl.rank,
                missing.path.name, body.nbytes)


def _load_at_low_priority(load, rank: int) -> dict:
    """``load(rank)`` in a thread at the lowest CPU priority (Linux: the nice value is per thread).

    Where the spare shares cores with working ranks (one machine standing in for a cluster),
    reading and checking the shard must not slow the requests served meanwhile.
    """
    out: dict = {}

    def run():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):  # not Linux, or not allowed: load at normal priority
            pass
        try:
            out["blocks"] = load(rank)
        except BaseException as exc:  # noqa: BLE001 - handed to the spare's own thread
            out["error"] = exc

    thread = threading.Thread(target=run, name="mpicdc-spare-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["blocks"]


def _answer(ctrl: Channel, kind: int, head: wire.Header) -> None:
    try:
        ctrl.send(wire.message(wire.Header(kind, head.request, -1, head.block)), 0, wire.TAG_SPARE)
    except PeerLost:
        raise MasterLost("a spare could not reach the master") from None
