"""Start-up, roles and shutdown of a distributed inference job.

:func:`serve` is collective over the communicator at start-up only (while every
rank is known to be alive): rank 0 finds or prepares the shard directory, every
rank checks the world size and loads and verifies its own shard file, and all
ranks agree on success before any compute.  Then the roles split by return
value: rank 0 gets a :class:`Session` to run requests; workers run their loop
and get ``None``.  :func:`end_process` ends every rank in bounded time.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpicdc.core.models import get_model
from mpicdc.core.plan import make_plan, parity_count
from mpicdc.runtime.master import Coordinator
from mpicdc.runtime.mpienv import import_mpi, start_progress_thread, ulfm_enabled
from mpicdc.runtime.worker import WorkerState, start_watchdog, worker_loop

log = logging.getLogger(__name__)

_MSG_BYTES = 2048


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
    seed : seed for random weights and injected delays.
    """

    model: str
    weights: str | None = None
    code: str = "sum"
    parity: int | None = None
    prepare_missing: bool = True
    injections: tuple = ()
    device: str | None = None
    layer_timeout_s: float = 30.0
    seed: int = 0
    weights_root: str = "weights"


class Session:
    """Rank 0's handle on a running job: :meth:`infer` requests, then :meth:`close`."""

    def __init__(self, MPI, world, coordinator: Coordinator, manifest, ulfm: bool):
        self.MPI, self.world, self.coordinator, self.manifest, self.ulfm = MPI, world, coordinator, manifest, ulfm
        self.model, self.plan = manifest.model, manifest.plan
        self.unacknowledged: list = []

    def infer(self, x):
        return self.coordinator.infer(x)

    @property
    def dead(self) -> set:
        return set(self.coordinator.dead)

    @property
    def silent(self) -> set:
        return set(self.coordinator.silent)

    def close(self, drain_s: float = 0.5) -> list:
        """Drain late replies briefly and stop the workers; returns ranks that did not acknowledge."""
        self.coordinator.drain(drain_s)
        self.unacknowledged = self.coordinator.stop_workers()
        return self.unacknowledged


