"""HDF5 weight store: one manifest plus one shard file per rank.

A prepared directory (``weights/<model>-<plan tag>/`` by default) holds

``manifest.h5``
    the model graph and the plan (JSON string attributes), the parity matrix ``P`` of every
    distributed layer's code (``/codes/<layer>``), the source of the weights and its seed, the
    world size, and the size and sha256 of every shard file (``/shards/*``).
``rank-NNN.h5``
    only what rank NNN computes: one group per layer with its weight row block ``W`` and bias
    block ``b`` (already encoded for parity ranks), attributes naming the layer, block index,
    kind (data, parity, or full for layers kept on the master), row range, code and, on every
    dataset, the sha256 of its bytes.

A Raspberry Pi needs ``manifest.h5`` and its own ``rank-NNN.h5`` only.  Everything is plain
HDF5: numpy datasets and string/number attributes, JSON for the graph and the plan, no pickle.
See ``docs/weights.md`` for the layout and an ``h5ls -r`` listing.

:func:`prepare` writes a directory layer by layer (never the whole model in memory);
:func:`open_manifest`, :func:`check_world` and :func:`load_rank` are what the runtime calls;
:func:`verify` checks every file.  All functions here are local (no MPI).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import h5py
import numpy as np

from mpicdc.core import grouped
from mpicdc.core.codes import parse_code_spec
from mpicdc.core.models import Model, get_model
from mpicdc.core.plan import Plan, make_plan, rank_role
from mpicdc.core.random_weights import init_weights, layer_weights
from mpicdc.progress import Progress

__all__ = ["ShardError", "Manifest", "FORMAT_VERSION", "MANIFEST_NAME", "default_dir", "shard_name",
           "open_manifest", "check_world", "load_rank", "prepare", "ensure_prepared", "prepare_zoo",
           "reference_weights", "verify", "prepare_command"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.h5"
MANIFEST_FORMAT = "mpicdc-manifest"
SHARD_FORMAT = "mpicdc-shard"
F32 = np.dtype("<f4")
# HDF5 >= 1.10 (Debian/Raspberry Pi OS bullseye and later) must be able to read the files.
LIBVER = ("earliest", "v110")
CHUNK_BYTES = 16 << 20        # float32 rows written (and hashed) per step
H5_CHUNK_BYTES = 1 << 20      # HDF5 chunk of a dataset: the unit fletcher32 checks as it is read
ENCODE_BYTES = 16 << 20       # budget of the float64 temporaries of one parity encoding step
_SHARD_RE = re.compile(r"^rank-(\d+)\.h5$")
# bounds checked by open_manifest before anything is allocated from a manifest's model and plan
MAX_WORLD_SIZE = 1 << 16
MAX_ACTIVATION = 1 << 30       # values in one layer's output (4 GiB of float32)
MAX_LAYER_WEIGHTS = 1 << 32    # values in one layer's weight matrix (16 GiB of float32)


class ShardError(ValueError):
    """A weight directory or shard file is missing, damaged or does not fit the run.

    The message names the file, says what is wrong and what to do about it.
    """


@dataclass(frozen=True)
class Manifest:
    """Contents of ``manifest.h5``: what was prepared, for which world, and the shard checksums.

    Attributes
    ----------
    directory : folder holding the manifest and the shard files.
    model, plan : the model graph and the distribution plan the shards were cut for.
    source : where the weights came from (``"random"`` or the source file).
    seed : seed of random weights, ``None`` for weights from a file.
    files : ``{rank: file name}`` (relative to ``directory``).
    checksums : ``{rank: sha256 hex digest of the whole shard file}``.
    format_version : layout version of the files.
    sizes : ``{rank: file size in bytes}``.
    parity : ``{layer: P}``, the ``(r, n)`` float64 parity matrix each distributed layer was encoded with.
    preparation : random id shared by the manifest and its shards (mixing preparations is detected).
    command : the command line that prepared the directory (empty when prepared from Python).
    created : UTC time of preparation (ISO 8601).
    """

    directory: Path
    model: Model
    plan: Plan
    source: str
    seed: int | None
    files: dict
    checksums: dict
    format_version: int
    sizes: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict, compare=False, repr=False)
    preparation: str = ""
    command: str = ""
    created: str = ""

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    def path(self, rank: int) -> Path:
        """Path of ``rank``'s shard file."""
        if rank not in self.files:
            raise ShardError(f"{self.directory}: rank {rank} has no shard; the weights were prepared for "
                             f"a world of {self.world_size} ranks (0..{self.world_size - 1})")
        return self.directory / self.files[rank]

    def total_bytes(self) -> int:
        return sum(self.sizes.values())


# ---------------------------------------------------------------- names and commands

def default_dir(model_name: str, plan: Plan, root="weights") -> Path:
    """``<root>/<model>-<plan tag>``, the folder :func:`prepare` writes by default."""
    return Path(root) / f"{model_name}-{plan.tag}"


def prepare_zoo(root, model_name: str, workers: int, parity: int, code: str, seed: int = 0) -> Path:
    """:func:`ensure_prepared` for a zoo model split over ``workers`` data and ``parity`` parity workers."""
    model = get_model(model_name)
    return ensure_prepared(model, make_plan(model, workers, parity, code), root, seed)


def ensure_prepared(model: Model, plan: Plan, root="weights", seed: int = 0, *, check: bool = True,
                    wait: float = 1800.0) -> Path:
    """The folder of ``(model, plan)`` under ``root`` (:func:`default_dir`), with random-weight
    shards from ``seed`` prepared only when it holds none yet.  Local; no MPI.

    A folder already prepared must hold this model, plan and seed, else :class:`ShardError` names
    the folder, what differs and the command that prepares it again.  ``check=False`` takes it as
    it is: the run command's default folder may hold weights imported with ``--source`` or cut
    with ``--keep-on-master``, and its ``--seed`` also seeds injected delays (the job checks the
    model and the world size at start-up).  Another process preparing the same folder is waited
    for (at most ``wait`` seconds) and its result used.
    """
    folder = default_dir(model.name, plan, root)
    if not (folder / MANIFEST_NAME).exists():
        plan.validate(model)
        get_weights, source_desc, seed = _resolve_source(model, "random", seed, None, False)
        folder.mkdir(parents=True, exist_ok=True)
        with _prepare_lock(folder, wait):
            if not (folder / MANIFEST_NAME).exists():     # else prepared by another process while we waited
                log.info("preparing random-weight shards for %s in %s (once)", model.name, folder)
                _write_folder(folder, model, plan, get_weights, source_desc, seed, False, "", True)
                return folder
    if not check:
        return folder
    found = open_manifest(folder)
    differs = []
    if found.model.to_json() != model.to_json():
        differs.append("model graph")
    if found.plan.to_json() != plan.to_json():
        differs.append("plan (other layers, ranks, row blocks or code)")
    if found.source != "random":
        differs.append(f"source ({found.source}, not random weights)")
    elif found.seed != seed:
        differs.append(f"seed ({found.seed}, not {seed})")
    if differs:
        remake = prepare_command(model.name, plan, "random", seed, model=model)
        raise ShardError(f"{folder}: prepared with another {', another '.join(differs)}; prepare it again "
                         f"with: {remake} --dir {folder} (or delete the folder, or use another root)")
    return folder


