"""The master (rank 0): sends each layer input to its ranks and decodes from the first replies.

For every distributed layer the master posts a receive for each live rank's
reply, sends the input with ``Isend``, and polls the receives with
``Testsome`` until the replies in hand are decodable.  It then decodes any
missing data blocks, assembles the layer output and runs the nonlinear ops
itself.  Receives still open when a layer is decoded stay posted: their
replies arrive late, are drained, and their arrival times are recorded.  A
rank that dies (ULFM reports ``MPI_ERR_PROC_FAILED``) or stops replying is no
longer sent work.

Integrity (``docs/integrity.md``): replies beyond the ones decoding needs are checked against
the code (:mod:`mpicdc.core.integrity`).  ``opportunistic`` checks the replies that arrived
with the decoding set and late replies of earlier layers as they drain, adding no wait;
``strict`` waits for enough replies to check every block (to locate one under MDS ``r >= 2``).
A request found inconsistent is flagged in :attr:`RequestResult.integrity`; a located wrong
block is decoded around and its rank quarantined (no longer used, like a lost rank).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from mpicdc.core import bands
from mpicdc.core import integrity as checks
from mpicdc.core.graph import walk
from mpicdc.core.grouped import stored_cols
from mpicdc.core.kernels import LocalExecutor, check_input
from mpicdc.core.wirefmt import get_format
from mpicdc.runtime import slices, wire
from mpicdc.runtime.channel import Channel, PeerLost
from mpicdc.runtime.emulate import MasterPacer

log = logging.getLogger(__name__)


INTEGRITY_MODES = ("off", "opportunistic", "strict")


class RequestFailed(RuntimeError):
    """A request could not be served: more losses than the layer's code tolerates."""

    def __init__(self, request: int, layer: str, lost: list, tolerance: int, reason: str):
        self.request, self.layer, self.lost, self.tolerance = request, layer, sorted(lost), tolerance
        super().__init__(f"request {request} failed at layer {layer!r}: {reason}; ranks lost or silent: "
                         f"{self.lost}; the layer's code tolerates {tolerance} loss(es)")


@dataclass
class LayerRecord:
    """Timing and provenance of one distributed layer of one request."""

    layer: str
    wait_s: float = 0.0
    decode_s: float = 0.0
    assemble_s: float = 0.0
    master_s: float = 0.0    # the master's own band (a band layer with master_rows)
    compute_s: float = 0.0
    modeled_s: float = 0.0
    used: list = field(default_factory=list)
    decoded_blocks: list = field(default_factory=list)
    late: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    missing_ranks: list = field(default_factory=list)  # ranks whose blocks were decoded (lost or late)
    checks: int = 0          # independent integrity checks made on the decoding set (0: unchecked)
    check_wait_s: float = 0.0  # strict mode: wait after the replies were decodable, to check them
    out_of_range: list = field(default_factory=list)  # ranks whose block did not fit the wire format
    sent_bytes: int = 0      # jobs sent for this layer (headers included)
    received_bytes: int = 0  # replies used to decode it

    def to_dict(self) -> dict:
        return {"layer": self.layer, "wait_ms": self.wait_s * 1e3, "decode_ms": self.decode_s * 1e3,
                "assemble_ms": self.assemble_s * 1e3,
                "master_ms": self.master_s * 1e3, "compute_ms": self.compute_s * 1e3,
                "modeled_ms": self.modeled_s * 1e3, "used": self.used, "decoded_blocks": self.decoded_blocks,
                "late": self.late, "failed": self.failed, "missing_ranks": self.missing_ranks,
                "checks": self.checks, "check_wait_ms": self.check_wait_s * 1e3,
                "sent_bytes": self.sent_bytes, "received_bytes": self.received_bytes}


@dataclass
class RequestResult:
    """Outcome of one inference request."""

    request: int
    output: np.ndarray | None
    latency_s: float
    layers: list
    error: str | None = None
    integrity: list = field(default_factory=list)  # IntegrityFlag of each layer found inconsistent

    @property
    def flagged(self) -> bool:
        """Whether a layer's replies were found inconsistent with the code (corrected or not)."""
        return bool(self.integrity)

    @property
    def ok(self) -> bool:
        return self.error is None

    def top_k(self, k: int = 5) -> list:
        if self.output is None:
            return []
        flat = self.output.reshape(-1)
        order = np.argsort(flat)[::-1][:k]
        return [(int(c), float(flat[c])) for c in order]


