"""Read an ONNX file without holding its weights twice: large tensors stay on disk until asked for.

Local, no MPI.  ``onnx.load`` holds the file's bytes and the parsed protobuf (two copies of every
weight) and ``numpy_helper.to_array`` makes a third; for a 553 MB VGG16 that was 2.3 GB of peak
memory.  :func:`read_onnx` instead walks the protobuf wire format of the file through ``mmap``
and builds a copy of the model with the bytes of every large initializer cut out (a few hundred
KB for a CNN), which ``onnx`` then parses; each cut tensor becomes a :class:`TensorRef` (file,
offset, dtype, shape) that reads exactly its own bytes with ``readinto`` when the importer asks
for it.  Tensors stored in external data files (``data_location = EXTERNAL``) become
:class:`TensorRef` s to those files.

Protobuf wire format used here: a message is a sequence of ``key = field << 3 | wire type``
varints each followed by its value (type 0 varint, 1 eight bytes, 2 a varint length and that
many bytes, 5 four bytes).  ``ModelProto.graph`` is field 7, ``GraphProto.initializer`` field 5,
and in ``TensorProto``: ``dims`` 1, ``data_type`` 2, ``float_data`` 4 (packed), ``name`` 8,
``raw_data`` 9 (little-endian values), ``data_location`` 14.
"""
from __future__ import annotations

import math
import mmap
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass

import numpy as np

#: initializers with at least this many bytes of data are read from the file only when used.
LAZY_MIN_BYTES = 64 << 10

#: ONNX TensorProto.DataType -> numpy dtype of its little-endian ``raw_data`` (plain numeric types only).
RAW_DTYPES = {1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2",
              11: "<f8", 12: "<u4", 13: "<u8"}
_FLOAT = 1
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_T_DIMS, _T_DATA_TYPE, _T_FLOAT_DATA, _T_NAME, _T_RAW_DATA = 1, 2, 4, 8, 9


class MalformedOnnx(ValueError):
    """The file is not a well-formed protobuf message (the caller names the file)."""


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's little-endian values are: ``nbytes`` bytes at ``offset`` of ``path``."""

    name: str
    path: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple

    def load(self) -> np.ndarray:
        """The tensor as a new numpy array, read straight into its buffer (one copy in memory)."""
        out = np.empty(self.shape, np.dtype(self.dtype))
        if out.nbytes != self.nbytes:
            raise MalformedOnnx(f"tensor {self.name!r} of shape {self.shape} ({self.dtype}) needs {out.nbytes} "
                                f"bytes but its data holds {self.nbytes}")
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.offset)
            done = 0
            while done < self.nbytes:
                n = fh.readinto(view[done:])
                if not n:
                    raise MalformedOnnx(f"tensor {self.name!r}: {self.path} ends after {self.offset + done} bytes, "
                                        f"the tensor needs {self.nbytes} bytes from offset {self.offset}")
                done += n
        if sys.byteorder != "little":      # pragma: no cover - ONNX data is little-endian
            out = out.byteswap().view(out.dtype.newbyteorder())
        return out


class Constants(MutableMapping):
    """Name -> constant array; names bound to a :class:`TensorRef` are read from disk on every access.

    Large tensors are not cached: an importer that uses a weight once (the usual case) holds it
    only while it converts that layer.  ``in`` never reads a tensor.
    """

    def __init__(self, refs: dict | None = None):
        self._arrays: dict = {}
        self._refs: dict = dict(refs or {})

    def __getitem__(self, name):
        if name in self._arrays:
            return self._arrays[name]
        return self._refs[name].load()

    def __setitem__(self, name, value):
        self._refs.pop(name, None)
        self._arrays[name] = value

    def __delitem__(self, name):
        if name in self._arrays:
            del self._arrays[name]
        else:
            del self._refs[name]

    def __contains__(self, name) -> bool:
        return name in self._arrays or name in self._refs

    def __iter__(self):            # a name is in one of the two dicts, never both
        yield from self._arrays
        yield from self._refs

    def __len__(self) -> int:
        return len(self._arrays) + len(self._refs)

    def alias(self, new: str, old: str) -> bool:
        """Bind ``new`` to the same on-disk tensor as ``old`` (an ``Identity`` of an initializer); False if
        ``old`` is not on disk."""
        ref = self._refs.get(old)
        if ref is None:
            return False
        self._arrays.pop(new, None)
        self._refs[new] = ref
        return True


# ---------------------------------------------------------------- protobuf wire format