def shard_name(rank: int) -> str:
    """File name of a rank's shard: ``rank-000.h5``, ``rank-001.h5``, ..."""
    return f"rank-{rank:03d}.h5"


def _group_name(layer: str) -> str:
    """HDF5 group name of a layer (percent-encoded: names like ``/features/0/Conv`` stay one group)."""
    return quote(layer, safe="")


def prepare_command(model_name: str, plan: Plan, source: str = "random", seed: int | None = 0, *,
                    workers: int | None = None, parity: int | None = None, model: Model | None = None) -> str:
    """The ``python -m mpicdc.prepare`` command that builds ``plan`` (or one with other worker counts).

    ``--keep-on-master`` is added for linear layers of ``model`` that the plan leaves on the master.
    Plans cut with ``--layer-workers`` or ``--speeds`` need those options added by hand.
    """
    workers = plan.workers if workers is None else workers
    parity = plan.parity if parity is None else parity
    code = plan.code
    parts = ["python -m mpicdc.prepare", model_name, f"--workers {workers}"]
    if parse_code_spec(code).parity is None:     # r is not implied by the spec
        parts.append(f"--parity {parity}")
    parts.append(f"--code {code}")
    if model is not None and workers:  # with 0 workers every layer is the master's anyway
        kept = [layer.name for layer in model.linear_layers if plan.for_layer(layer.name) is None]
        if kept:
            parts.append("--keep-on-master " + ",".join(kept))
    if source != "random":
        parts.append(f"--source {source}")
    elif seed not in (None, 0):
        parts.append(f"--seed {seed}")
    return " ".join(parts)


def _remake(manifest: Manifest) -> str:
    return manifest.command or prepare_command(manifest.model.name, manifest.plan, manifest.source,
                                               manifest.seed, model=manifest.model)


# ---------------------------------------------------------------- layout: what each rank holds

@dataclass(frozen=True)
class _Block:
    """One ``(W, b)`` block a rank stores for one layer."""

    layer: str
    op: str
    kind: str            # "data", "parity", "full" (a layer kept on the master, or the master's copy of a
    #                      band layer: it adds the bias) or "band" (a rank's whole kernel of a band layer)
    index: int           # block index in the layer's n + r blocks, -1 for "full"
    rows: tuple          # (start, stop) of the layer's weight rows (data/full), (0, block_rows) for parity
    stored_rows: int     # rows stored in the file (a data block is not padded on disk)
    block_rows: int      # rows after zero padding to the largest data block (what load_rank returns)
    cols: int
    code: str
    n: int
    r: int
    ranks: tuple

    @property
    def path(self) -> str:
        """HDF5 path of the block's group: ``<layer>/<kind and block>`` so ``h5ls -r`` reads like a table."""
        if self.kind == "full":
            tag = f"full-rows-{self.rows[0]}-{self.rows[1]}"
        elif self.kind == "data":
            tag = f"data-block-{self.index}-rows-{self.rows[0]}-{self.rows[1]}"
        elif self.kind == "band":
            tag = f"band-block-{self.index}"
        else:
            tag = f"parity-block-{self.index}"
        return f"{_group_name(self.layer)}/{tag}"

    def describe(self, weight_shape) -> str:
        m, cols = weight_shape
        if self.kind == "full":
            return f"whole layer {self.layer} ({m}x{cols}), computed by the master"
        if self.kind == "band":
            what = "its band of the input" if self.index < self.n else "the code's combination of the bands' inputs"
            return (f"whole kernel of layer {self.layer} ({m}x{cols}) for block {self.index} of {self.n}+{self.r} "
                    f"of a band split (bands of output rows, code {self.code}): computed on {what}; the master "
                    f"adds the bias")
        if self.kind == "data":
            return (f"data block {self.index} of {self.n} of layer {self.layer} ({m}x{cols}): rows "
                    f"{self.rows[0]}:{self.rows[1]}, code {self.code}, zero-padded to {self.block_rows} rows on load")
        j = self.index - self.n
        if self.cols != cols:   # a grouped convolution: data blocks read different input channels
            return (f"parity block {j} (block {self.index}) of grouped layer {self.layer} ({m}x{cols}): its "
                    f"block-diagonal embedding, slabs P[{j}, i] * (data block i zero-padded to {self.block_rows} "
                    f"rows) side by side ({cols} columns each) for every i with P[{j}, i] != 0, each computed "
                    f"against data block i's input channels; code {self.code}, coefficients in attribute "
                    f"'coefficients', computed in float64")
        return (f"parity block {j} (block {self.index}) of layer {self.layer} ({m}x{cols}): "
                f"sum_i P[{j}, i] * (data block i zero-padded to {self.block_rows} rows), "
                f"code {self.code}, coefficients in attribute 'coefficients', computed in float64")


def _layout(model: Model, plan: Plan, rank: int) -> list:
    """The blocks ``rank`` stores, in model order."""
    shapes = model.weight_shapes()
    out = []
    for layer in model.linear_layers:
        m, cols = shapes[layer.name]
        lp = plan.for_layer(layer.name)
        if lp is None or (lp.banded and rank == 0):
            if rank == 0:
                out.append(_Block(layer.name, layer.op, "full", -1, (0, m), m, m, cols, "none", 1, 0, (0,)))
            continue
        i = lp.block_of(rank)
        if i is None:
            continue
        if lp.banded:
            out.append(_Block(layer.name, layer.op, "band", i, (0, m), m, m, cols, lp.code, lp.n, lp.r,
                              tuple(lp.ranks)))
        elif i < lp.n:
            start, stop = lp.rows[i]
            out.append(_Block(layer.name, layer.op, "data", i, (start, stop), stop - start, lp.block_rows, cols,
                              lp.code, lp.n, lp.r, tuple(lp.ranks)))
        else:
            out.append(_Block(layer.name, layer.op, "parity", i, (0, lp.block_rows), lp.block_rows, lp.block_rows,
                              grouped.stored_cols(model, lp, i), lp.code, lp.n, lp.r, tuple(lp.ranks)))
    return out


# ---------------------------------------------------------------- writing

def _as_weights(name: str, pair, shape) -> tuple:
    """Validate one imported ``(W, b)`` pair and return it as C-ordered float32 arrays."""
    try:
        W, b = pair
    except (TypeError, ValueError):
        raise ValueError(f"weights of layer {name!r} must be a (W, b) pair") from None
    W = np.ascontiguousarray(W, dtype=F32)
    if W.shape != tuple(shape):
        raise ValueError(f"layer {name!r}: weight matrix has shape {W.shape}, the model needs {tuple(shape)} "
                         "(rows = output channels, cols = GEMM inputs)")
    b = np.zeros(shape[0], F32) if b is None else np.ascontiguousarray(b, dtype=F32).reshape(-1)
    if b.shape != (shape[0],):
        raise ValueError(f"layer {name!r}: bias has shape {b.shape}, the model needs ({shape[0]},)")
    return W, b


