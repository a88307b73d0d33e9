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

import datetime
import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import h5py
import numpy as np

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
ENCODE_BYTES = 16 << 20       # budget of the float64 temporaries of one parity encoding step
_SHARD_RE = re.compile(r"^rank-(\d+)\.h5$")


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


def ensure_prepared(model: Model, plan: Plan, root="weights", seed: int = 0, *, check: bool = True) -> Path:
    """The folder of ``(model, plan)`` under ``root`` (:func:`default_dir`), with random-weight
    shards from ``seed`` prepared only when it holds none yet.  Local; no MPI.

    A folder already prepared must hold this model, plan and seed, else :class:`ShardError` names
    the folder, what differs and the command that prepares it again.  ``check=False`` takes it as
    it is: the run command's default folder may hold weights imported with ``--source`` or cut
    with ``--keep-on-master``, and its ``--seed`` also seeds injected delays (the job checks the
    model and the world size at start-up).
    """
    folder = default_dir(model.name, plan, root)
    if not (folder / MANIFEST_NAME).exists():
        log.info("preparing random-weight shards for %s in %s (once)", model.name, folder)
        prepare(model, plan, folder, source="random", seed=seed)
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
    if model is not None:
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
    kind: str            # "data", "parity" or "full" (a layer kept on the master)
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
        else:
            tag = f"parity-block-{self.index}"
        return f"{_group_name(self.layer)}/{tag}"

    def describe(self, weight_shape) -> str:
        m, cols = weight_shape
        if self.kind == "full":
            return f"whole layer {self.layer} ({m}x{cols}), computed by the master"
        if self.kind == "data":
            return (f"data block {self.index} of {self.n} of layer {self.layer} ({m}x{cols}): rows "
                    f"{self.rows[0]}:{self.rows[1]}, code {self.code}, zero-padded to {self.block_rows} rows on load")
        return (f"parity block {self.index - self.n} (block {self.index}) of layer {self.layer} ({m}x{cols}): "
                f"sum_i P[{self.index - self.n}, i] * (data block i zero-padded to {self.block_rows} rows), "
                f"code {self.code}, coefficients in attribute 'coefficients', computed in float64")


def _layout(model: Model, plan: Plan, rank: int) -> list:
    """The blocks ``rank`` stores, in model order."""
    shapes = model.weight_shapes()
    out = []
    for layer in model.linear_layers:
        m, cols = shapes[layer.name]
        lp = plan.for_layer(layer.name)
        if lp is None:
            if rank == 0:
                out.append(_Block(layer.name, layer.op, "full", -1, (0, m), m, m, cols, "none", 1, 0, (0,)))
            continue
        i = lp.block_of(rank)
        if i is None:
            continue
        if i < lp.n:
            start, stop = lp.rows[i]
            out.append(_Block(layer.name, layer.op, "data", i, (start, stop), stop - start, lp.block_rows, cols,
                              lp.code, lp.n, lp.r, tuple(lp.ranks)))
        else:
            out.append(_Block(layer.name, layer.op, "parity", i, (0, lp.block_rows), lp.block_rows, lp.block_rows,
                              cols, lp.code, lp.n, lp.r, tuple(lp.ranks)))
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


class _DatasetWriter:
    """Write a float32 dataset row chunk by row chunk, hashing exactly the bytes stored."""

    def __init__(self, group, name: str, shape: tuple, progress: Progress):
        self.dset = group.create_dataset(name, shape=shape, dtype=F32)
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


def _write_parity(lp, code, A: np.ndarray, writers: list) -> None:
    """Encode the parity blocks of ``A`` (weights or biases) chunk by chunk into ``writers``.

    Each step encodes ``k`` rows of every data block in float64 (``code.encode``), so the float64
    temporaries stay within :data:`ENCODE_BYTES` whatever the size of the layer.
    """
    row_bytes = 8 * max(1, math.prod(A.shape[1:]))
    k = max(1, ENCODE_BYTES // (row_bytes * (lp.n + lp.r)))
    for r0 in range(0, lp.block_rows, k):
        r1 = min(r0 + k, lp.block_rows)
        parts = [_padded_rows(A, start, stop, r0, r1) for start, stop in lp.rows]
        encoded = code.encode(parts)
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
            source_label: str | None = None, consume: bool = False, command: str = "") -> Manifest:
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

    Returns the :class:`Manifest` of the written directory.  Local; no MPI.
    """
    plan.validate(model)
    get_weights, source_desc, seed = _resolve_source(model, source, seed, source_label, consume)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preparation = uuid.uuid4().hex
    tmp = Path(out, f".partial-{preparation[:8]}")
    tmp.mkdir()
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_manifest(out)


def _write_shards(folder: Path, model: Model, plan: Plan, get_weights, preparation: str, progress) -> None:
    """Write every rank's shard file into ``folder``, one layer in memory at a time."""
    world = plan.world_size
    layouts = {rank: _layout(model, plan, rank) for rank in range(world)}
    owners = {layer.name: [] for layer in model.linear_layers}     # layer -> [(rank, block)]
    for rank, blocks in layouts.items():
        for blk in blocks:
            owners[blk.layer].append((rank, blk))
    total = sum(4 * blk.stored_rows * (blk.cols + 1) for blocks in owners.values() for _, blk in blocks)
    files = {}
    try:
        for rank in range(world):
            f = files[rank] = h5py.File(folder / shard_name(rank), "w", libver=LIBVER)
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
    finally:
        for f in files.values():
            f.close()


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
            parity_groups[blk.index] = g
        else:
            start, stop = blk.rows
            _write_rows(_DatasetWriter(g, "W", (blk.stored_rows, blk.cols), bar), W[start:stop])
            _write_rows(_DatasetWriter(g, "b", (blk.stored_rows,), bar), b[start:stop])
    if parity_groups:
        groups = [parity_groups[i] for i in range(lp.n, lp.n + lp.r)]
        _write_parity(lp, lp.code_obj, W, [_DatasetWriter(g, "W", (lp.block_rows, W.shape[1]), bar) for g in groups])
        _write_parity(lp, lp.code_obj, b, [_DatasetWriter(g, "b", (lp.block_rows,), bar) for g in groups])