def _varint(buf, pos: int, end: int) -> tuple:
    result = shift = 0
    while True:
        if pos >= end:
            raise MalformedOnnx(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise MalformedOnnx(f"varint longer than 10 bytes at byte {pos}")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """``(field, wire type, start of the field, start of its value, end)`` for each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise MalformedOnnx(f"field number 0 at byte {first}")
        value = pos
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, value = _varint(buf, pos, end)
            pos = value + size
        elif wire == 5:
            pos += 4
        else:
            raise MalformedOnnx(f"unsupported wire type {wire} at byte {first}")
        if pos > end:
            raise MalformedOnnx(f"field {field} at byte {first} runs past the end of its message ({pos} > {end})")
        yield field, wire, first, value, pos


def _submessage(field: int, body: bytes) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(len(body)) + body


def _tensor(buf, start: int, end: int, refs: dict, min_bytes: int) -> bytes:
    """A TensorProto with its data cut out when large (recorded in ``refs``), else unchanged."""
    fields = list(_fields(buf, start, end))
    data_type, name, data = 0, None, None
    for field, wire, _first, value, stop in fields:
        if field == _T_DATA_TYPE and wire == 0:
            data_type = _varint(buf, value, stop)[0]
        elif field == _T_NAME and wire == 2:
            name = bytes(buf[value:stop]).decode("utf-8", errors="replace")
        elif field in (_T_RAW_DATA, _T_FLOAT_DATA) and wire == 2:
            data = (field, value, stop) if data is None else ("several", 0, 0)
    if name is None or data is None or data[0] == "several" or data[2] - data[1] < min_bytes or \
            data_type not in RAW_DTYPES or (data[0] == _T_FLOAT_DATA and data_type != _FLOAT):
        return bytes(buf[start:end])
    field_cut, value, stop = data
    refs[name] = (value, stop - value, RAW_DTYPES[data_type])
    return b"".join(bytes(buf[first:last]) for field, _w, first, _v, last in fields if field != field_cut)


def _graph(buf, start: int, end: int, refs: dict, min_bytes: int) -> bytes:
    parts = []
    for field, wire, first, value, stop in _fields(buf, start, end):
        if field == _GRAPH_INITIALIZER and wire == 2:
            parts.append(_submessage(field, _tensor(buf, value, stop, refs, min_bytes)))
        else:
            parts.append(bytes(buf[first:stop]))
    return b"".join(parts)


def skeleton(buf, min_bytes: int = LAZY_MIN_BYTES) -> tuple:
    """``(model bytes without the large initializers' data, {name: (offset, nbytes, dtype)})``."""
    refs: dict = {}
    parts = []
    for field, wire, first, value, stop in _fields(buf, 0, len(buf)):
        if field == _MODEL_GRAPH and wire == 2:
            parts.append(_submessage(field, _graph(buf, value, stop, refs, min_bytes)))
        else:
            parts.append(bytes(buf[first:stop]))
    return b"".join(parts), refs


def _external_ref(onnx, tensor, base: str, source: str) -> TensorRef:
    """A :class:`TensorRef` for a tensor whose data lives in an external file beside the model."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    norm = os.path.normpath(location)
    if not location or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        raise MalformedOnnx(f"initializer {tensor.name!r}: external data location {location!r} is not a file "
                            f"inside the model's folder")
    dtype = RAW_DTYPES.get(tensor.data_type)
    if dtype is None:
        raise MalformedOnnx(f"initializer {tensor.name!r}: external data of ONNX type {tensor.data_type} is not "
                            f"supported")
    shape = tuple(int(d) for d in tensor.dims)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if "length" in info and int(info["length"]) != nbytes:
        raise MalformedOnnx(f"initializer {tensor.name!r}: external data length {info['length']} does not fit "
                            f"shape {shape} ({nbytes} bytes)")
    full = os.path.join(base, norm)
    if not os.path.isfile(full):
        raise MalformedOnnx(f"initializer {tensor.name!r}: external data file {full} is missing (copy it beside "
                            f"{source})")
    return TensorRef(tensor.name, full, int(info.get("offset", 0)), nbytes, dtype, shape)


def read_onnx(onnx, source: str, min_bytes: int = LAZY_MIN_BYTES) -> tuple:
    """``(ModelProto without large initializer data, {name: TensorRef})`` of the ONNX file ``source``.

    Raises :class:`MalformedOnnx` when the file is not a well-formed protobuf or a tensor's data
    does not fit its shape; other errors come from ``onnx`` parsing the skeleton.
    """
    with open(source, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise MalformedOnnx("empty file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            model_bytes, spans = skeleton(buf, min_bytes)
    proto = onnx.load_model_from_string(model_bytes)
    refs = {}
    base = os.path.dirname(os.path.abspath(source))
    for tensor in proto.graph.initializer:
        if tensor.name in spans:
            offset, nbytes, dtype = spans[tensor.name]
            refs[tensor.name] = TensorRef(tensor.name, source, offset, nbytes, dtype,
                                          tuple(int(d) for d in tensor.dims))
            expected = math.prod(refs[tensor.name].shape) * np.dtype(dtype).itemsize
            if expected != nbytes:
                raise MalformedOnnx(f"initializer {tensor.name!r} of shape {refs[tensor.name].shape} needs "
                                    f"{expected} bytes but holds {nbytes}")
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            refs[tensor.name] = _external_ref(onnx, tensor, base, source)
    return proto, refs