@dataclass
class IntegrityFlag:
    """A layer whose replies disagreed with the code beyond float32 rounding.

    ``rank`` is the located wrong rank (None: not locatable, e.g. one sum parity);
    ``corrected`` says the output was decoded without it; ``late`` that a late reply revealed
    it after the request was answered (its output was not corrected).
    """

    layer: str
    rank: int | None
    residual: float
    tolerance: float
    corrected: bool
    late: bool

    def to_dict(self) -> dict:
        return {"layer": self.layer, "rank": self.rank, "residual": self.residual,
                "tolerance": self.tolerance, "corrected": self.corrected, "late": self.late}


@dataclass
class _LateCheck:
    """An answered layer still expecting late replies: what checking them needs."""

    code: object
    accumulation: int
    ranks: tuple
    shape: tuple
    replies: dict
    flags: list
    layer: str
    roundoff: float
    flag: IntegrityFlag | None = None


@dataclass
class _Pending:
    handle: object
    buf: np.ndarray
    rank: int
    block: int
    request: int
    layer_index: int
    sent_at: float
    expected_bytes: int


@dataclass
class Arrival:
    """One reply's arrival, in time since its job was sent (late replies included)."""

    request: int
    layer: str
    rank: int
    seconds: float
    late: bool
    status: str  # "reply", "skipped", "bad" (wrong size, format or non-finite values), "range" (beyond
    #              the wire format's range), "failed" (rank lost)


class _MasterExecutor(LocalExecutor):
    """One request's layers on the master: planned linear layers go to the workers, the rest run here.

    Linear layers without a layer plan use the master's own weights; a fused
    ReLU is applied in place on the decoded output (identical values).
    """

    def __init__(self, coordinator: Coordinator, request: int, records: list):
        super().__init__(coordinator.master_weights)
        self.coordinator, self.request, self.records = coordinator, request, records

    def linear(self, layer, x, *, relu: bool = False):
        if self.coordinator.healer is not None:  # a spare ready since the last layer takes its place now
            self.coordinator.healer.step()
        lp = self.coordinator.plan.for_layer(layer.name)
        if lp is None:
            return self._paced(layer, [x.shape], lambda: super(_MasterExecutor, self).linear(layer, x, relu=relu), relu)
        record = LayerRecord(layer.name)
        out = self.coordinator._distributed(layer, lp, x, self.request, record)
        self.records.append(record)
        if relu:
            np.maximum(out, 0, out=out)
        return out

    def nonlinear(self, layer, inputs):
        return self._paced(layer, [np.shape(i) for i in inputs],
                           lambda: super(_MasterExecutor, self).nonlinear(layer, inputs))

    def _paced(self, layer, in_shapes, compute, relu: bool = False):
        """``compute()``, padded to the emulated master device's time when there is one (``--master-device``)."""
        pacer = self.coordinator.pacer
        return compute() if pacer is None else pacer.run(layer, in_shapes, compute, relu)


