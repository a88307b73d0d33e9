"""Message layout on the data path: fixed binary headers plus raw payloads (float32 or 16-bit).

Nothing is pickled.  Every message is one contiguous ``uint8`` buffer: an
80-byte header of ten little-endian int64/float64 slots followed by the
payload bytes.  Jobs (master -> worker) carry ``(request, layer)`` and the
activation shape; replies (worker -> master) carry ``(request, layer, block)``,
a status, the worker's real compute time and (when emulating a slower device)
the modeled time it was padded to, so that a late reply can never be
taken for a current one.  The last slot names the payload's wire format
(:mod:`mpicdc.core.wirefmt`: 0 float32, 1 float16, 2 bfloat16): :func:`message`
encodes float32 values into it and :func:`payload` decodes them back to float32,
so no rank can read a buffer in the wrong format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mpicdc.core.wirefmt import WireRangeError  # noqa: F401 - raised by message(); callers catch it from here
from mpicdc.core.wirefmt import WireFormat, all_finite, decode, encode_into, get_format

HEADER_BYTES = 80
MAX_DIMS = 4

# message kinds
JOB, STOP, REPLY, SKIPPED, REFUSED = 1, 2, 3, 4, 5
# healing (control channel): "you now stand for rank N", "loaded, ready", "I cannot see its shard",
# "here is the shard file" (header + the file's bytes)
ASSIGN, READY, FETCH, SHARD = 6, 7, 8, 9
OUT_OF_RANGE = 10  # a worker's block does not fit the job's wire format (float16 beyond 65504)

# tags: jobs and control have fixed tags; replies get one tag per (request, layer) window
TAG_JOB = 1
TAG_CTRL = 2
TAG_START = 3
TAG_SPARE = 4
_REPLY_BASE = 16
_REQUEST_WINDOW = 4096


class ReplyTags:
    """Tags of replies: one per ``(request, layer)`` in a window of consecutive requests.

    Distinct tags mean a late reply only ever matches the receive posted for it.  The
    window is 4096 requests, or fewer when the library's largest tag (``MPI_TAG_UB``,
    at least 32767 by the standard) cannot hold that many: a model with ``n_layers``
    distributed layers needs ``16 + window * n_layers`` tags.
    """

    def __init__(self, n_layers: int, tag_ub: int):
        self.n_layers = max(1, n_layers)
        self.window = min(_REQUEST_WINDOW, (tag_ub - _REPLY_BASE + 1) // self.n_layers)
        if self.window < 2:
            raise ValueError(f"this MPI library's largest tag ({tag_ub}) leaves no room for reply tags of "
                             f"{n_layers} distributed layers: keep some layers on the master")

    def tag(self, request: int, layer_index: int) -> int:
        return _REPLY_BASE + (request % self.window) * self.n_layers + layer_index


@dataclass(frozen=True)
class Header:
    kind: int
    request: int = -1
    layer: int = -1
    block: int = -1
    shape: tuple = ()
    compute_s: float = 0.0
    modeled_s: float = 0.0
    wire: int = 0  # wire format code of the payload (mpicdc.core.wirefmt.FORMATS)

    @property
    def format(self) -> WireFormat:
        """The payload's :class:`~mpicdc.core.wirefmt.WireFormat` (``ValueError`` for an unknown code)."""
        return get_format(self.wire)

    def pack_into(self, buf: np.ndarray) -> None:
        ints = buf[:HEADER_BYTES].view(np.int64)
        if len(self.shape) > MAX_DIMS:
            raise ValueError(f"at most {MAX_DIMS} dims on the wire, got shape {self.shape}")
        ints[:] = 0
        ints[0], ints[1], ints[2], ints[3] = self.kind, self.request, self.layer, self.block
        ints[4] = len(self.shape)
        dims = buf[40:56].view(np.uint32)  # slots 5..6 hold four 32-bit dimensions
        for i, d in enumerate(self.shape):
            if not 0 <= d < 1 << 32:
                raise ValueError(f"dimension {d} of shape {self.shape} does not fit the wire format")
            dims[i] = d
        times = buf[56:72].view(np.float64)
        times[0], times[1] = self.compute_s, self.modeled_s
        ints[9] = self.wire

    @classmethod
    def unpack(cls, buf: np.ndarray) -> "Header":
        ints = buf[:HEADER_BYTES].view(np.int64)
        ndim = int(ints[4])
        shape = tuple(int(d) for d in buf[40:56].view(np.uint32)[:ndim])
        times = buf[56:72].view(np.float64)
        return cls(int(ints[0]), int(ints[1]), int(ints[2]), int(ints[3]), shape,
                   float(times[0]), float(times[1]), int(ints[9]))


def message(header: Header, payload: np.ndarray | None = None, what: str = "payload") -> np.ndarray:
    """One contiguous buffer: header followed by the float32 ``payload`` in the header's wire format.

    Raises :class:`WireRangeError` (naming ``what``) when a finite value does not fit the format.
    """
    fmt = header.format
    count = 0 if payload is None else int(np.size(payload))
    buf = np.empty(HEADER_BYTES + fmt.nbytes(count), dtype=np.uint8)
    header.pack_into(buf)
    if payload is not None:
        encode_into(buf[HEADER_BYTES:].view(fmt.storage).reshape(np.shape(payload)), payload, fmt, what)
    return buf


def payload_bytes(shape: tuple, wire: int = 0) -> int:
    """Bytes of a whole message with a payload of ``shape`` in wire format ``wire`` (header included)."""
    return HEADER_BYTES + get_format(wire).nbytes(math.prod(shape))


def payload(buf: np.ndarray, shape: tuple, nbytes: int | None = None) -> np.ndarray:
    """The payload of ``buf`` as float32 of ``shape``, decoded from the header's wire format
    (a view, no copy, for float32)."""
    fmt = Header.unpack(buf).format
    count = fmt.nbytes(math.prod(shape))
    if nbytes is not None and nbytes < HEADER_BYTES + count:
        raise ValueError(f"message of {nbytes} bytes is too short for payload shape {shape}")
    return decode(buf[HEADER_BYTES:HEADER_BYTES + count], fmt, shape)


def payload_finite(buf: np.ndarray) -> bool:
    """Whether every payload value of ``buf`` is finite, read in its header's wire format."""
    return all_finite(buf[HEADER_BYTES:], Header.unpack(buf).format)


def reply_buffer(rows: int, cols: int, wire: int = 0) -> np.ndarray:
    """Receive buffer for a reply block of ``rows x cols`` values in wire format ``wire``, header zeroed
    (= not arrived)."""
    buf = np.empty(payload_bytes((rows, cols), wire), dtype=np.uint8)
    buf[:HEADER_BYTES] = 0
    return buf