def _agree(MPI, world, error: str | None) -> list:
    """Collective: every rank shares its start-up error (or none); returns ``[(rank, message)]``."""
    mine = np.zeros(_MSG_BYTES, dtype=np.uint8)
    if error:
        raw = error.encode()[:_MSG_BYTES - 1]
        mine[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    everyone = np.zeros((world.Get_size(), _MSG_BYTES), dtype=np.uint8)
    world.Allgather([mine, MPI.BYTE], [everyone, MPI.BYTE])
    out = []
    for rank, row in enumerate(everyone):
        text = bytes(row).rstrip(b"\0").decode(errors="replace")
        if text:
            out.append((rank, text))
    return out


def _bcast_text(MPI, world, text: str) -> str:
    buf = np.zeros(4096, dtype=np.uint8)
    if world.Get_rank() == 0:
        raw = text.encode()[:4095]
        buf[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    world.Bcast([buf, MPI.BYTE], root=0)
    return bytes(buf).rstrip(b"\0").decode()


def resolve_weights(config: RunConfig, world_size: int) -> Path:
    """Rank 0: the shard directory for this job, prepared with random weights if missing and allowed."""
    from mpicdc import store

    if config.weights:
        return Path(config.weights)
    model = get_model(config.model)
    r = parity_count(config.code, config.parity)
    workers = world_size - 1 - r
    if workers < 1:
        raise StartupError(f"a world of {world_size} rank(s) leaves no data worker for code {config.code!r} "
                           f"with {r} parity worker(s): launch at least {r + 2} ranks (mpirun -np {r + 2} ...)")
    plan = make_plan(model, workers, r, config.code)
    directory = store.default_dir(model.name, plan, root=config.weights_root)
    if not config.prepare_missing and not (directory / store.MANIFEST_NAME).exists():
        raise StartupError(f"{directory}: no prepared weights; run: "
                           f"{store.prepare_command(model.name, plan, model=model)}")
    return store.ensure_prepared(model, plan, config.weights_root, config.seed, check=False)


def serve(config: RunConfig, *, comm=None):
    """Start the job on every rank.  Collective over ``comm`` (default ``MPI.COMM_WORLD``) at start-up.

    Returns a :class:`Session` on rank 0; on workers runs the worker loop to the
    end and returns ``None`` (the caller then calls :func:`end_process`).
    Raises :class:`StartupError` on every rank when any rank cannot start.
    """
    from mpicdc import store

    MPI = import_mpi()
    world = MPI.COMM_WORLD if comm is None else comm
    rank, size = world.Get_rank(), world.Get_size()
    ulfm = ulfm_enabled(MPI)
    start_progress_thread(MPI, world)
    error, directory = None, ""
    if rank == 0:
        if not ulfm and size > 1:
            log.warning("fault tolerance is OFF: a crashed rank will end the job (launch with "
                        "`mpirun --with-ft ulfm ...` or `python -m mpicdc.launch`); straggler mitigation still works")
        try:
            directory = str(resolve_weights(config, size))
        except (ValueError, OSError, RuntimeError) as exc:
            error = str(exc)
    errors = _agree(MPI, world, error)
    if errors:
        raise StartupError("; ".join(f"rank {r}: {m}" for r, m in errors))
    directory = _bcast_text(MPI, world, directory)
    manifest = blocks = injections = device = None
    try:
        manifest = store.open_manifest(directory)
        if manifest.model.name != config.model:
            raise ValueError(f"{directory} holds weights for model {manifest.model.name!r}, not {config.model!r}")
        store.check_world(manifest, size)
        blocks = store.load_rank(directory, rank, manifest)
        if config.injections:
            from mpicdc.core.faults import parse_injections
            injections = parse_injections(list(config.injections))
            injections.validate(size)
        if config.device:
            from mpicdc.sim.devices import DEVICES
            if config.device not in DEVICES:
                raise ValueError(f"unknown device {config.device!r}; known: {', '.join(sorted(DEVICES))}")
            device = DEVICES[config.device]
    except (ValueError, OSError, RuntimeError) as exc:
        error = str(exc)
    errors = _agree(MPI, world, error)
    if errors:
        first = errors[0][1]
        same = all(m == first for _, m in errors)
        raise StartupError(first if same else "; ".join(f"rank {r}: {m}" for r, m in errors))
    comm_data, comm_ctrl = world.Dup(), world.Dup()
    for c in (comm_data, comm_ctrl):
        c.Set_errhandler(MPI.ERRORS_RETURN)
    world.Barrier()
    if rank == 0:
        coordinator = Coordinator(MPI, comm_data, comm_ctrl, manifest.model, manifest.plan, blocks,
                                  layer_timeout_s=config.layer_timeout_s)
        return Session(MPI, world, coordinator, manifest, ulfm)
    stop_event = threading.Event()
    start_watchdog(MPI, comm_ctrl, stop_event, hard_exit=ulfm)
    state = WorkerState(rank, manifest.model, manifest.plan, blocks, injections, device, config.seed)
    code = worker_loop(MPI, comm_data, state, stop_event)
    end_process(code, ulfm=ulfm)
    return None


def _world_rank() -> int:
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank() if MPI.Is_initialized() else 0


def end_process(code: int, *, ulfm: bool, hung: bool = False) -> None:
    """End this rank in bounded time.

    Under ULFM, ``MPI_Finalize`` waits for stuck ranks and ``MPI_Abort`` can hang,
    so ranks flush and leave with ``os._exit`` (Open MPI's ULFM runtime accepts
    that).  Without ULFM, all ranks finalize normally, unless a rank is hung, in
    which case the master aborts the job (which works without ULFM).
    """
    exit_file = os.environ.get("MPICDC_EXIT_FILE")
    if exit_file and _world_rank() == 0:
        try:
            with open(exit_file, "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    if ulfm:
        os._exit(code)
    from mpi4py import MPI

    from mpicdc.runtime.mpienv import stop_progress_threads
    if hung:
        MPI.COMM_WORLD.Abort(code or 1)
    stop_progress_threads()
    MPI.Finalize()
    sys.exit(code)