class Coordinator:
    """Rank 0's side of the runtime: serves inference requests over ``comm``.

    Parameters
    ----------
    data : channel on the private data-path communicator (a ``Dup`` of the world).
    ctrl : channel on the private control communicator (shutdown handshake).
    model, plan : the model graph and its distribution plan.
    master_weights : ``{layer: (W, b)}`` for linear layers the plan keeps on the master.
    layer_timeout_s : how long a layer may wait for a decodable set before its request fails.
    max_outstanding : unanswered jobs after which a live but silent rank is no longer sent work.
    integrity : ``off``, ``opportunistic`` (check spare replies, never wait) or ``strict`` (wait
        for enough replies to check, and under MDS r >= 2 to locate, every layer).
    wire_format : wire format of jobs and replies: ``float32``, ``float16`` or ``bfloat16``
        (:mod:`mpicdc.core.wirefmt`); decoding is always in float32.
    master_device : emulate this device on the master: every layer it runs takes the device's modeled
        time (:mod:`mpicdc.runtime.emulate`); None: this machine's speed.
    """

    def __init__(self, data: Channel, ctrl: Channel, model, plan, master_weights, *, layer_timeout_s=30.0,
                 max_outstanding=16, poll_s=1e-4, integrity="opportunistic", wire_format="float32",
                 master_device=None):
        if integrity not in INTEGRITY_MODES:
            raise ValueError(f"integrity mode {integrity!r}: use one of {', '.join(INTEGRITY_MODES)}")
        self.integrity = integrity
        self.wire = get_format(wire_format)
        self.pacer = None if master_device is None else MasterPacer(master_device, model)
        self.data, self.ctrl = data, ctrl
        self.model, self.plan, self.master_weights = model, plan, master_weights
        self.layer_timeout_s, self.max_outstanding, self.poll_s = layer_timeout_s, max_outstanding, poll_s
        self.shapes = model.shapes()
        self.linear_index = {layer.name: i for i, layer in enumerate(model.linear_layers)}
        self.tags = wire.ReplyTags(len(self.linear_index), data.tag_ub)
        self.accumulation = {name: cols for name, (_, cols) in model.weight_shapes().items()}
        for lp in plan.layers:  # a grouped layer's embedded parity sums one slab of cols per data block
            self.accumulation[lp.layer] = max(stored_cols(model, lp, b) for b in range(lp.n + lp.r))
        self.dead: set = set()
        self.silent: set = set()
        self.quarantined: set = set()  # ranks located sending wrong values: never used again
        self.late_checks: dict = {}    # (request, layer index) -> _LateCheck
        self.flags: list = []          # the current request's IntegrityFlags
        self.late_pool: list = []
        self.arrivals: list = []
        self.next_request = 0
        self.healer = None  # healing.Healer when the job has spare ranks

    # ------------------------------------------------------------ request path
    def infer(self, x) -> RequestResult:
        """Serve one request (batch 1).  Local to rank 0; never raises for lost ranks."""
        x = check_input(self.model, x)
        request = self.next_request
        self.next_request += 1
        self._refresh_dead()
        records = []
        self.flags = flags = []  # the result holds this list: late checks may still add to it
        start = time.perf_counter()
        try:
            output = walk(self.model, x, _MasterExecutor(self, request, records))
        except (RequestFailed, wire.WireRangeError) as exc:
            log.error("%s", exc)
            return RequestResult(request, None, time.perf_counter() - start, records, str(exc), flags)
        return RequestResult(request, output, time.perf_counter() - start, records, integrity=flags)

    def _targets(self, lp):
        gone = self.dead | self.silent | self.quarantined
        return [(block, rank) for block, rank in enumerate(lp.ranks) if rank not in gone]

    def _distributed(self, layer, lp, x, request, record):
        li = self.linear_index[layer.name]
        out_shape = self.shapes[layer.name]
        shape = slices.reply_shape(self.model, lp)  # every block's product: (rows, cols)
        tag = self.tags.tag(request, li)
        code = lp.code_obj
        jobs = self._jobs(layer, lp, x, request, li)
        pending = {}
        sent_at = time.perf_counter()
        record.sent_bytes += self._send_job(lp, jobs, tag, shape, self._targets(lp), pending, request, li, sent_at)
        own = self._master_band(layer, lp, x, record)  # while the sends go out (the progress thread)
        received = {}
        decodable_at = None
        while not self._ready(code, received, pending, sent_at):
            self._poll(pending, received, layer.name, record)
            if decodable_at is None and code.decodable(received):
                decodable_at = time.perf_counter()
            if self._ready(code, received, pending, sent_at):
                break
            # a silent rank is not a dead one: its pending reply may still come
            alive = set(received) | {b for b, p in pending.items() if p.rank not in self.dead}
            if not code.decodable(alive):
                # before giving up, ask the live ranks this layer did not use (silent when it
                # started, or re-admitted since): a stall that overlaps losses costs time, not the request
                unused = [(b, r) for b, r in enumerate(lp.ranks) if b not in alive and b not in received
                          and r not in self.dead | self.quarantined and r not in record.out_of_range]
                record.sent_bytes += self._send_job(lp, jobs, tag, shape, unused, pending, request, li, sent_at)
                alive |= {b for b, p in pending.items() if p.rank not in self.dead}
            lost = [r for b, r in enumerate(lp.ranks) if b not in alive]
            if not code.decodable(alive):
                self._retire(pending, layer.name)
                raise RequestFailed(request, layer.name, lost, code.tolerance,
                                    "too many ranks lost for the code to decode" + self._range_note(record))
            if time.perf_counter() - sent_at > self.layer_timeout_s:
                silent = [p.rank for p in pending.values()]
                self._retire(pending, layer.name)
                raise RequestFailed(request, layer.name, lost + silent, code.tolerance,
                                    f"no decodable set of replies within {self.layer_timeout_s:g} s")
            time.sleep(self.poll_s)
        record.wait_s = time.perf_counter() - sent_at
        if decodable_at is not None and self.integrity == "strict":
            record.check_wait_s = time.perf_counter() - decodable_at
        if self.integrity != "off":
            received = self._check(lp, layer.name, request, received, shape, record)
        if lp.banded:
            out = self._assemble_bands(layer, lp, received, shape, record, own)
        else:
            out = self._assemble_rows(lp, received, out_shape, shape, record)
        record.used = sorted(lp.ranks[b] for b in received)
        record.received_bytes = sum(buf.nbytes for buf in received.values())
        record.decoded_blocks = sorted(set(range(lp.n)) - set(received))
        record.missing_ranks = [lp.ranks[b] for b in record.decoded_blocks]
        heads = [wire.Header.unpack(buf) for buf in received.values()]
        record.compute_s = max(h.compute_s for h in heads)
        record.modeled_s = max(h.modeled_s for h in heads)
        record.late = sorted(p.rank for p in pending.values())
        if pending and self.integrity != "off":
            self.late_checks[request, li] = _LateCheck(code, self.accumulation[layer.name], lp.ranks,
                                                       shape, dict(received), self.flags,
                                                       layer.name, self._roundoff(lp),
                                                       next((f for f in self.flags if f.layer == layer.name), None))
        self._retire(pending, layer.name)
        return out.reshape(out_shape)

    def _assemble_rows(self, lp, received: dict, out_shape: tuple, shape: tuple, record: LayerRecord) -> np.ndarray:
        """Decode the missing row blocks and stack the blocks into the layer output ``(rows, cols)``."""
        out = np.empty((out_shape[0], shape[1]), dtype=np.float32)
        # rebuilt blocks are written straight into the layer output when they need no trimming
        direct = {b: out[start:stop] for b, (start, stop) in enumerate(lp.rows)
                  if b not in received and stop - start == lp.block_rows}
        t0 = time.perf_counter()
        data = lp.code_obj.decode({b: wire.payload(buf, shape) for b, buf in received.items()}, out=direct)
        record.decode_s = time.perf_counter() - t0
        for b, ((start, stop), blockdata) in enumerate(zip(lp.rows, data)):
            if b not in direct:
                out[start:stop] = blockdata[:stop - start]
        record.assemble_s = time.perf_counter() - t0 - record.decode_s
        return out

    def _master_band(self, layer, lp, x, record: LayerRecord):
        """The master's own band of a band layer (``lp.master_rows``), no bias; None when it has none.
        Padded to the emulated master device's time (``--master-device``)."""
        if not (lp.banded and lp.master_rows):
            return None
        start = time.perf_counter()
        geo = bands.layer_geometry(self.model, lp)
        out = bands.master_conv(geo, self.master_weights[layer.name][0], x)
        if self.pacer is not None:
            rows, cols = self.model.weight_shapes()[layer.name]
            rest = float(self.pacer.device.gemm_time(rows, cols, out[0].size)) - (time.perf_counter() - start)
            if rest > 0:
                time.sleep(rest)
        record.master_s = time.perf_counter() - start
        return out

    def _assemble_bands(self, layer, lp, received: dict, shape: tuple, record: LayerRecord, own=None) -> np.ndarray:
        """Decode the missing bands and put them and the master's own band (``own``) together into the
        layer output, plus the bias."""
        t0 = time.perf_counter()
        data = lp.code_obj.decode({b: wire.payload(buf, shape) for b, buf in received.items()})
        record.decode_s = time.perf_counter() - t0
        out = bands.layer_geometry(self.model, lp).assemble(data, self.master_weights[layer.name][1], own)
        record.assemble_s = time.perf_counter() - t0 - record.decode_s
        return out

    def _roundoff(self, lp) -> float:
        """The wire format's unit roundoff a layer's check allows for.  A band split's inputs were rounded
        to it too (a parity input is the rounded combination of the bands, not the combination of the
        rounded bands): counted twice."""
        return self.wire.roundoff * (2 if lp.banded else 1)

    def _ready(self, code, received: dict, pending: dict, sent_at: float) -> bool:
        """Whether to decode now: decodable, and in strict mode checkable (or nothing more can come)."""
        if not code.decodable(received):
            return False
        if self.integrity != "strict" or not pending or time.perf_counter() - sent_at > self.layer_timeout_s:
            return True
        count, covered = checks.coverage(code, received)
        return covered and count >= (2 if code.kind == "mds" and code.r >= 2 else 1)

    def _check(self, lp, layer_name: str, request: int, received: dict, shape: tuple, record: LayerRecord) -> dict:
        """Check the decoding set; returns it without a located wrong block (whose rank is quarantined)."""
        code = lp.code_obj
        replies = {b: wire.payload(buf, shape) for b, buf in received.items()}
        verdict = checks.check(code, replies, self.accumulation[layer_name], self._roundoff(lp))
        record.checks = verdict.checks
        if verdict.ok:
            return received
        suspect = verdict.suspect
        rest = {b: buf for b, buf in received.items() if b != suspect}
        corrected = suspect is not None and code.decodable(rest)
        rank = None if suspect is None else lp.ranks[suspect]
        self.flags.append(IntegrityFlag(layer_name, rank, verdict.residual, verdict.tolerance, corrected, False))
        self._report(layer_name, request, verdict, rank, "decoded without it" if corrected else
                     "output flagged")
        return rest if corrected else received

    def _check_late(self, p: _Pending) -> None:
        """A late reply of an answered layer: check it with the replies that layer had; flag, quarantine."""
        late = self.late_checks.get((p.request, p.layer_index))
        if late is None or p.rank in self.quarantined:
            return
        reply = wire.payload(p.buf, late.shape)
        if not np.isfinite(reply).all():
            return
        late.replies[p.block] = p.buf
        verdict = checks.check(late.code, {b: wire.payload(buf, late.shape) for b, buf in late.replies.items()},
                               late.accumulation, late.roundoff)
        if verdict.ok:
            return
        rank = None if verdict.suspect is None else late.ranks[verdict.suspect]
        if late.flag is None:
            late.flag = IntegrityFlag(late.layer, rank, verdict.residual, verdict.tolerance, False, True)
            late.flags.append(late.flag)
        elif late.flag.rank is None and rank is not None:  # a later reply located the wrong block
            late.flag.rank = rank
        else:
            return
        self._report(late.layer, p.request, verdict, rank, "found after the request was answered")

    def _report(self, layer_name: str, request: int, verdict, rank, outcome: str) -> None:
        """Tell the user in one line; quarantine a located rank."""
        if rank is None:
            log.warning("request %d, layer %r: replies inconsistent with the code (residual %.3g > tolerance "
                        "%.3g), wrong rank not locatable; %s", request, layer_name, verdict.residual,
                        verdict.tolerance, outcome)
            return
        if rank not in self.quarantined:
            self.quarantined.add(rank)
            log.warning("rank %d sent wrong values (request %d, layer %r: residual %.3g > tolerance %.3g), %s; "
                        "quarantined: no longer used for decoding (counted as lost)", rank, request, layer_name,
                        verdict.residual, verdict.tolerance, outcome)

    def _jobs(self, layer, lp, x, request: int, li: int) -> dict:
        """``{block: job message}``: the layer input in the wire format, or only the input channels a
        block reads (:mod:`~mpicdc.runtime.slices`); blocks needing the same part share one message.
        A band split: each data block its band of the input, each parity block the code's combination
        of the bands (:mod:`mpicdc.core.bands`)."""
        what = f"request {request} failed at layer {layer.name!r}: its input"
        if lp.banded:
            parts = bands.layer_geometry(self.model, lp).inputs(x, lp.code_obj)
            return {block: wire.message(wire.Header(wire.JOB, request, li, -1, part.shape, wire=self.wire.code),
                                        part, what) for block, part in enumerate(parts)}
        made, jobs = {}, {}
        for block in range(len(lp.ranks)):
            channels = slices.needed_channels(self.model, lp, block)
            if channels not in made:
                part = slices.job_input(self.model, lp, block, x)
                made[channels] = wire.message(wire.Header(wire.JOB, request, li, -1, part.shape, wire=self.wire.code),
                                              part, what)
            jobs[block] = made[channels]
        return jobs

    def _send_job(self, lp, jobs, tag, shape, targets, pending, request, li, sent_at) -> int:
        """Post each target's reply receive and send it its job; a rank found lost is marked dead.
        Returns the bytes sent."""
        sent = 0
        for block, rank in targets:
            buf = wire.reply_buffer(*shape, self.wire.code)
            try:
                handle = self.data.irecv(buf, rank, tag)
                self.data.isend(jobs[block], rank, wire.TAG_JOB)  # the channel keeps the request until released
            except PeerLost:
                self._mark_dead(rank)
                continue
            sent += jobs[block].nbytes
            pending[block] = _Pending(handle, buf, rank, block, request, li, sent_at, buf.nbytes)
        return sent

    def _retire(self, pending: dict, layer_name: str) -> None:
        """Keep still-open receives of a finished layer posted, to drain and time their late replies."""
        for p in pending.values():
            self.late_pool.append((p, layer_name))
        pending.clear()
        self._reap_silent()

    def _poll(self, pending: dict, received: dict, layer_name: str, record: LayerRecord) -> None:
        """Test the current layer's receives and the late pool once (non-blocking)."""
        entries = [(p, layer_name, True) for p in pending.values()] + [(p, name, False) for p, name in self.late_pool]
        if not entries:
            return
        done = self.data.testsome([e[0].handle for e in entries])
        if any(nbytes is None for _, nbytes in done):
            self._refresh_dead()
        now = time.perf_counter()
        finished = set()
        for i, nbytes in done:
            p, name, current = entries[i]
            finished.add(id(p))
            status = self._judge(p, nbytes, name, current)
            self.arrivals.append(Arrival(p.request, name, p.rank, now - p.sent_at, not current, status))
            if status == "failed":
                self._mark_dead(p.rank)
            elif p.rank in self.silent:
                self._readmit(p.rank)
            if status == "reply" and not current:
                self._check_late(p)
            if current:
                del pending[p.block]
                if status == "reply" and p.rank not in self.quarantined:
                    received[p.block] = p.buf
                elif status in ("failed", "bad", "range"):
                    record.failed.append(p.rank)
                    if status == "range":  # asking it again cannot help
                        record.out_of_range.append(p.rank)
        if finished:
            self.late_pool = [(p, n) for p, n in self.late_pool if id(p) not in finished]
            waiting = {(p.request, p.layer_index) for p, _ in self.late_pool}
            self.late_checks = {k: v for k, v in self.late_checks.items() if k in waiting}

    def _judge(self, p: _Pending, nbytes: int, layer_name: str, current: bool) -> str:
        """Status of one completed receive: a usable reply, a skip, a bad reply or a lost rank.

        A reply of the wrong size or with non-finite values is refused (logged, decoded
        around) without declaring the rank dead: the next layer may be fine.
        """
        head = wire.Header.unpack(p.buf)
        if head.kind == 0:  # nothing arrived: the receive completed in error
            if p.rank in self.dead:
                return "failed"
            log.warning("rank %d: its reply for layer %r could not be received; decoding around it",
                        p.rank, layer_name)
            return "bad"
        if head.request != p.request or head.layer != p.layer_index:
            return "failed"
        if head.kind == wire.SKIPPED:
            return "skipped"
        if head.kind == wire.REFUSED:  # the worker found the job malformed and said why in its log
            return "bad"
        if head.kind == wire.OUT_OF_RANGE:
            log.warning("rank %d: its block of layer %r exceeds the %s wire format's range; decoding around it",
                        p.rank, layer_name, self.wire.name)
            return "range"
        if head.kind != wire.REPLY:
            return "failed"
        if head.wire != self.wire.code:  # same size for float16 and bfloat16: only the header tells
            log.warning("rank %d replied for layer %r in wire format code %d, the job uses %s (code %d); "
                        "decoding around it", p.rank, layer_name, head.wire, self.wire.name, self.wire.code)
            return "bad"
        if nbytes is None:  # the library did not say this receive's size: the header's shape does
            nbytes = wire.payload_bytes(head.shape, head.wire)
        if nbytes != p.expected_bytes:
            log.warning("rank %d sent %d bytes for layer %r, expected %d; decoding around it",
                        p.rank, nbytes, layer_name, p.expected_bytes)
            return "bad"
        if current and not wire.payload_finite(p.buf):
            log.warning("rank %d sent non-finite values for layer %r; decoding around it", p.rank, layer_name)
            return "bad"
        return "reply"

    def _range_note(self, record: LayerRecord) -> str:
        """Why replies were out of range, for a failed layer's message ("" if none were)."""
        ranks = sorted(record.out_of_range)
        if not ranks:
            return ""
        fix = "--wire bfloat16 or float32" if self.wire.name == "float16" else "--wire float32"
        return (f"; rank(s) {ranks} found the layer's output beyond the {self.wire.name} wire format's "
                f"range (use {fix})")

    def _refresh_dead(self) -> None:
        for rank in self.data.failed():
            self._mark_dead(rank)

    def _mark_dead(self, rank: int) -> None:
        self.silent.discard(rank)
        if rank not in self.dead:
            log.warning("rank %d failed; decoding around it from now on", rank)
            self.dead.add(rank)

    def _readmit(self, rank: int) -> None:
        """A silent rank answered again: send it work again (the tolerance it took is restored)."""
        self.silent.discard(rank)
        log.warning("rank %d answers again; sending it work again (tolerance restored)", rank)

    def _reap_silent(self) -> None:
        """Stop sending work to live ranks that left too many jobs unanswered (hung or stalled workers)."""
        counts: dict = {}
        for p, _ in self.late_pool:
            counts[p.rank] = counts.get(p.rank, 0) + 1
        for rank, count in counts.items():
            if count >= self.max_outstanding and rank not in self.silent | self.dead:
                log.warning("rank %d has not answered %d jobs; no longer sending it work until it answers "
                            "(tolerance reduced)", rank, count)
                self.silent.add(rank)

    def can_serve(self) -> bool:
        """Whether every distributed layer is still decodable from the ranks not lost."""
        gone = self.dead | self.silent | self.quarantined
        return all(lp.code_obj.decodable([b for b, r in enumerate(lp.ranks) if r not in gone])
                   for lp in self.plan.layers)

    # ------------------------------------------------------------ shutdown
    def drain(self, seconds: float) -> None:
        """Collect late replies for up to ``seconds`` (so their arrival times are recorded)."""
        end = time.perf_counter() + seconds
        self._refresh_dead()
        while self.late_pool and time.perf_counter() < end:
            live = [(p, n) for p, n in self.late_pool if p.rank not in self.dead | self.silent]
            if not live:
                break
            self._poll({}, {}, "", LayerRecord(""))
            time.sleep(1e-3)

    def stop_workers(self, timeout_s: float = 5.0) -> list:
        """Tell every live worker to stop and wait (bounded) for acknowledgements.

        Returns the ranks that did not acknowledge in time (hung or dead).
        """
        stop = wire.message(wire.Header(wire.STOP))
        waiting = {}
        for rank in range(1, self.ctrl.size):
            if rank in self.dead:
                continue
            ack = np.zeros(wire.HEADER_BYTES, dtype=np.uint8)
            try:
                self.ctrl.isend(stop, rank, wire.TAG_CTRL)
                waiting[rank] = self.ctrl.irecv(ack, rank, wire.TAG_CTRL)
            except PeerLost:
                continue
        end = time.perf_counter() + timeout_s
        while waiting and time.perf_counter() < end:
            ranks = list(waiting)
            for i, _ in self.ctrl.testsome([waiting[r] for r in ranks]):
                del waiting[ranks[i]]
            time.sleep(1e-3)
        return sorted(waiting)