def _chunk_rows(rows: int, row_bytes: int) -> int:
    """Rows per HDF5 chunk: about :data:`H5_CHUNK_BYTES`, balanced so the last chunk is nearly full."""
    most = max(1, H5_CHUNK_BYTES // max(1, row_bytes))
    return -(-rows // -(-rows // most)) if rows else 0


def _disk_bytes(shape: tuple) -> int:
    """Bytes a float32 dataset of ``shape`` takes on disk: whole chunks plus a 4-byte fletcher32 each."""
    rows, row_bytes = shape[0], 4 * math.prod(shape[1:])
    if not rows:
        return 0
    per_chunk = _chunk_rows(rows, row_bytes)
    chunks = -(-rows // per_chunk)
    return chunks * (per_chunk * row_bytes + 4)


class _DatasetWriter:
    """Write a float32 dataset row chunk by row chunk, hashing exactly the bytes stored.

    Datasets are chunked with HDF5's fletcher32 filter, so every read checks the bytes it reads
    (:func:`load_rank` reads a shard once); the sha256 attribute is for :func:`verify`.
    """

    def __init__(self, group, name: str, shape: tuple, progress: Progress):
        rows = _chunk_rows(shape[0], 4 * math.prod(shape[1:]))
        options = {"chunks": (rows,) + tuple(shape[1:]), "fletcher32": True} if rows else {}
        self.dset = group.create_dataset(name, shape=shape, dtype=F32, **options)
        self.rows, self.pos, self.progress = shape[0], 0, progress
        self.hash = hashlib.sha256()

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=F32)
        k = chunk.shape[0]
        if self.pos + k > self.rows:
            raise RuntimeError(f"{self.dset.name}: writing rows {self.pos}:{self.pos + k} of {self.rows}")
        if k:
            self.dset[self.pos:self.pos + k] = chunk
            self.hash.update(memoryview(chunk).cast("B"))
        self.pos += k
        self.progress.update(chunk.nbytes)

    def close(self) -> str:
        if self.pos != self.rows:
            raise RuntimeError(f"{self.dset.name}: wrote {self.pos} of {self.rows} rows")
        digest = self.hash.hexdigest()
        self.dset.attrs["sha256"] = digest
        return digest


def _write_rows(writer: _DatasetWriter, A: np.ndarray) -> None:
    step = max(1, CHUNK_BYTES // max(1, A[:1].nbytes))
    for r0 in range(0, A.shape[0], step):
        writer.write(A[r0:r0 + step])
    writer.close()


def _padded_rows(A: np.ndarray, start: int, stop: int, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of data block ``A[start:stop]`` zero-padded past its end (a view when possible)."""
    lo, hi = start + r0, min(start + r1, stop)
    if hi - lo == r1 - r0:
        return A[lo:hi]
    out = np.zeros((r1 - r0,) + A.shape[1:], A.dtype)
    if hi > lo:
        out[:hi - lo] = A[lo:hi]
    return out


def _write_parity(lp, code, A: np.ndarray, writers: list, embedded: bool = False) -> None:
    """Encode the parity blocks of ``A`` (weights or biases) chunk by chunk into ``writers``.

    Each step encodes ``k`` rows of every data block in float64 (``code.encode``), so the float64
    temporaries stay within :data:`ENCODE_BYTES` whatever the size of the layer.  ``embedded``:
    the weights of a grouped convolution, whose parity blocks are block-diagonal embeddings
    (:func:`mpicdc.core.grouped.embed`), not sums.
    """
    row_bytes = 8 * max(1, math.prod(A.shape[1:]))
    k = max(1, ENCODE_BYTES // (row_bytes * (lp.n + lp.r * (lp.n if embedded else 1))))
    for r0 in range(0, lp.block_rows, k):
        r1 = min(r0 + k, lp.block_rows)
        parts = [_padded_rows(A, start, stop, r0, r1) for start, stop in lp.rows]
        encoded = [grouped.embed(code, j, parts) for j in range(lp.r)] if embedded else code.encode(parts)
        del parts
        for writer, block in zip(writers, encoded):
            writer.write(np.asarray(block).astype(F32))
        del encoded
    for writer in writers:
        writer.close()


def _set_attrs(obj, attrs: dict) -> None:
    for key, value in attrs.items():
        obj.attrs[key] = value


def _file_sha256(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if progress is not None:
                progress.update(n)
    return h.hexdigest()


def _resolve_source(model: Model, source, seed, source_label, consume):
    """``(layer -> (W, b) function, source description, seed)`` for :func:`prepare`."""
    shapes = model.weight_shapes()
    if isinstance(source, str) and source == "random":
        if seed is None or int(seed) != seed or seed < 0:
            raise ValueError(f"random weights need a seed >= 0, got {seed!r}")
        seed = int(seed)
        return (lambda name: layer_weights(model, name, seed)), "random", seed
    if isinstance(source, Mapping):
        weights = source
        label = source_label or "in-memory weights"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"weight source {str(source)!r} is not a file (use --source random or a "
                                    "weight file: ONNX, Keras HDF5, PyTorch or npz)")
        try:
            from mpicdc.store.importers import load_source
        except ImportError as exc:
            raise ValueError(f"cannot read {source}: mpicdc.store.importers is not available ({exc})") from None
        imported, weights = load_source(str(path), model_name=model.name)
        if imported.weight_shapes() != shapes:
            raise ValueError(f"{source} holds a graph whose linear layers {imported.weight_shapes()} differ "
                             f"from {model.name}'s {shapes}")
        label = source_label or str(source)
    missing = [name for name in shapes if name not in weights]
    if missing:
        raise ValueError(f"{label}: no weights for layer(s) {', '.join(missing)}")
    pop = getattr(weights, "pop", None) if consume or not isinstance(source, Mapping) else None

    def get(name):
        # weights a loader handed over are dropped layer by layer; a caller's mapping is left intact
        pair = pop(name) if pop is not None else weights[name]
        return _as_weights(name, pair, shapes[name])
    return get, label, None


def prepare(model: Model, plan: Plan, out_dir, source="random", seed: int | None = 0, progress=False, *,
            source_label: str | None = None, consume: bool = False, command: str = "", wait: float = 0.0,
            check_space: bool = True) -> Manifest:
    """Write ``manifest.h5`` and one ``rank-NNN.h5`` per rank of ``plan`` into ``out_dir``.

    Streaming: one layer's ``(W, b)`` is in memory at a time; data blocks are written as views of
    it and parity blocks are encoded in float64 a few rows at a time (peak about one largest layer
    plus small temporaries).  Files are written into a temporary folder inside ``out_dir`` and
    moved into place at the end, so an interrupted run leaves the previous preparation intact;
    ``manifest.h5`` and ``rank-*.h5`` files already there are replaced.

    Parameters
    ----------
    model, plan : the model graph and a plan for it (:func:`mpicdc.core.plan.make_plan`).
    out_dir : the exact folder to write (see :func:`default_dir`).
    source : ``"random"`` (:func:`mpicdc.core.random_weights.layer_weights` with ``seed``: a prepared random
        model reproduces :func:`mpicdc.core.random_weights.init_weights` exactly), a weight file for
        :func:`mpicdc.store.importers.load_source`, or a mapping ``{layer: (W, b)}``.
    seed : seed of random weights (ignored for other sources).
    progress : draw a progress bar on stderr (``None``: only when stderr is a terminal).
    source_label : description of a mapping source for the manifest.
    consume : remove each layer from a mapping source once it is written, so that memory is
        returned layer by layer (the mapping ends up empty).
    command : the command line, recorded in the manifest.

    wait : seconds to wait when another process is preparing the same folder (each folder being
        prepared is locked with ``fcntl.flock``), then :class:`ShardError` naming that process.
    check_space : refuse at once, with the numbers, when the disk has less free space than the
        shards need (:func:`_expected_bytes`).

    Partial folders left inside ``out_dir`` by a killed prepare are removed first (logged in one
    line).  A write error (a full disk, ...) raises :class:`ShardError` in one line naming the folder
    and its free space; the partial folder is removed and the previous files stay as they were.

    Returns the :class:`Manifest` of the written directory.  Local; no MPI.
    """
    plan.validate(model)
    get_weights, source_desc, seed = _resolve_source(model, source, seed, source_label, consume)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _prepare_lock(out, wait, command):
        _write_folder(out, model, plan, get_weights, source_desc, seed, progress, command, check_space)
    return open_manifest(out)


def _write_folder(out: Path, model: Model, plan: Plan, get_weights, source_desc: str, seed, progress, command: str,
                  check_space: bool) -> None:
    """The body of :func:`prepare`, run while holding the folder's lock."""
    _remove_stale_partials(out)
    need = sum(_expected_bytes(model, plan).values())
    if check_space:
        free = shutil.disk_usage(out).free
        if free < need:
            raise ShardError(f"{out}: not enough free space: the shards need about {_fmt_bytes(need)}, the disk has "
                             f"{_fmt_bytes(free)} free; free some space or prepare into another folder (--dir DIR)")
    preparation = uuid.uuid4().hex
    tmp = Path(out, f".partial-{preparation[:8]}")
    tmp.mkdir()
    failure = None
    try:
        _write_shards(tmp, model, plan, get_weights, preparation, progress)
        checksums, sizes = {}, {}
        paths = [tmp / shard_name(rank) for rank in range(plan.world_size)]
        with Progress(sum(p.stat().st_size for p in paths), "sha256", enabled=progress) as bar:
            for rank, path in enumerate(paths):
                bar.update(0, status=path.name)
                checksums[rank] = _file_sha256(path, bar)
                sizes[rank] = path.stat().st_size
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        _write_manifest(tmp / MANIFEST_NAME, model, plan, source_desc, seed, checksums, sizes, preparation,
                        command, created)
        _move_into_place(tmp, out, plan.world_size)
    except OSError as exc:
        failure = exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure is not None:
        message = _write_failed(out, failure, need)
        del failure
        raise ShardError(message)


def _fmt_bytes(n: float) -> str:
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (HDF5's messages span several)."""
    return " ".join(str(exc).split())


def _write_failed(out: Path, exc: OSError, need: int) -> str:
    """One line for a write error: what failed, the folder's free space, what to do."""
    try:
        free = _fmt_bytes(shutil.disk_usage(out).free)
    except OSError:
        free = "unknown"
    if exc.errno == errno.ENOSPC or "errno = 28" in str(exc) or "No space left" in str(exc):
        return (f"{out}: no space left on device while writing the shards ({free} free, about {_fmt_bytes(need)} "
                f"needed); free some space or prepare into another folder (--dir DIR); the previous files "
                f"in {out} are unchanged")
    reason = exc.strerror or _one_line(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return (f"{out}: cannot write the shards: {reason}{where} ({free} free); fix that and prepare again; "
            f"the previous files in {out} are unchanged")


def _expected_bytes(model: Model, plan: Plan) -> dict:
    """``{rank: bytes}`` the shard files of ``plan`` take: chunked datasets plus HDF5 metadata (an upper bound)."""
    out = {}
    for rank in range(plan.world_size):
        blocks = _layout(model, plan, rank)
        data = sum(_disk_bytes((b.stored_rows, b.cols)) + _disk_bytes((b.stored_rows,)) for b in blocks)
        out[rank] = data + (64 << 10) + (16 << 10) * len(blocks)
    return out


def _stored_bytes(model: Model, plan: Plan) -> dict:
    """``{rank: bytes}`` of float32 weights and biases stored in each shard file (no padding, no metadata)."""
    return {rank: sum(4 * b.stored_rows * (b.cols + 1) for b in _layout(model, plan, rank))
            for rank in range(plan.world_size)}


# ---------------------------------------------------------------- one writer per folder

def _lock_path(out: Path) -> Path:
    """``.<name>.prepare-lock`` beside the folder (resolved, so every path to it shares one lock)."""
    target = out.resolve()
    return target.parent / f".{target.name}.prepare-lock"


@contextlib.contextmanager
def _prepare_lock(out: Path, wait: float, command: str = ""):
    """Hold an exclusive ``fcntl.flock`` on the folder's lock file while preparing it.

    Non-blocking, retried for at most ``wait`` seconds (with one log line), then :class:`ShardError`
    naming the process that holds it (its pid is written in the lock file).  The kernel releases a
    flock when its process dies, so a killed prepare never blocks the next one.  The lock file is
    left in place: deleting it would let two processes lock two different files.
    """
    path = _lock_path(out)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:          # parent folder not writable: lock inside the folder instead
        path = out.resolve() / ".prepare-lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(0.0, float(wait))
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip().splitlines()
                other = f"{holder[0]}: {holder[1] if len(holder) > 1 else '?'}" if holder else "pid unknown"
                left = deadline - time.monotonic()
                if left <= 0:
                    pid = holder[0].split()[-1] if holder else "PID"
                    raise ShardError(f"{out}: another prepare ({other}) is writing this folder (lock {path}); wait "
                                     f"for it to finish (or pass --wait SECONDS), or stop it (kill {pid}) and prepare "
                                     "again") from None
                if not said:
                    log.warning("%s: another prepare (%s) is writing this folder; waiting up to %.0f s", out, other,
                                left)
                    said = True
                time.sleep(min(0.2, left))
        me = " ".join((command or " ".join(sys.argv)).split())
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        text = f"pid {os.getpid()}\n{me or 'python'}\nstarted {started}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        yield path
    finally:
        os.close(fd)                 # releases the lock


def _remove_stale_partials(out: Path) -> None:
    """Remove ``.partial-*`` folders in ``out`` (called with the lock held: their writers are gone)."""
    stale = [p for p in out.glob(".partial-*") if p.is_dir()]
    if not stale:
        return
    size = 0
    for folder in stale:
        size += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
    log.warning("%s: removed %d partial folder(s) (%s) left by an interrupted prepare", out, len(stale),
                _fmt_bytes(size))


class _WriteGuard:
    """The file object HDF5 writes one file through: a failed write (a full disk) is recorded and
    every later write dropped, so HDF5 itself never sees an error.

    h5py 3.16 with HDF5 2.0 cannot close a file after a failed write: it prints a dozen tracebacks
    and crashes (segfault).  The writer checks :attr:`error` after each layer and raises it once
    every file is closed; the partial folder is then removed.
    """

    def __init__(self, path: Path):
        self.fh = open(path, "w+b", buffering=0)     # noqa: SIM115 -- closed by close(), after h5py
        self.error: OSError | None = None

    def _failed(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += self.fh.write(view[done:])
            except OSError as exc:
                self._failed(exc)
        return len(view)

    def truncate(self, size=None):
        try:
            return self.fh.truncate(size)
        except OSError as exc:
            self._failed(exc)
            return size

    def flush(self) -> None:
        pass                     # unbuffered

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.fh.seek(pos, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def read(self, size: int = -1) -> bytes:
        return self.fh.read(size)

    def readinto(self, buf) -> int:
        return self.fh.readinto(buf)

    def close(self) -> None:
        self.fh.close()


@contextlib.contextmanager
def _h5_writing(path: Path):
    """A new HDF5 file written through a :class:`_WriteGuard`; a write error is raised after closing it."""
    guard = _WriteGuard(path)
    try:
        with h5py.File(guard, "w", libver=LIBVER) as f:
            f.guard = guard
            yield f
    finally:
        guard.close()
    if guard.error is not None:
        raise guard.error


def _write_shards(folder: Path, model: Model, plan: Plan, get_weights, preparation: str, progress) -> None:
    """Write every rank's shard file into ``folder``, one layer in memory at a time."""
    world = plan.world_size
    layouts = {rank: _layout(model, plan, rank) for rank in range(world)}
    owners = {layer.name: [] for layer in model.linear_layers}     # layer -> [(rank, block)]
    for rank, blocks in layouts.items():
        for blk in blocks:
            owners[blk.layer].append((rank, blk))
    total = sum(4 * blk.stored_rows * (blk.cols + 1) for blocks in owners.values() for _, blk in blocks)
    with contextlib.ExitStack() as stack:
        files = {rank: stack.enter_context(_h5_writing(folder / shard_name(rank))) for rank in range(world)}
        for rank, f in files.items():
            role = rank_role(plan, rank)
            _set_attrs(f, {"format": SHARD_FORMAT, "format_version": FORMAT_VERSION, "model": model.name,
                           "rank": rank, "role": role, "world_size": world, "plan_tag": plan.tag, "code": plan.code,
                           "preparation": preparation,
                           "layers": json.dumps([blk.layer for blk in layouts[rank]]),
                           "description": f"rank {rank} ({role}) of a world of {world} for {model.name} "
                                          f"plan {plan.tag}: the weight row blocks this rank computes"})
        with Progress(total, f"{model.name} {plan.tag}", enabled=progress) as bar:
            for name, blocks in owners.items():
                bar.update(0, status=name)
                W, b = get_weights(name)
                _write_layer(files, blocks, plan.for_layer(name), W, b, bar)
                del W, b          # before the next layer is made: never two layers in memory
                failed = next((f.guard.error for f in files.values() if f.guard.error is not None), None)
                if failed is not None:
                    break         # raised by _h5_writing once the files are closed


def _write_layer(files: dict, blocks: list, lp, W: np.ndarray, b: np.ndarray, bar: Progress) -> None:
    """Write one layer's blocks: data and full blocks as views of ``W``, parity blocks encoded in chunks."""
    parity_groups = {}
    for rank, blk in blocks:
        g = files[rank].create_group(blk.path)
        g.parent.attrs["layer"] = blk.layer
        _set_attrs(g, {"layer": blk.layer, "op": blk.op, "kind": blk.kind, "block": blk.index, "n": blk.n,
                       "r": blk.r, "code": blk.code, "rows": np.asarray(blk.rows), "block_rows": blk.block_rows,
                       "weight_shape": np.asarray(W.shape), "ranks": np.asarray(blk.ranks),
                       "description": blk.describe(W.shape)})
        if blk.kind == "parity":
            g.attrs["coefficients"] = np.asarray(lp.code_obj.parity[blk.index - lp.n], np.float64)
            parity_groups[blk.index] = g, blk.cols
        else:
            start, stop = blk.rows
            _write_rows(_DatasetWriter(g, "W", (blk.stored_rows, blk.cols), bar), W[start:stop])
            _write_rows(_DatasetWriter(g, "b", (blk.stored_rows,), bar), b[start:stop])
    if parity_groups:
        groups, cols = zip(*(parity_groups[i] for i in range(lp.n, lp.n + lp.r)))
        embedded = any(c != W.shape[1] for c in cols)   # a grouped convolution (same values for 2MR copies)
        _write_parity(lp, lp.code_obj, W, [_DatasetWriter(g, "W", (lp.block_rows, c), bar) for g, c in zip(groups, cols)],
                      embedded)
        _write_parity(lp, lp.code_obj, b, [_DatasetWriter(g, "b", (lp.block_rows,), bar) for g in groups])


def _write_manifest(path, model, plan, source, seed, checksums, sizes, preparation, command, created):
    from mpicdc import __version__
    with _h5_writing(path) as f:
        _set_attrs(f, {"format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "model": model.name,
                       "plan_tag": plan.tag, "world_size": plan.world_size, "workers": plan.workers,
                       "parity": plan.parity, "code": plan.code, "source": source, "preparation": preparation,
                       "created": created, "mpicdc_version": __version__, "command": command,
                       "model_json": model.to_json(), "plan_json": plan.to_json(),
                       "description": f"{model.name} prepared for a world of {plan.world_size} ranks "
                                      f"(plan {plan.tag}); shard files listed in /shards"})
        if seed is not None:
            f.attrs["seed"] = seed
        codes = f.create_group("codes")
        codes.attrs["description"] = "parity matrix P (r x n, float64) each distributed layer was encoded with"
        for lp in plan.layers:
            d = codes.create_dataset(_group_name(lp.layer), data=np.asarray(lp.code_obj.parity, np.float64))
            _set_attrs(d, {"layer": lp.layer, "code": lp.code, "n": lp.n, "r": lp.r,
                           "ranks": np.asarray(lp.ranks), "rows": np.asarray(lp.rows)})
        shards = f.create_group("shards")
        shards.attrs["description"] = "one file per rank: name, size in bytes and sha256 of the whole file"
        ranks = range(plan.world_size)
        shards.create_dataset("files", data=[shard_name(r) for r in ranks], dtype=h5py.string_dtype())
        shards.create_dataset("bytes", data=np.asarray([sizes[r] for r in ranks], np.int64))
        shards.create_dataset("sha256", data=[checksums[r] for r in ranks], dtype=h5py.string_dtype())


def _move_into_place(tmp: Path, out: Path, world: int) -> None:
    """Replace the manifest and shards in ``out`` by those in ``tmp`` (manifest last)."""
    old = out / MANIFEST_NAME
    if old.exists():
        old.unlink()
    for entry in out.iterdir():
        match = _SHARD_RE.match(entry.name)
        if match and int(match.group(1)) >= world:
            entry.unlink()
    for rank in range(world):
        os.replace(tmp / shard_name(rank), out / shard_name(rank))
    os.replace(tmp / MANIFEST_NAME, out / MANIFEST_NAME)


# ---------------------------------------------------------------- reading

def _attr_str(attrs, key, default=""):
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def open_manifest(directory) -> Manifest:
    """Read ``directory/manifest.h5``; :class:`ShardError` when it is missing or unreadable. Local."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    hint = "prepare the weights with python -m mpicdc.prepare MODEL --workers N ... (see --help)"
    if not directory.is_dir():
        raise ShardError(f"{directory}: no such weight directory; {hint}")
    if not path.is_file():
        raise ShardError(f"{path}: manifest missing; copy it from the machine that prepared the shards, or {hint}")
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            if _attr_str(a, "format") != MANIFEST_FORMAT:
                raise ShardError(f"{path}: not an mpicdc manifest (format attribute "
                                 f"{_attr_str(a, 'format', 'missing')!r}); {hint}")
            version = int(a["format_version"])
            if version > FORMAT_VERSION:
                raise ShardError(f"{path}: written in format {version} by a newer mpicdc; this one reads "
                                 f"format {FORMAT_VERSION}: upgrade mpicdc or prepare the weights again")
            model = Model.from_json(_attr_str(a, "model_json"))
            plan = Plan.from_json(_attr_str(a, "plan_json"))
            command = _attr_str(a, "command")
            again = "prepare the weights again" + (f" ({command})" if command else "")
            problem = _model_problem(model) or _plan_problem(a, model, plan)
            if problem:
                raise ShardError(f"{path}: {problem}; the manifest is damaged or was edited: {again}")
            for key in ("files", "bytes", "sha256"):
                if f["shards"][key].shape != (plan.world_size,):
                    raise ShardError(f"{path}: /shards/{key} has shape {f['shards'][key].shape} for a world of "
                                     f"{plan.world_size} ranks; {again}")
            files = dict(enumerate(f["shards/files"].asstr()[()].tolist()))
            checksums = dict(enumerate(f["shards/sha256"].asstr()[()].tolist()))
            sizes = dict(enumerate(int(x) for x in f["shards/bytes"][()]))
            problem = _files_problem(model, plan, files, sizes)
            if problem:
                raise ShardError(f"{path}: {problem}; the manifest is damaged or was edited: {again}")
            parity = {}
            for lp in plan.layers:      # only the (r, n) matrices the plan implies are read
                d = f["codes"].get(_group_name(lp.layer))
                if isinstance(d, h5py.Dataset):
                    if d.shape != (lp.r, lp.n):
                        raise ShardError(f"{path}: /codes/{d.name.split('/')[-1]} has shape {d.shape}, the plan "
                                         f"needs ({lp.r}, {lp.n}); {again}")
                    parity[lp.layer] = d[()]
            seed = int(a["seed"]) if "seed" in a else None
            manifest = Manifest(directory, model, plan, _attr_str(a, "source"), seed, files, checksums, version,
                                sizes, parity, _attr_str(a, "preparation"), command, _attr_str(a, "created"))
    except ShardError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ShardError(f"{path}: damaged or incomplete manifest ({type(exc).__name__}: {_one_line(exc)}); copy "
                         f"it again from the machine that prepared the shards, or re-run the prepare command") from None
    return manifest


def _model_problem(model: Model) -> str | None:
    """Why ``model`` cannot be loaded safely: a bad graph, or a shape that is not positive or too big."""
    try:
        shapes, weights = model.shapes(), model.weight_shapes()
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as exc:
        return f"its model graph is invalid ({type(exc).__name__}: {exc})"
    for name, shape in shapes.items():
        if not shape or any(type(x) is not int or x < 1 for x in shape):
            return f"layer {name!r} of the model has output shape {shape}: every size must be a positive integer"
        if math.prod(shape) > MAX_ACTIVATION:
            return (f"layer {name!r} of the model has output shape {shape} ({math.prod(shape):,} values; at most "
                    f"{MAX_ACTIVATION:,} are accepted)")
    for name, (rows, cols) in weights.items():
        if type(rows) is not int or type(cols) is not int or rows < 1 or cols < 1:
            return f"layer {name!r} of the model has a {rows}x{cols} weight matrix: sizes must be positive integers"
        if rows * cols > MAX_LAYER_WEIGHTS:
            return (f"layer {name!r} of the model has a {rows:,}x{cols:,} weight matrix ({_fmt_bytes(4 * rows * cols)}"
                    f" of float32; at most {_fmt_bytes(4 * MAX_LAYER_WEIGHTS)} per layer are accepted)")
    return None


def _plan_problem(attrs, model: Model, plan: Plan) -> str | None:
    """Why ``plan`` does not fit ``model`` or the manifest's world size, workers and parity attributes."""
    counts = (plan.world_size, plan.workers, plan.parity)
    if any(type(x) is not int for x in counts) or not 1 <= plan.world_size <= MAX_WORLD_SIZE:
        return f"its plan has world size {plan.world_size!r} (1..{MAX_WORLD_SIZE} ranks are accepted)"
    if plan.world_size == 1 and plan.layers:
        return f"its plan has a world of one rank but distributes {len(plan.layers)} layer(s)"
    if plan.workers < (plan.world_size > 1) or plan.parity < 0 or plan.world_size != 1 + plan.workers + plan.parity:
        return (f"its plan has a world of {plan.world_size} ranks, which is not 1 master + {plan.workers} data + "
                f"{plan.parity} parity workers")
    for key, want in (("world_size", plan.world_size), ("workers", plan.workers), ("parity", plan.parity),
                      ("code", plan.code)):
        if key not in attrs:
            continue
        found = _attr_str(attrs, key) if key == "code" else int(attrs[key])
        if found != want:
            return f"attribute {key} is {found!r} but its plan says {want!r}"
    try:
        plan.validate(model)
    except (ValueError, TypeError) as exc:
        return f"its plan does not fit its model ({exc})"
    return None


def _files_problem(model: Model, plan: Plan, files: dict, sizes: dict) -> str | None:
    """Why the ``/shards`` entries do not fit: a file name other than ``rank-NNN.h5``, or a file smaller
    than the weights the model and plan put in it (checked before anything that size is allocated)."""
    for rank, name in files.items():
        if name != shard_name(rank):
            return (f"/shards/files names {name!r} for rank {rank}; only {shard_name(rank)} inside the weight "
                    "folder is accepted")
    for rank, need in _stored_bytes(model, plan).items():
        if sizes[rank] < need:
            return (f"its model and plan put {need:,} bytes of weights ({_fmt_bytes(need)}) in {shard_name(rank)}, "
                    f"but /shards/bytes gives that file {sizes[rank]:,} bytes")
    return None


def check_world(manifest: Manifest, world_size: int, spares: int = 0) -> None:
    """:class:`ShardError` unless ``manifest`` was prepared for a world of ``world_size - spares`` ranks.

    The message gives the ``mpiexec -np`` that fits the shards (plus the ``spares`` idle ranks of
    ``--spares``) and the prepare command that fits ``world_size``.  Local.
    """
    need = manifest.world_size
    if world_size == need + spares:
        return
    plan = manifest.plan
    has = f"{world_size} ({world_size - spares} besides the {spares} spare(s))" if spares else f"{world_size}"
    msg = (f"{manifest.directory}: these shards were prepared for {need} ranks (1 master + {plan.workers} data "
           f"+ {plan.parity} parity workers, plan {plan.tag}) but the job has {has}: launch with "
           f"mpiexec -np {need + spares}" + (f" ({need} + {spares} spare(s))" if spares else ""))
    world_size -= spares
    workers = world_size - 1 - plan.parity
    if workers >= 1:
        cmd = prepare_command(manifest.model.name, plan, manifest.source, manifest.seed, workers=workers,
                              model=manifest.model)
        msg += f", or prepare shards for {world_size} ranks: {cmd}"
    elif world_size >= 2:
        cmd = prepare_command(manifest.model.name, Plan(plan.model, world_size, world_size - 1, 0, "none"),
                              manifest.source, manifest.seed)
        msg += f", or prepare uncoded shards for {world_size} ranks: {cmd}"
    else:
        cmd = prepare_command(manifest.model.name, Plan(plan.model, 1, 0, 0, "none"), manifest.source, manifest.seed)
        msg += f", or prepare shards for one rank doing everything: {cmd} (and run with --workers 0)"
    raise ShardError(msg)


def _check_shard_attrs(f, path: Path, manifest: Manifest, rank: int, fix: str) -> None:
    a = f.attrs
    if _attr_str(a, "format") != SHARD_FORMAT:
        raise ShardError(f"{path}: not an mpicdc shard file (format attribute {_attr_str(a, 'format', 'missing')!r}); "
                         f"{fix}")
    plan = manifest.plan
    found = {"model": _attr_str(a, "model"), "rank": int(a.get("rank", -1)), "world size": int(a.get("world_size", -1)),
             "plan": _attr_str(a, "plan_tag"), "code": _attr_str(a, "code")}
    want = {"model": manifest.model.name, "rank": rank, "world size": plan.world_size, "plan": plan.tag,
            "code": plan.code}
    wrong = [f"{key} {found[key]!r} (expected {want[key]!r})" for key in want if found[key] != want[key]]
    if wrong:
        raise ShardError(f"{path}: this shard belongs to another preparation: {', '.join(wrong)}; {fix}")
    if _attr_str(a, "preparation") != manifest.preparation:
        raise ShardError(f"{path}: this shard comes from another run of prepare than {MANIFEST_NAME} "
                         f"(preparation {_attr_str(a, 'preparation')!r}, manifest {manifest.preparation!r}); {fix}")


def _fix(manifest: Manifest) -> str:
    return f"copy it again from the machine that prepared the shards, or re-run: {_remake(manifest)}"


def _sha256_problem(path: Path, manifest: Manifest, rank: int, fix: str) -> str | None:
    digest = _file_sha256(path)
    if digest == manifest.checksums[rank]:
        return None
    return (f"{path}: corrupted: sha256 {digest[:16]}... differs from the manifest's "
            f"{manifest.checksums[rank][:16]}...; {fix}")


def _size_problem(path: Path, manifest: Manifest, rank: int, fix: str) -> str | None:
    size, want = path.stat().st_size, manifest.sizes.get(rank)
    if want is None or size == want:
        return None
    return f"{path}: {'truncated' if size < want else 'too long'}: {size} bytes, the manifest says {want}; {fix}"


def _open_shard(path: Path, manifest: Manifest, rank: int, fix: str):
    """Open a shard after checking that it exists, opens, has the manifest's size and attributes.

    A file from another preparation is reported by what differs (world size, code, ...), which
    says more than its size or checksum would.
    """
    if not path.is_file():
        raise ShardError(f"{path}: shard file of rank {rank} is missing; {fix}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ShardError(_size_problem(path, manifest, rank, fix)
                         or f"{path}: not readable as HDF5 ({exc}); {fix}") from None
    try:
        _check_shard_attrs(f, path, manifest, rank, fix)
        problem = _size_problem(path, manifest, rank, fix)
        if problem:
            raise ShardError(problem)
    except BaseException:
        f.close()
        raise
    return f


def _read_block(f, path: Path, blk: _Block, check: str, pad: bool, fix: str) -> tuple:
    """Read one block's ``(W, b)``, checking shapes and dtype.

    HDF5 checks the fletcher32 of every chunk it reads (files of mpicdc 0.1 have none).  ``check``
    adds the dataset's sha256 (its ``sha256`` attribute, hashed from memory: no second read):
    ``"full"`` for every dataset, ``"load"`` only for datasets without fletcher32, ``""`` never.
    """
    gname = blk.path
    if gname not in f:
        held = ", ".join(f"/{_group_name(blk.layer)}/{x}" for x in f.get(_group_name(blk.layer), {})) or "nothing"
        raise ShardError(f"{path}: no group /{gname} for layer {blk.layer!r} (the plan gives this rank {blk.kind} "
                         f"block {blk.index}; the file has {held}); {fix}")
    g = f[gname]
    out = []
    for key, shape in (("W", (blk.stored_rows, blk.cols)), ("b", (blk.stored_rows,))):
        if key not in g:
            raise ShardError(f"{path}: dataset /{gname}/{key} is missing; {fix}")
        d = g[key]
        if d.shape != shape or d.dtype != F32:
            raise ShardError(f"{path}: /{gname}/{key} is {d.dtype} {d.shape}, expected float32 {shape}; {fix}")
        full = (blk.block_rows,) + shape[1:] if pad else shape
        arr = np.zeros(full, F32) if full != shape else np.empty(full, F32)
        if blk.stored_rows:
            try:
                d.read_direct(arr, dest_sel=np.s_[:blk.stored_rows])
            except OSError as exc:
                raise ShardError(f"{path}: layer {blk.layer!r}: dataset /{gname}/{key} is corrupted (HDF5 could not "
                                 f"read it: {_one_line(exc)}); {fix}") from None
        if check == "full" or (check == "load" and not d.fletcher32):
            digest = hashlib.sha256(memoryview(arr[:blk.stored_rows]).cast("B")).hexdigest()
            if digest != _attr_str(d.attrs, "sha256"):
                raise ShardError(f"{path}: layer {blk.layer!r}: dataset /{gname}/{key} is corrupted (sha256 "
                                 f"{digest[:16]}..., stored {_attr_str(d.attrs, 'sha256')[:16]}...); {fix}")
        out.append(arr)
    return tuple(out)


def _check_codes(manifest: Manifest) -> list:
    """Layers whose stored parity matrix differs from the one this mpicdc's codes build."""
    problems = []
    for lp in manifest.plan.layers:
        stored = manifest.parity.get(lp.layer)
        now = np.asarray(lp.code_obj.parity, np.float64)
        if stored is None or stored.shape != now.shape or not np.allclose(stored, now, rtol=1e-12, atol=1e-12):
            problems.append(f"{manifest.directory / MANIFEST_NAME}: layer {lp.layer!r} was encoded with a parity "
                            f"matrix that differs from the one this mpicdc builds for code {lp.code!r} "
                            f"(n={lp.n}, r={lp.r}); decoding would be wrong: prepare the weights again "
                            f"({_remake(manifest)})")
    return problems


def load_rank(directory, rank: int, manifest: Manifest | None = None, verify: bool = True,
              pad: bool = True) -> dict:
    """Load the blocks ``rank`` computes: ``{layer: (W_block, b_block)}`` (float32).

    Data and parity blocks come zero-padded to the layer's ``block_rows`` (``pad=False`` returns
    data blocks with their own row count, as stored); rank 0 gets the whole ``(W, b)`` of the
    linear layers the plan keeps on the master.

    The file's size and attributes (model, rank, world size, plan tag, code, preparation id) and
    every dataset's shape are always checked against the manifest, and HDF5 checks the fletcher32
    checksum of every chunk as it reads it, so the file is read once.  With ``verify``, datasets
    without fletcher32 (files of mpicdc 0.1) are checked against their sha256 attribute, and for
    rank 0 the stored parity matrices against the codes of this mpicdc.  The whole-file sha256 is
    left to :func:`verify` (``prepare --verify``).  Any problem raises :class:`ShardError` naming
    the file.  Local (reads two files).
    """
    manifest = open_manifest(directory) if manifest is None else manifest
    path = manifest.path(rank)
    fix = _fix(manifest)
    try:
        with _open_shard(path, manifest, rank, fix) as f:
            blocks = {blk.layer: _read_block(f, path, blk, "load" if verify else "", pad, fix)
                      for blk in _layout(manifest.model, manifest.plan, rank)}
    except ShardError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ShardError(f"{path}: unreadable shard ({type(exc).__name__}: {exc}); {fix}") from None
    if verify and rank == 0:
        problems = _check_codes(manifest)
        if problems:
            raise ShardError(problems[0])
    return blocks


def reference_weights(manifest: Manifest) -> dict:
    """Full ``{layer: (W, b)}`` for the serial reference: regenerated from the seed of random
    weights, else reassembled from rank 0's file and the data blocks of the other shards.  Local."""
    if manifest.source == "random" and manifest.seed is not None:
        return init_weights(manifest.model, manifest.seed)
    weights = dict(load_rank(manifest.directory, 0, manifest))
    per_rank = {}
    for lp in manifest.plan.layers:
        if lp.banded:  # rank 0 holds the whole layer
            continue
        parts_W, parts_b = [], []
        for block, (start, stop) in enumerate(lp.rows):
            rank = lp.ranks[block]
            if rank not in per_rank:
                per_rank[rank] = load_rank(manifest.directory, rank, manifest)
            W, b = per_rank[rank][lp.layer]
            parts_W.append(W[:stop - start])
            parts_b.append(b[:stop - start])
        weights[lp.layer] = (np.concatenate(parts_W), np.concatenate(parts_b))
    return weights


def verify(directory, ranks=None) -> list:
    """Check a prepared directory completely; return the problems found (empty when all is well).

    Reads the manifest and every shard file (or only those of ``ranks``, e.g. the one file a
    device holds): presence, size, attributes, whole-file sha256, every dataset's shape,
    fletcher32 and sha256 (one dataset in memory at a time), the stored parity matrices
    against this mpicdc's codes, and (when all else is well) that every parity block encodes its
    layer's data blocks, for layers whose ranks are all checked.  Local.
    """
    try:
        manifest = open_manifest(directory)
        ranks = range(manifest.world_size) if ranks is None else list(ranks)
        paths = {rank: manifest.path(rank) for rank in ranks}
    except ShardError as exc:
        return [str(exc)]
    problems = []
    fix = _fix(manifest)
    for rank, path in paths.items():
        try:
            with _open_shard(path, manifest, rank, fix) as f:
                problem = _sha256_problem(path, manifest, rank, fix)
                if problem:
                    problems.append(problem)
                for blk in _layout(manifest.model, manifest.plan, rank):
                    try:
                        _read_block(f, path, blk, "full", False, fix)
                    except ShardError as exc:
                        problems.append(str(exc))
        except ShardError as exc:
            problems.append(str(exc))
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            problems.append(f"{path}: unreadable shard ({type(exc).__name__}: {exc}); {fix}")
    try:
        problems += _check_codes(manifest)
    except ImportError as exc:
        problems.append(f"cannot check the parity matrices: {exc}")
    if not problems:
        problems += _parity_problems(manifest, set(paths), fix)
    return problems


def _parity_problems(manifest: Manifest, ranks: set, fix: str) -> list:
    """Parity blocks that do not encode their layer's data blocks (layers whose ranks are all checked).

    Each parity block is re-encoded from the data blocks as prepare does (float64, rounded to
    float32); both roundings are within ``u = 2**-24`` of the exact ``sum_i P[j, i] W_i``, so the
    stored block may differ from the re-encoded one by ``2u * sum_i |P[j, i]| |W_i|`` elementwise
    (4u allowed for summation order).  Anything larger is a parity that no longer encodes the data.
    """
    problems = []
    blocks = {rank: {(b.layer, b.index): b for b in _layout(manifest.model, manifest.plan, rank)} for rank in ranks}
    for lp in manifest.plan.layers:
        if not set(lp.ranks) <= ranks:
            continue
        pairs = []
        for index, rank in enumerate(lp.ranks):
            with h5py.File(manifest.path(rank), "r") as f:
                pairs.append(_read_block(f, manifest.path(rank), blocks[rank][lp.layer, index], "", True, fix))
        if lp.banded:  # every rank holds the same whole kernel
            problems += [f"{manifest.path(rank)}: layer {lp.layer!r}: band block {index} differs from band block 0 "
                         f"(every rank of a band split holds the same whole layer); {fix}"
                         for index, (rank, pair) in enumerate(zip(lp.ranks, pairs))
                         if not all(np.array_equal(a, b) for a, b in zip(pair, pairs[0]))]
            continue
        code = lp.code_obj
        for part, name in ((0, "W"), (1, "b")):
            data = [pair[part] for pair in pairs[:lp.n]]
            if part == 0 and any(pair[0].shape != data[0].shape for pair in pairs[lp.n:]):  # grouped: embedded
                again = [grouped.embed(code, j, data) for j in range(lp.r)]
                scale = [np.abs(x).reshape(-1) for x in again]   # one term per element: |P[j, i] W_i|
            else:
                again = code.encode(data)
                scale = np.abs(code.parity) @ np.abs(np.stack(data).reshape(lp.n, -1))
            for j, (stored, fresh) in enumerate(zip((pair[part] for pair in pairs[lp.n:]), again)):
                if stored.shape != fresh.shape:
                    problems.append(f"{manifest.path(lp.ranks[lp.n + j])}: layer {lp.layer!r}: parity block "
                                    f"{lp.n + j} has shape {stored.shape}, its encoding {fresh.shape}; {fix}")
                    break
                diff = np.abs(stored.astype(np.float64) - fresh).reshape(-1)
                bad = diff > 4 * 2.0 ** -24 * scale[j]
                if np.any(bad):
                    problems.append(f"{manifest.path(lp.ranks[lp.n + j])}: layer {lp.layer!r}: parity block "
                                    f"{lp.n + j} does not encode the data blocks ({name}: {int(bad.sum())} value(s) "
                                    f"off, worst by {float(diff.max()):.3g}); its checksums match, so it was "
                                    f"altered or computed wrongly; {fix}")
                    break
    return problems
