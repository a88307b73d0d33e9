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
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass

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

    @property
    def seconds(self) -> float | None:
        """Time from the loss to full tolerance (the spare in the plan), or None if not healed."""
        return None if self.ready_at is None else self.ready_at - self.lost_at

    def to_dict(self) -> dict:
        return {"logical": self.logical, "replaced": self.replaced, "spare": self.spare, "reason": self.reason,
                "lost_request": self.lost_request, "healed_request": self.healed_request,
                "outcome": self.outcome, "seconds": self.seconds,
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
    timeout_s : how long a spare may take to load a shard and answer before it is given up.
    silent_grace_s : a silent rank (alive, not answering) is replaced only after being silent this
        long: a brief stall (CPU contention) re-admits it without spending a spare.  Dead and
        quarantined ranks are replaced at once.
    """

    def __init__(self, ctrl: Channel, coordinator, spares, timeout_s: float = 60.0, silent_grace_s: float = 1.0):
        self.ctrl, self.coordinator, self.timeout_s = ctrl, coordinator, timeout_s
        self.silent_grace_s = silent_grace_s
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
        spares = list(self.active)
        answered = {spares[i] for i, _ in self.ctrl.testsome([self.active[s].handle for s in spares])}
        now = time.perf_counter()
        for spare in spares:
            t = self.active[spare]
            if spare in answered:
                head = wire.Header.unpack(t.buf)
                if head.kind == wire.READY and head.block == t.logical:
                    self._heal(t, now)
                elif head.kind == wire.REFUSED:
                    self._give_up(t, "refused", "could not load the shard (its log says why)")
                else:
                    self._give_up(t, "spare lost", "was lost before it was ready")
            elif spare in self.coordinator.dead:
                self._give_up(t, "spare lost", "was lost before it was ready")
            elif now - t.assigned_at > self.timeout_s:
                self._give_up(t, "timed out", f"did not answer within {self.timeout_s:g} s")

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
        del self.active[t.spare]
        log.warning("spare rank %d %s; removed from the pool, rank %d waits for the next spare", t.spare, why,
                    t.replaced)


def spare_loop(ctrl: Channel, data: Channel, state: WorkerState, load, stop_event) -> None:
    """A spare rank: idle until the master's ``ASSIGN``, then load that rank's shard and serve as it.

    ``state`` is a :class:`WorkerState` without blocks; ``load(rank)`` returns a rank's blocks
    (:func:`mpicdc.store.load_rank` on the weights folder) or raises.  Returns when the
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
        blocks = _load_at_low_priority(load, logical)
        plan = reassign(state.plan, logical, state.rank)
    except (ValueError, OSError, RuntimeError) as exc:
        log.error("spare rank %d cannot take rank %d's place: %s", state.rank, logical, exc)
        _answer(ctrl, wire.REFUSED, head)
        stop_event.wait()
        return
    _answer(ctrl, wire.READY, head)
    worker_loop(data, dataclasses.replace(state, plan=plan, blocks=blocks), stop_event)


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
