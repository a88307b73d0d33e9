"""Wire formats of activations and replies: float32, or a 16-bit float that halves the bytes.

Output splitting sends each distributed layer's whole input to every worker and gets every
block back: on a 100 Mbit/s link those bytes, not the workers' compute, bound the speedup
(``docs/performance.md``).  ``float16`` and ``bfloat16`` carry 2 bytes per value; every rank
computes and decodes in float32 and converts only at the edge of a message:

* ``float16`` (IEEE half): 11 significant bits (unit roundoff ``2**-11``), largest value 65504;
  a finite value beyond that is a :class:`WireRangeError`, never a silent ``inf``.
* ``bfloat16``: the top 16 bits of the float32 (8 significant bits, roundoff ``2**-8``, float32's
  range), rounded to nearest-even and carried as ``uint16`` (numpy has no bfloat16).

A non-finite input value stays non-finite (receivers refuse it as they refuse a float32 NaN).
Pure numpy, local.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "FORMATS",
    "WireFormat",
    "WireRangeError",
    "all_finite",
    "check_tolerance",
    "decode",
    "encode_into",
    "get_format",
    "round_trip",
    "wire_forward",
]


class WireRangeError(ValueError):
    """A finite float32 value does not fit the wire format (float16 beyond 65504)."""


@dataclass(frozen=True)
class WireFormat:
    """One wire format: its name, the code in a message header, bytes per value and rounding."""

    name: str
    code: int          # the header's dtype slot (0 = float32, what a zeroed header says)
    itemsize: int
    storage: str       # numpy dtype the payload is carried in
    roundoff: float    # unit roundoff u: a normal value x arrives within u * |x|
    max_value: float   # largest finite value

    def nbytes(self, count: int) -> int:
        """Payload bytes of ``count`` values."""
        return self.itemsize * int(count)


FORMATS = (
    WireFormat("float32", 0, 4, "float32", 2.0 ** -24, float(np.finfo(np.float32).max)),
    WireFormat("float16", 1, 2, "float16", 2.0 ** -11, 65504.0),
    WireFormat("bfloat16", 2, 2, "uint16", 2.0 ** -8, float(np.uint32(0x7F7F0000).view(np.float32))),
)
_BY_NAME = {f.name: f for f in FORMATS}


def get_format(which) -> WireFormat:
    """A :class:`WireFormat` by name (``float16``) or header code; ``ValueError`` naming the choices."""
    if isinstance(which, WireFormat):
        return which
    if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
        if 0 <= which < len(FORMATS):
            return FORMATS[which]
        raise ValueError(f"wire format code {which} is unknown (codes 0..{len(FORMATS) - 1}: "
                         f"{', '.join(f.name for f in FORMATS)})")
    if which in _BY_NAME:
        return _BY_NAME[which]
    raise ValueError(f"wire format {which!r} is unknown: use {', '.join(_BY_NAME)}")


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits of float32 ``x``: the top half, rounded to nearest-even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    with np.errstate(over="ignore"):
        bits = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():  # the rounding carry could have turned a NaN into inf or wrapped it
        bits[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return bits


def encode_into(out: np.ndarray, x: np.ndarray, fmt: WireFormat, what: str = "values") -> None:
    """Write float32 ``x`` into ``out`` (an array of ``fmt.storage``, same size) in wire format ``fmt``.

    Raises :class:`WireRangeError` (naming ``what``) when a finite value of ``x`` does not fit.
    """
    if fmt.code == 0:
        out[...] = x
        return
    flat = out.reshape(-1)
    if fmt.name == "float16":
        with np.errstate(over="ignore"):
            np.copyto(flat, np.ravel(x), casting="unsafe")
        bad = ~np.isfinite(flat)
    else:
        flat[...] = _bf16_bits(np.ravel(x))
        bad = (flat & 0x7F80) == 0x7F80
    if bad.any():
        src = np.ravel(x)
        overflow = bad & np.isfinite(src)
        if overflow.any():
            biggest = float(np.max(np.abs(src[overflow])))
            fix = "--wire bfloat16 (float32's range) or --wire float32" if fmt.name == "float16" else "--wire float32"
            raise WireRangeError(f"{what}: {int(overflow.sum())} value(s) up to {biggest:.4g} exceed the "
                                 f"{fmt.name} wire format's range ({fmt.max_value:.6g}); use {fix}")


def decode(raw: np.ndarray, fmt: WireFormat, shape: tuple) -> np.ndarray:
    """float32 values of payload bytes ``raw`` (``uint8``) in format ``fmt``: a view for float32."""
    values = raw.view(fmt.storage).reshape(shape)
    if fmt.code == 0:
        return values
    if fmt.name == "float16":
        return values.astype(np.float32)
    return (values.astype(np.uint32) << 16).view(np.float32)


def all_finite(raw: np.ndarray, fmt: WireFormat) -> bool:
    """Whether every value of payload bytes ``raw`` in format ``fmt`` is finite (no decoding)."""
    values = raw.view(fmt.storage)
    if fmt.name == "bfloat16":
        return not bool(np.any((values & 0x7F80) == 0x7F80))
    return bool(np.isfinite(values).all())


def round_trip(x: np.ndarray, fmt) -> np.ndarray:
    """``x`` as it arrives over the wire in ``fmt`` (float32), for serial emulation and tests."""
    fmt = get_format(fmt)
    if fmt.code == 0:
        return np.asarray(x, dtype=np.float32)
    out = np.empty(np.shape(x), dtype=fmt.storage)
    encode_into(out, np.asarray(x, dtype=np.float32), fmt)
    return decode(out.reshape(-1).view(np.uint8), fmt, np.shape(x))


def wire_forward(model, weights: dict, x, fmt, distributed) -> np.ndarray:
    """The serial forward as the runtime computes it fault-free over ``fmt``: each layer named in
    ``distributed`` gets its input and returns its output through :func:`round_trip`.

    What a job with ``--wire fmt`` and no losses outputs (up to float32 rounding of the split GEMMs),
    without MPI: the bench's error and top-1 figures and the tests' reference.
    """
    from mpicdc.core.graph import walk
    from mpicdc.core.kernels import LocalExecutor, check_input

    fmt, names = get_format(fmt), set(distributed)

    class _Rounded(LocalExecutor):
        def linear(self, layer, x, *, relu: bool = False):
            if layer.name not in names:
                return super().linear(layer, x, relu=relu)
            return round_trip(super().linear(layer, round_trip(x, fmt), relu=relu), fmt)

    return walk(model, check_input(model, x), _Rounded(weights))


def check_tolerance(plan, fmt) -> float:
    """Relative error a job over ``fmt`` may add to its output, what ``run --check`` allows on top of
    float32's: ``sum over distributed layers of (2 n + 1) u`` (``u`` the format's unit roundoff).

    Derivation, first order: a layer's input is rounded once (``u``); a reply block once (``u``);
    a block decoded from ``n`` data replies and a sum parity reply errs by up to ``2 n u`` of the
    layer's largest value.  Errors are taken to add across layers (a ReLU network passes a
    relative perturbation on about unchanged; measured errors are 10-40x below this bound,
    ``docs/performance.md``).  A layer split into bands (:mod:`mpicdc.core.bands`) adds ``2 n u``: a
    parity block's input is the rounded sum of ``n`` bands, not the sum of the rounded bands, so
    the block decoded from it carries the ``n`` data bands' input roundings and the parity's.
    """
    u = get_format(fmt).roundoff
    return float(sum(((4 if getattr(lp, "banded", False) else 2) * lp.n + 1) * u for lp in plan.layers))
