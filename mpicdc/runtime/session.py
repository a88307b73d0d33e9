"""Start-up, roles and shutdown of a distributed inference job.

:func:`serve` starts the job on every rank.  Start-up is a point-to-point
handshake on the control channel, each wait with a deadline, so a rank that
dies or freezes while the job starts ends it with one message naming it:
rank 0 finds or prepares the shard directory and tells the workers; every rank
checks the world size and loads and verifies its own shard file and reports to
rank 0; rank 0 answers with a verdict.  Then the roles split by return value:
rank 0 gets a :class:`Session` (a context manager) to run requests; workers
run their loop and get ``None``.  Process exit is :func:`end_process`'s, called
by :func:`mpicdc.run.main`.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpicdc.core.models import get_model
from mpicdc.core.plan import make_plan, parity_count, single_device_plan
from mpicdc.runtime import wire
from mpicdc.runtime.channel import Channel, PeerLost
from mpicdc.runtime.comms import JobComms
from mpicdc.runtime.healing import Healer, load_shard, spare_loop
from mpicdc.runtime.master import Coordinator
from mpicdc.runtime.mpienv import report_exit_code
from mpicdc.runtime.worker import WorkerState, start_watchdog, worker_loop

log = logging.getLogger(__name__)

_TEXT_BYTES = 4096
_GO = "go"  # rank 0's verdict when every rank started (start-up texts are never empty)


class StartupError(RuntimeError):
    """The job cannot start; the message says why on which rank and what to do."""


@dataclass(frozen=True)
class RunConfig:
    """Settings of one job.

    model : zoo model name.
    weights : shard directory; default ``weights/<model>-<plan tag>`` for the world size.
    code, parity : the code used when preparing a missing default directory.
    prepare_missing : prepare random-weight shards on rank 0 when the default directory is absent
        (only sensible where all ranks share a file system, as on one machine).
    injections : fault-injection specs (see :mod:`mpicdc.core.faults`).
    device : name of a device model to emulate on workers (see :mod:`mpicdc.sim.devices`).
    layer_timeout_s : a layer with no decodable set of replies after this long fails its request.
    startup_timeout_s : how long any start-up step (MPI start, loading a shard, a rank's report)
        may take before the job ends naming the ranks it waited for.
    seed : seed for random weights and injected delays.
    integrity : checking replies against the code: off, opportunistic or strict (see the master).
    spares : idle ranks after the plan's ranks that take a lost rank's place (:mod:`~mpicdc.runtime.healing`).
    wire : wire format of activations and replies: float32, float16 or bfloat16 (:mod:`mpicdc.core.wirefmt`).
    workers : data workers of a default directory; ``0`` serves the model on rank 0 alone (every layer
        on the master, a world of one rank: the one-device baseline); None: from the world size.
    master_device : emulate this device's speed on the master too (every layer it runs); None: this machine.
    """

    model: str
    weights: str | None = None
    code: str = "sum"
    parity: int | None = None
    prepare_missing: bool = True
    injections: tuple = ()
    device: str | None = None
    layer_timeout_s: float = 30.0
    startup_timeout_s: float = 60.0
    seed: int = 0
    weights_root: str = "weights"
    integrity: str = "opportunistic"
    spares: int = 0
    wire: str = "float32"
    workers: int | None = None
    master_device: str | None = None


class Session:
    """Rank 0's handle on a running job: :meth:`infer` requests; closing stops the workers.

    A context manager: leaving it (or :meth:`close`) drains late replies briefly,
    stops the workers (bounded) and frees the job's communicators.
    """

    def __init__(self, comms: JobComms, coordinator: Coordinator, manifest):
        self.comms, self.coordinator, self.manifest = comms, coordinator, manifest
        self.model, self.plan = manifest.model, manifest.plan
        self.unacknowledged: list = []

    @property
    def ulfm(self) -> bool:
        return self.comms.ulfm

    def infer(self, x):
        return self.coordinator.infer(x)

    @property
    def dead(self) -> set:
        return set(self.coordinator.dead)

    @property
    def silent(self) -> set:
        return set(self.coordinator.silent)

    def close(self, drain_s: float = 0.5) -> list:
        """Drain late replies, stop the workers and free the communicators; returns ranks that did not stop."""
        if self.comms.closed:
            return self.unacknowledged
        try:
            self.coordinator.drain(drain_s)
            self.unacknowledged = self.coordinator.stop_workers()
            self._end_stuck(self.unacknowledged)
        finally:
            self.comms.close()
        return self.unacknowledged

    def _end_stuck(self, ranks: list) -> None:
        """SIGKILL workers on this machine that did not stop (frozen or hung), so the job can end."""
        here = socket.gethostname()
        for rank in ranks:
            host, pid = self.comms.processes.get(rank, ("", 0))
            if host == here and pid > 0 and rank not in self.coordinator.dead:
                try:
                    os.kill(pid, signal.SIGKILL)
                    log.warning("rank %d did not stop when asked (frozen or hung); killed it (pid %d)", rank, pid)
                except OSError:
                    pass

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- start-up handshake (control channel)

def _text_message(text: str) -> np.ndarray:
    buf = np.zeros(_TEXT_BYTES, dtype=np.uint8)
    raw = text.encode()[:_TEXT_BYTES - 1]
    buf[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return buf


def _text_of(buf: np.ndarray) -> str:
    return bytes(buf).rstrip(b"\0").decode(errors="replace")


def _gather_texts(ctrl: Channel, ranks: list, timeout_s: float) -> tuple:
    """Receive one text from each of ``ranks`` within ``timeout_s``: ``({rank: text}, [ranks lost or late])``.

    Every start-up text is non-empty, so a receive that completed in error (its buffer still
    zero, whatever size the library reported) counts as lost.
    """
    bufs, handles = {}, {}
    for rank in ranks:
        bufs[rank] = np.zeros(_TEXT_BYTES, dtype=np.uint8)
        try:
            handles[rank] = ctrl.irecv(bufs[rank], rank, wire.TAG_START)
        except PeerLost:
            pass
    texts, end = {}, time.monotonic() + timeout_s
    while len(texts) < len(handles) and time.monotonic() < end:
        waiting = [r for r in handles if r not in texts]
        for i, nbytes in ctrl.testsome([handles[r] for r in waiting]):
            texts[waiting[i]] = _text_of(bufs[waiting[i]]) or None
        time.sleep(1e-3)
    got = {r: text for r, text in texts.items() if text is not None}
    return got, sorted(set(ranks) - set(got))


def _send_texts(ctrl: Channel, ranks: list, text: str) -> None:
    message = _text_message(text)
    sends = []
    for rank in ranks:
        try:
            sends.append(ctrl.isend(message, rank, wire.TAG_START))
        except PeerLost:
            pass
    end = time.monotonic() + 5.0
    while sends and time.monotonic() < end:
        sends = [s for s in sends if not ctrl.test(s)]
        time.sleep(1e-3)


def _from_master(ctrl: Channel, timeout_s: float, what: str) -> str:
    """Worker: the next start-up text from rank 0 (``"!..."`` = the job cannot start)."""
    got, _ = _gather_texts(ctrl, [0], timeout_s)
    if 0 not in got:
        raise StartupError(f"rank {ctrl.rank} heard nothing from the master within {timeout_s:g} s ({what})")
    return got[0]


def _startup_failure(reports: dict, missing: list, timeout_s: float) -> str | None:
    """One message for every start-up problem (the same problem on many ranks is said once)."""
    problems = sorted((r, m) for r, m in reports.items() if m)
    parts = []
    if problems:
        first = problems[0][1]
        if all(m == first for _, m in problems):
            parts.append(first)
        else:
            parts.extend(f"rank {r}: {m}" for r, m in problems)
    if missing:
        parts.append(f"rank(s) {', '.join(map(str, missing))} did not report within {timeout_s:g} s of start-up "
                     "(dead, frozen or unreachable)")
    return "; ".join(parts) or None


def resolve_weights(config: RunConfig, world_size: int) -> Path:
    """Rank 0: the shard directory for this job, prepared with random weights if missing and allowed."""
    from mpicdc import store

    if config.weights:
        return Path(config.weights)
    model = get_model(config.model)
    if config.workers == 0:
        if world_size != 1:
            raise StartupError(f"--workers 0 serves the model on the master alone, but the job has {world_size} "
                               f"ranks: launch it on one rank (mpirun -np 1 ..., python -m mpicdc.launch -np 1 ...)")
        plan = single_device_plan(model)
        return _ensure(config, model, plan)
    r = parity_count(config.code, config.parity)
    workers = world_size - 1 - r
    if config.workers is not None and workers != config.workers:
        raise StartupError(f"--workers {config.workers} with code {config.code!r} ({r} parity worker(s)) needs "
                           f"{config.workers + r + 1} ranks, but the job has {world_size}: launch with "
                           f"-np {config.workers + r + 1}")
    if workers < 1:
        least = r + 2 + config.spares
        spares = f" and {config.spares} spare(s)" if config.spares else ""
        raise StartupError(f"a world of {world_size + config.spares} rank(s) leaves no data worker for code "
                           f"{config.code!r} with {r} parity worker(s){spares}: launch at least {least} ranks "
                           f"(mpirun -np {least} ...), or serve the model on this rank alone with --workers 0")
    return _ensure(config, model, make_plan(model, workers, r, config.code))


def _ensure(config: RunConfig, model, plan) -> Path:
    """The default folder of ``plan``: prepared with random weights if missing and allowed."""
    from mpicdc import store

    directory = store.default_dir(model.name, plan, root=config.weights_root)
    if not config.prepare_missing and not (directory / store.MANIFEST_NAME).exists():
        raise StartupError(f"{directory}: no prepared weights; run: "
                           f"{store.prepare_command(model.name, plan, model=model)}")
    return store.ensure_prepared(model, plan, config.weights_root, config.seed, check=False)


def _load_rank(config: RunConfig, directory: str, rank: int, size: int):
    """This rank's part of the job: the manifest, its shard, the injections and device model (or ValueError).

    A spare (a rank after the plan's) loads no shard yet: its blocks are ``None``.
    """
    from mpicdc import store

    manifest = store.open_manifest(directory)
    if manifest.model.name != config.model:
        raise ValueError(f"{directory} holds weights for model {manifest.model.name!r}, not {config.model!r}")
    store.check_world(manifest, size, spares=config.spares)
    blocks = None if rank >= size - config.spares else store.load_rank(directory, rank, manifest)
    injections = device = None
    if config.injections:
        from mpicdc.core.faults import parse_injections
        injections = parse_injections(list(config.injections))
        injections.validate(size, [layer.name for layer in manifest.model.layers])
    if config.device:
        from mpicdc.sim.devices import get_device
        device = get_device(config.device)
    return manifest, blocks, injections, device


def _start(config: RunConfig, comms: JobComms):
    """The start-up handshake; returns this rank's ``_load_rank`` tuple or raises :class:`StartupError`."""
    ctrl, rank, size = comms.ctrl, comms.rank, comms.size
    workers = list(range(1, size))
    timeout = config.startup_timeout_s
    if rank == 0:
        if not comms.ulfm and size > 1:
            log.warning("fault tolerance is OFF: a crashed rank will end the job (launch with "
                        "`mpirun --with-ft ulfm ...` or `python -m mpicdc.launch`); straggler mitigation still works")
        try:
            directory = str(resolve_weights(config, size - config.spares))
        except (ValueError, OSError, RuntimeError) as exc:
            _send_texts(ctrl, workers, "!" + str(exc))
            raise StartupError(str(exc)) from None
        _send_texts(ctrl, workers, directory)
    else:
        # rank 0 may first prepare the shards (minutes for a large model): wait that long for it
        directory = _from_master(ctrl, timeout + (3600.0 if config.prepare_missing else 0.0), "the weights folder")
        if directory.startswith("!"):
            raise StartupError(directory[1:])
    loaded, error = None, ""
    try:
        loaded = _load_rank(config, directory, rank, size)
    except (ValueError, OSError, RuntimeError) as exc:
        error = str(exc) or type(exc).__name__
    if rank != 0:
        _send_texts(ctrl, [0], f"{os.getpid()} {socket.gethostname()}\n{error}")
        verdict = _from_master(ctrl, 2 * timeout, "the start-up verdict")
        if verdict.startswith("!"):
            raise StartupError(verdict[1:])
        return loaded
    texts, missing = _gather_texts(ctrl, workers, timeout)
    reports = {0: error}
    for r, text in texts.items():
        where, _, reports[r] = text.partition("\n")
        pid, _, host = where.partition(" ")
        if pid.isdigit():
            comms.processes[r] = (host, int(pid))
    failure = _startup_failure(reports, missing, timeout)
    _send_texts(ctrl, [r for r in workers if r not in missing], "!" + failure if failure else _GO)
    if failure:
        raise StartupError(failure)
    return loaded


def serve(config: RunConfig, *, comm=None) -> Session | None:
    """Start the job on every rank of ``comm`` (default ``MPI.COMM_WORLD``).  Collective at start-up.

    Returns a :class:`Session` on rank 0.  On workers runs the worker loop until
    the master stops it and returns ``None``.  Raises :class:`StartupError` on
    every rank that learns the job cannot start, and
    :class:`~mpicdc.runtime.worker.MasterLost` on a worker that loses the master.
    """
    comms = JobComms.open(comm, timeout_s=config.startup_timeout_s)
    try:
        manifest, blocks, injections, device = _start(config, comms)
    except BaseException:
        comms.close()
        raise
    if comms.rank == 0:
        coordinator = Coordinator(comms.data, comms.ctrl, manifest.model, manifest.plan, blocks,
                                  layer_timeout_s=config.layer_timeout_s, integrity=config.integrity,
                                  wire_format=config.wire, master_device=config.master_device)
        if config.spares:
            coordinator.healer = Healer(comms.ctrl, coordinator, range(comms.size - config.spares, comms.size),
                                        timeout_s=config.startup_timeout_s, manifest=manifest)
        return Session(comms, coordinator, manifest)
    stop_event = threading.Event()
    start_watchdog(comms.ctrl, stop_event, hard_exit=comms.ulfm)
    state = WorkerState(comms.rank, manifest.model, manifest.plan, blocks, injections, device, config.seed)
    with comms:
        if blocks is None:  # a spare: idle until it takes a lost rank's place
            spare_loop(comms.ctrl, comms.data, state, lambda rank: load_shard(manifest, rank), stop_event)
        else:
            worker_loop(comms.data, state, stop_event)
    return None


def end_process(code: int, *, world, ulfm: bool, hung: bool = False) -> None:
    """End this rank of ``world`` in bounded time.

    Under ULFM, ``MPI_Finalize`` waits for stuck ranks and ``MPI_Abort`` can hang,
    so ranks flush and leave with ``os._exit`` (Open MPI's ULFM runtime accepts
    that).  Without ULFM, all ranks finalize normally, unless a rank is hung, in
    which case the master aborts the job (which works without ULFM).
    """
    if world.Get_rank() == 0:
        report_exit_code(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    if ulfm:
        os._exit(code)
    from mpi4py import MPI

    if hung:
        world.Abort(code or 1)
    MPI.Finalize()
    sys.exit(code)