def _write_manifest(path, model, plan, source, seed, checksums, sizes, preparation, command, created):
    from mpicdc import __version__
    with h5py.File(path, "w", libver=LIBVER) as f:
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
    for entry in out.glob(".partial-*"):        # left behind by runs that were killed
        if entry != tmp and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


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
            files = dict(enumerate(f["shards/files"].asstr()[()].tolist()))
            checksums = dict(enumerate(f["shards/sha256"].asstr()[()].tolist()))
            sizes = dict(enumerate(int(x) for x in f["shards/bytes"][()]))
            parity = {_attr_str(d.attrs, "layer"): d[()] for d in f["codes"].values()}
            seed = int(a["seed"]) if "seed" in a else None
            manifest = Manifest(directory, model, plan, _attr_str(a, "source"), seed, files, checksums, version,
                                sizes, parity, _attr_str(a, "preparation"), _attr_str(a, "command"),
                                _attr_str(a, "created"))
    except ShardError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ShardError(f"{path}: damaged or incomplete manifest ({type(exc).__name__}: {exc}); copy it "
                         f"again from the machine that prepared the shards, or re-run the prepare command") from None
    n_files = len(manifest.files)
    if not (n_files == plan.world_size == len(checksums) == len(sizes)) or plan.model != model.name:
        raise ShardError(f"{path}: inconsistent manifest (plan for {plan.model!r} over {plan.world_size} ranks, "
                         f"model {model.name!r}, {n_files} shard entries); prepare the weights again")
    return manifest


def check_world(manifest: Manifest, world_size: int) -> None:
    """:class:`ShardError` unless ``manifest`` was prepared for a world of ``world_size`` ranks.

    The message gives the ``mpiexec -np`` that fits the shards and the prepare command that fits
    ``world_size``.  Local.
    """
    need = manifest.world_size
    if world_size == need:
        return
    plan = manifest.plan
    msg = (f"{manifest.directory}: these shards were prepared for {need} ranks (1 master + {plan.workers} data "
           f"+ {plan.parity} parity workers, plan {plan.tag}) but the job has {world_size}: launch with "
           f"mpiexec -np {need}")
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
        msg += " (a world of one rank has no workers)"
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


def _read_block(f, path: Path, blk: _Block, check: bool, pad: bool, fix: str) -> tuple:
    """Read one block's ``(W, b)``, checking shapes, dtype and (``check``) the dataset sha256."""
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
            d.read_direct(arr, dest_sel=np.s_[:blk.stored_rows])
        if check:
            digest = hashlib.sha256(memoryview(arr[:blk.stored_rows]).cast("B")).hexdigest()
            if digest != _attr_str(d.attrs, "sha256"):
                raise ShardError(f"{path}: dataset /{gname}/{key} is corrupted (sha256 {digest[:16]}..., "
                                 f"stored {_attr_str(d.attrs, 'sha256')[:16]}...); {fix}")
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

    The file's attributes (model, rank, world size, plan tag, code, preparation id) and every
    dataset's shape are always checked against the manifest.  With ``verify`` the whole file's
    sha256 (from the manifest) and every dataset's sha256 (its ``sha256`` attribute) are checked
    too, and for rank 0 the stored parity matrices against the codes of this mpicdc.  Any problem
    raises :class:`ShardError` naming the file.  Local (reads two files).
    """
    manifest = open_manifest(directory) if manifest is None else manifest
    path = manifest.path(rank)
    fix = _fix(manifest)
    try:
        with _open_shard(path, manifest, rank, fix) as f:
            problem = _sha256_problem(path, manifest, rank, fix) if verify else None
            if problem:
                raise ShardError(problem)
            blocks = {blk.layer: _read_block(f, path, blk, verify, pad, fix)
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
    device holds): presence, size, attributes, whole-file sha256, every dataset's shape and
    sha256 (one dataset in memory at a time), and the stored parity matrices against this
    mpicdc's codes.  Local.
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
                        _read_block(f, path, blk, True, False, fix)
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
    return problems
