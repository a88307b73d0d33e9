"""The worker loop: receive a layer input, compute this rank's row block, reply.

A worker holds only its own shard (one weight row block per distributed
layer, already encoded for parity ranks; the whole kernel of a layer split
into bands, which it convolves over the band of input it was sent).  It never blocks on a collective,
skips a job when a newer one is already waiting (it has fallen behind and the
master has moved on), and is ended by a control message that a watchdog
thread listens for, so that even a worker stuck in its compute loop ends in
bounded time.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from mpicdc.core import bands
from mpicdc.core.faults import corrupt_block
from mpicdc.core.grouped import block_gemm
from mpicdc.core.kernels import Workspace
from mpicdc.runtime import slices, wire
from mpicdc.runtime.channel import Channel, PeerLost

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """What one worker knows: its blocks, the layer order and the emulation/injection settings."""

    rank: int
    model: object            # Model
    plan: object             # Plan
    blocks: dict             # {layer: (W_block, b_block)}
    injections: object = None  # faults.Injections or None
    device: object = None    # devices.DeviceModel to emulate, or None
    seed: int = 0
    poll_s: float = 2e-4


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - nothing left to report to
            pass
    os._exit(code)


def start_watchdog(ctrl: Channel, stop_event: threading.Event, hard_exit: bool, grace_s: float = 0.5,
                   on_master_lost=None):
    """Listen on the control channel for the master's STOP (or its death).

    On STOP the watchdog acknowledges and sets ``stop_event``; with ``hard_exit``
    (ULFM runs) it then ends the process after ``grace_s`` even if the main loop
    is stuck.  If the master dies, ``on_master_lost()`` runs (default: end the
    process with code 1, since nothing is left to serve).
    """
    def watch():
        buf = np.zeros(wire.HEADER_BYTES, dtype=np.uint8)
        try:
            handle = ctrl.irecv(buf, 0, wire.TAG_CTRL)
            while not ctrl.testsome([handle]):
                time.sleep(0.05)
        except PeerLost:
            pass
        if wire.Header.unpack(buf).kind != wire.STOP:
            log.error("rank %d lost the master; exiting", ctrl.rank)
            (on_master_lost or (lambda: _exit_now(1)))()
            return
        try:
            ctrl.send(wire.message(wire.Header(wire.STOP)), 0, wire.TAG_CTRL)
        except PeerLost:
            pass
        stop_event.set()
        if hard_exit:
            time.sleep(grace_s)
            _exit_now(0)

    thread = threading.Thread(target=watch, name="mpicdc-watchdog", daemon=True)
    thread.start()
    return thread


def _fire(injection, rank: int, stop_event: threading.Event) -> None:
    """Carry out a crash, hang or exit injection in this worker."""
    log.warning("rank %d: injected %s", rank, injection.kind)
    if injection.kind == "crash":
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif injection.kind == "exit":
        _exit_now(injection.exit_code)
    elif injection.kind == "hang":
        while not stop_event.is_set():  # stop replying; only the watchdog can end this
            time.sleep(0.05)


class MasterLost(RuntimeError):
    """This worker can no longer reach the master."""


def _job_problem(state: WorkerState, head: wire.Header, nbytes: int, layers: list, mine: dict) -> str | None:
    """Why a job cannot be computed here (wrong layer, shape, wire format or size), or ``None``."""
    if not 0 <= head.layer < len(layers) or layers[head.layer].name not in mine:
        return f"layer index {head.layer} is not one of this rank's layers"
    layer = layers[head.layer]
    want = slices.job_shape(state.model, *mine[layer.name])  # a grouped block: only its groups' channels
    if tuple(head.shape) != tuple(want):
        return f"input of shape {head.shape} for layer {layer.name!r}, which takes {want} here"
    try:
        fmt = head.format
    except ValueError as exc:
        return str(exc)
    need = wire.payload_bytes(want, head.wire)
    if nbytes != need:
        return f"{nbytes} bytes for layer {layer.name!r}, which takes {need} in {fmt.name}"
    return None


def worker_loop(data: Channel, state: WorkerState, stop_event: threading.Event) -> None:
    """Serve jobs from rank 0 until the watchdog sees STOP.  Local to this rank (no collectives).

    Raises :class:`MasterLost` when the master cannot be reached.
    """
    layers = state.model.linear_layers
    mine = {lp.layer: (lp, block) for lp, block in state.plan.rank_blocks(state.rank)}
    tags = wire.ReplyTags(len(layers), data.tag_ub)
    rng = np.random.default_rng([state.seed, state.rank])
    delay = state.injections.delay_for(state.rank) if state.injections is not None else None
    last_request = None
    workspace = Workspace()  # lowering scratch, reused across layers and requests
    while not stop_event.is_set():
        try:
            nbytes = data.probe(0, wire.TAG_JOB)
            if nbytes is None:
                time.sleep(state.poll_s)
                continue
            buf = np.empty(nbytes, dtype=np.uint8)
            data.recv(buf, 0, wire.TAG_JOB)
        except PeerLost:
            raise MasterLost(f"rank {state.rank} lost the master") from None
        if nbytes < wire.HEADER_BYTES:
            log.error("rank %d: ignoring a %d-byte job (shorter than a header)", state.rank, nbytes)
            continue
        head = wire.Header.unpack(buf)
        if head.kind == wire.STOP:
            return
        problem = _job_problem(state, head, nbytes, layers, mine)
        if problem:
            log.error("rank %d refuses a job: %s", state.rank, problem)
            if 0 <= head.layer < len(layers) and head.request >= 0:  # else there is no reply tag to use
                _reply(data, wire.message(wire.Header(wire.REFUSED, head.request, head.layer)),
                       tags.tag(head.request, head.layer))
            continue
        tag = tags.tag(head.request, head.layer)
        layer = layers[head.layer]
        lp, block = mine[layer.name]
        first = head.request != last_request
        last_request = head.request
        if state.injections is not None:
            injection = state.injections.action_for(state.rank, head.request, layer.name, first)
            if injection is not None:
                _fire(injection, state.rank, stop_event)
                return
        if data.probe(0, wire.TAG_JOB) is not None:  # fallen behind: the master already moved on
            _reply(data, wire.message(wire.Header(wire.SKIPPED, head.request, head.layer, block)), tag)
            continue
        start = time.perf_counter()
        W, b = state.blocks[layer.name]
        x = slices.full_input(state.model, lp, block, wire.payload(buf, head.shape))
        if lp.banded:  # the whole kernel over its band (or the bands' combination), no bias
            out = bands.band_conv(bands.layer_geometry(state.model, lp), W, x, workspace=workspace)
        else:
            Y, lowered = block_gemm(layer, lp, block, W, b, x, workspace=workspace)  # grouped: own channels
            out = lowered.finish(Y)
        compute = time.perf_counter() - start
        modeled = 0.0
        if state.device is not None:  # emulate a slower device: pad to its modeled time
            modeled = emulated_seconds(state.device, W.shape, out, buf.nbytes - wire.HEADER_BYTES,
                                       head.format.nbytes(out.size))
            if modeled > compute:
                time.sleep(modeled - compute)
        if delay is not None:
            time.sleep(float(delay.sample(rng)))
        wrong = state.injections.corruption_for(state.rank, head.request, layer.name) \
            if state.injections is not None else None
        if wrong is not None:  # after computing: the reply is well-formed, only its values are wrong
            out = np.array(out, dtype=np.float32, order="C")
            corrupt_block(out, wrong.corruption, np.random.default_rng([state.seed, state.rank, head.request,
                                                                        head.layer]))
            log.warning("rank %d: injected %s corruption into request %d, layer %r", state.rank,
                        wrong.corruption, head.request, layer.name)
        try:  # the reply goes back in the job's wire format
            reply = wire.message(wire.Header(wire.REPLY, head.request, head.layer, block, out.shape, compute,
                                             modeled, head.wire), out, f"rank {state.rank}, layer {layer.name!r}")
        except wire.WireRangeError as exc:
            log.warning("%s", exc)
            reply = wire.message(wire.Header(wire.OUT_OF_RANGE, head.request, head.layer, block))
        _reply(data, reply, tag)


def emulated_seconds(device, weight_shape, out: np.ndarray, input_bytes: int, reply_bytes: int | None = None) -> float:
    """Time a ``device`` would take for this block: its GEMM plus receiving the input and sending the reply
    (``reply_bytes`` on the wire; default ``out.nbytes``, float32).

    Uses :meth:`DeviceModel.gemm_time` (compute- or memory-bound) and
    :meth:`DeviceModel.transfer_time` on the device's own link, as :mod:`mpicdc.sim` does.
    """
    rows, cols = weight_shape
    spatial = out.size // max(1, out.shape[0])
    return float(device.gemm_time(rows, cols, spatial) + device.transfer_time(input_bytes)
                 + device.transfer_time(out.nbytes if reply_bytes is None else reply_bytes))


def _reply(data: Channel, buf: np.ndarray, tag: int) -> None:
    try:
        data.send(buf, 0, tag)
    except PeerLost:
        raise MasterLost(f"rank {data.rank} could not reach the master") from None
