"""numpy kernels for every op, and the serial reference forward.

Every linear layer runs as three steps so that the runtime can put them on
different ranks:

1. :func:`lower` turns the layer input into a matrix ``X`` (im2col for
   convolutions, a column vector for dense layers) -- done by each worker;
2. ``W_i @ X + b_i`` with the worker's row block (one GEMM) -- :func:`gemm`;
3. :meth:`Lowered.finish` turns the decoded ``(rows, L)`` product back into an
   activation tensor -- done by the master, followed by the nonlinear ops.

Convolutions with unit stride use a *pitched* im2col: the input is written
into a flat zero-padded buffer, so each of the ``C*prod(kernel)`` rows of ``X``
is one contiguous slice of it (row ``(c, k_0, ..., k_{n-1})`` starts at
``c*plane + sum(k_a * step_a)``).  The GEMM then also produces a few junk
columns (the padded tail of each output row), which :meth:`Lowered.finish`
drops.  This keeps the copy into ``X`` at memory speed and the whole layer one
GEMM.  The padding is *shared*: the right pad of one row is the left pad of the
next (and the bottom pad rows of one channel are the top pad rows of the next),
so each row carries ``kernel - 1 - padding`` junk columns instead of
``kernel - 1``: for a 3x3 "same" convolution on a 56-wide image, 57 columns
per output row instead of 58.  Where the junk would still exceed
``MAX_JUNK`` of the GEMM (small images: VGG16's 28x28 and 14x14 layers), and
for strided convolutions, ``X`` is a dense strided copy with exactly
``prod(out)`` columns instead.  Only shapes decide, so the master can get the
columns of any layer's product from :func:`lowered_layout`.

The weight matrix layout never depends on the lowering: one row per output
channel, columns ordered ``(in_channel, *kernel)`` exactly like torch's
``weight.reshape(out, -1)``, because workers hold row blocks of it.

Where the time goes (VGG16, one core; details in ``docs/performance.md``):
the GEMMs.  But a lowered ``X`` can be far larger than the layer's input
(116 MB for VGG16's conv1_2, 359 MB for C3D's conv2a), and writing it to
memory and reading it back costs as much as a third of the GEMM.
:func:`lower_gemm` therefore lowers and multiplies such layers one
cache-sized column tile at a time -- the same product, so workers and parity
decoding are unaffected -- and :func:`forward` uses it, fuses a ReLU that
follows a linear layer into its product, and reuses scratch memory through a
:class:`Workspace`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from mpicdc.core.graph import LayerExecutor, walk
from mpicdc.core.models import Layer, Model, conv_groups, pad_pairs

DTYPE = np.float32


@dataclass(frozen=True)
class Lowered:
    """The GEMM operand ``X`` of a linear layer plus what is needed to undo the lowering.

    Attributes
    ----------
    X : ``(cols, L)`` float32 matrix; ``W @ X`` is the layer output in ``L`` columns
        (``None`` when :func:`lower_gemm` never materialised it).
    out_spatial : valid output extent per spatial axis, ``()`` for dense layers.
    pitch : extent of each spatial axis inside the ``L`` columns (``L == prod(pitch)``);
        ``pitch[a] >= out_spatial[a]``, the excess columns are junk.
    """

    X: np.ndarray | None
    out_spatial: tuple
    pitch: tuple

    def finish(self, Y: np.ndarray) -> np.ndarray:
        """Reshape a ``(rows, L)`` GEMM product into the ``(rows, *out_spatial)`` activation.

        Returns a view of ``Y`` (no copy); with junk columns the view is not
        contiguous, which every kernel here accepts.
        """
        if not self.out_spatial:
            return Y.reshape(-1)
        Y = Y.reshape((Y.shape[0],) + self.pitch)
        if self.pitch != self.out_spatial:
            Y = Y[(slice(None),) + tuple(slice(0, o) for o in self.out_spatial)]
        return Y


class Workspace:
    """Reusable float32 scratch memory for lowering (local, not thread-safe).

    :func:`lower` with a workspace returns an ``X`` that lives in this
    workspace, so it is only valid until the next lowering that uses the same
    workspace.  That is exactly the life of ``X`` in a worker (lower, one GEMM,
    reply) and in :func:`forward`.  Why: the buffers grow to the largest layer
    once and are then reused, instead of a fresh allocation per layer; a
    fresh ``X`` of VGG16's conv1_2 size (116 MB) costs about 7 ms of page
    faults on top of the 12 ms copy.  With :func:`lower_gemm` tiling the big
    layers, the workspace stays bounded (42 MB for VGG16, 107 MB for C3D).
    """

    def __init__(self):
        self._buffers: dict = {}

    def take(self, key: str, size: int) -> np.ndarray:
        """A 1-D float32 array of ``size`` elements, reusing the buffer named ``key``."""
        buf = self._buffers.get(key)
        if buf is None or buf.size < size:
            buf = np.empty(size, dtype=DTYPE)
            self._buffers[key] = buf
        return buf[:size]

    @property
    def nbytes(self) -> int:
        """Bytes held by the workspace."""
        return sum(b.nbytes for b in self._buffers.values())


def _attr_list(layer: Layer, key: str, nd: int, default):
    value = layer.attrs.get(key, default)
    return [value] * nd if isinstance(value, int) else list(value)


def _out_extent(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def _scratch(workspace, key, size):
    return np.empty(size, dtype=DTYPE) if workspace is None else workspace.take(key, size)


def _pitched_geometry(spatial, kernel, padding):
    """Extents, steps and offsets of the shared-padding pitched buffer.

    Every spatial axis ``a`` has extent ``E_a = S_a + g_a`` in the buffer: the
    data then ``g_a`` zero cells that serve as the right (bottom) pad of this
    line and the left (top) pad of the next one.  ``g_a >= padding[a]`` makes
    every out-of-image read land on a zero cell; for inner axes also
    ``E_a >= out_a`` so that each output line fits in the pitch.
    """
    nd = len(spatial)
    out = [_out_extent(spatial[a], kernel[a], 1, padding[a]) for a in range(nd)]
    gap = [padding[0]] + [max(padding[a], out[a] - spatial[a]) for a in range(1, nd)]
    extent = [spatial[a] + gap[a] for a in range(nd)]
    step = [math.prod(extent[a + 1:]) for a in range(nd)]
    plane = extent[0] * step[0]
    base = sum(padding[a] * step[a] for a in range(nd))   # zero head before channel 0
    return out, gap, extent, step, plane, base


def _fill_pitched(buf, x, spatial, extent, plane, base):
    """Write ``x`` into the pitched buffer and zero exactly the cells that are not data."""
    C, nd = x.shape[0], len(spatial)
    buf[:base] = 0
    body = buf[base:base + C * plane].reshape((C,) + tuple(extent))
    data = tuple(slice(0, s) for s in spatial)
    body[(slice(None),) + data] = x
    for a in range(nd):  # cells whose first out-of-data axis is a
        if extent[a] > spatial[a]:
            body[(slice(None),) + data[:a] + (slice(spatial[a], None),)] = 0
    buf[base + C * plane:] = 0


#: A unit-stride convolution uses the pitched layout unless its junk columns
#: would be more than this fraction of the GEMM (VGG16's 28x28 and 14x14
#: layers: 3.4% and 6.7%); then the dense layout, whose copy costs about the
#: same but whose GEMM is that much smaller ...
MAX_JUNK = 0.03
#: ... unless the dense ``X`` is larger than this: only pitched layouts can be
#: tiled by :func:`lower_gemm`.
DENSE_MAX_BYTES = 64 << 20


def _conv_params(layer: Layer, in_shape):
    """``(kernel, stride, padding, extra)`` of a conv for an input of ``in_shape``.

    Asymmetric pads are split into a symmetric ``padding`` (the smaller side,
    which the lowering handles) and ``extra`` ``(begin, end)`` zeros per axis
    that :func:`_prepad` writes explicitly first.
    """
    nd = len(in_shape) - 1
    pairs = pad_pairs(layer.attrs.get("padding", 0), nd, layer.name)
    padding = [min(p) for p in pairs]
    extra = [(b - p, e - p) for (b, e), p in zip(pairs, padding)]
    return _attr_list(layer, "kernel", nd, 1), _attr_list(layer, "stride", nd, 1), padding, extra


def _prepad(x, extra, fill=0.0):
    """``x`` with ``extra`` ``(begin, end)`` cells of ``fill`` around each spatial axis (x itself if none)."""
    if not any(b or e for b, e in extra):
        return x
    shape = (x.shape[0],) + tuple(s + b + e for s, (b, e) in zip(x.shape[1:], extra))
    xp = np.full(shape, fill, dtype=x.dtype)
    xp[(slice(None),) + tuple(slice(b, b + s) for s, (b, _) in zip(x.shape[1:], extra))] = x
    return xp


def _padded_shape(in_shape, extra):
    return (in_shape[0],) + tuple(s + b + e for s, (b, e) in zip(in_shape[1:], extra))


def _check_geometry(in_shape, kernel, stride, padding):
    nd = len(in_shape) - 1
    kernel, stride, padding = list(kernel), list(stride), list(padding)
    for name, v in (("kernel", kernel), ("stride", stride), ("padding", padding)):
        if len(v) != nd:
            raise ValueError(f"im2col: {name} {v} needs {nd} entries for input shape {tuple(in_shape)}")
    if min(stride) < 1 or min(kernel) < 1 or min(padding) < 0:
        raise ValueError(f"im2col: need kernel >= 1, stride >= 1, padding >= 0; "
                         f"got kernel {kernel}, stride {stride}, padding {padding}")
    spatial = tuple(in_shape[1:])
    if any(_out_extent(spatial[a], kernel[a], stride[a], padding[a]) < 1 for a in range(nd)):
        raise ValueError(f"im2col: kernel {kernel} (padding {padding}) does not fit input shape "
                         f"{tuple(in_shape)}")
    return kernel, stride, padding


def _layout(in_shape, kernel, stride, padding):
    """``(pitched, out_spatial, pitch)``: which lowering a convolution gets, from shapes alone.

    Only shapes decide, never the weight block, so that every worker and the
    master agree on the columns of ``Y`` (see :func:`lowered_layout`).
    """
    C, spatial = in_shape[0], tuple(in_shape[1:])
    nd = len(spatial)
    if all(s == 1 for s in stride):
        out, _, extent, _, _, _ = _pitched_geometry(spatial, kernel, padding)
        pitch = (out[0],) + tuple(extent[1:])
        junk = 1.0 - math.prod(out) / math.prod(pitch)
        dense_bytes = 4 * C * math.prod(kernel) * math.prod(out)
        if junk <= MAX_JUNK or dense_bytes > DENSE_MAX_BYTES:
            return True, tuple(out), pitch
    out = tuple(_out_extent(spatial[i], kernel[i], stride[i], padding[i]) for i in range(nd))
    return False, out, out


def lowered_layout(layer: Layer, in_shape) -> Lowered:
    """The columns of a linear layer's product for an input of ``in_shape``, without lowering.

    Local, pure.  Returns a :class:`Lowered` with ``X=None`` whose
    :meth:`~Lowered.finish` turns a ``(rows, L)`` product -- e.g. one the
    master decoded from the workers' replies -- into the activation.
    """
    if layer.op == "dense":
        return Lowered(None, (), ())
    if layer.op != "conv":
        raise ValueError(f"layer {layer.name!r} ({layer.op}) is not linear")
    kernel, stride, padding, extra = _conv_params(layer, in_shape)
    in_shape = _padded_shape(tuple(in_shape), extra)
    kernel, stride, padding = _check_geometry(in_shape, kernel, stride, padding)
    _, out, pitch = _layout(in_shape, kernel, stride, padding)
    return Lowered(None, out, pitch)


def _lowering_view(x, kernel, stride, padding, workspace, layout_shape=None):
    """Copy ``x`` into a padded scratch buffer and return ``X`` as a strided view of it.

    Returns ``(view, out_spatial, pitch, pitched)``.  ``view`` has shape
    ``(C, *kernel, *columns)``: ``columns`` is ``(L,)`` for the pitched layout
    and ``out_spatial`` for the dense one; reshaped to ``(C*prod(kernel), L)``
    it is ``X``.  ``layout_shape`` (default ``x.shape``) decides the layout:
    a grouped conv lowers only some channels but must keep the whole layer's.
    """
    C, spatial = x.shape[0], tuple(x.shape[1:])
    nd = len(spatial)
    pitched, out, pitch = _layout(x.shape if layout_shape is None else layout_shape, kernel, stride, padding)
    if pitched:
        _, _, extent, step, plane, base = _pitched_geometry(spatial, kernel, padding)
        L = math.prod(pitch)
        last_read = (C - 1) * plane + sum((kernel[a] - 1) * step[a] for a in range(nd)) + L
        buf = _scratch(workspace, "padded", max(last_read, base + C * plane))
        _fill_pitched(buf, x, spatial, extent, plane, base)
        item = buf.itemsize
        view = as_strided(buf, shape=(C,) + tuple(kernel) + (L,),
                          strides=tuple(v * item for v in [plane] + step + [1]), writeable=False)
        return view, out, pitch, True
    if any(padding):
        padded = tuple(spatial[i] + 2 * padding[i] for i in range(nd))
        xp = _scratch(workspace, "padded", C * math.prod(padded)).reshape((C,) + padded)
        xp[...] = 0
        xp[(slice(None),) + tuple(slice(padding[i], padding[i] + spatial[i]) for i in range(nd))] = x
    else:
        xp = x
    st = xp.strides
    view = as_strided(xp, shape=(C,) + tuple(kernel) + out,
                      strides=(st[0],) + tuple(st[1:]) + tuple(st[i + 1] * stride[i] for i in range(nd)),
                      writeable=False)
    return view, out, pitch, False


def im2col(x: np.ndarray, kernel, stride, padding, *, workspace: Workspace | None = None) -> Lowered:
    """Lower a ``(C, *spatial)`` tensor for an N-d convolution (rows ordered channel-major).

    Parameters
    ----------
    x : ``(C, *spatial)`` float32 input (any strides).
    kernel, stride, padding : one int per spatial axis.
    workspace : reuse its scratch memory (``X`` is then only valid until the
        next lowering with the same workspace); ``None`` allocates fresh arrays.

    Returns
    -------
    Lowered
        ``X`` has ``C * prod(kernel)`` rows ordered ``(c, *kernel offsets)``,
        matching the columns of torch's ``weight.reshape(out, -1)``.  Unit
        stride uses the pitched layout (contiguous row copies, a few junk
        columns) unless the junk would exceed ``MAX_JUNK``; other strides, and
        those, use a dense strided copy with exactly ``prod(out)`` columns.
    """
    kernel, stride, padding = _check_geometry(x.shape, kernel, stride, padding)
    view, out, pitch, _ = _lowering_view(x, kernel, stride, padding, workspace)
    rows = x.shape[0] * math.prod(kernel)
    L = math.prod(pitch)
    X = _scratch(workspace, "X", rows * L).reshape(rows, L)
    np.copyto(X.reshape(view.shape), view)
    return Lowered(X, out, pitch)


def lower(layer: Layer, x: np.ndarray, *, workspace: Workspace | None = None) -> Lowered:
    """Lower the input of a linear layer (``conv`` or ``dense``) into its GEMM operand.

    Local.  With ``workspace`` the returned ``X`` reuses that scratch memory
    (valid until the next lowering with it); see :class:`Workspace`.
    """
    if layer.op == "dense":
        return Lowered(np.ascontiguousarray(x, dtype=DTYPE).reshape(-1, 1), (), ())
    if layer.op != "conv":
        raise ValueError(f"layer {layer.name!r} ({layer.op}) is not linear")
    kernel, stride, padding, extra = _conv_params(layer, x.shape)
    return im2col(_prepad(np.asarray(x, dtype=DTYPE), extra), kernel, stride, padding, workspace=workspace)


def gemm(W: np.ndarray, b: np.ndarray | None, X: np.ndarray) -> np.ndarray:
    """``W @ X + b[:, None]``: the one GEMM a worker runs for its row block."""
    Y = W @ X
    if b is not None:
        Y += b[:, None]
    return Y


#: Column tile of :func:`lower_gemm`: about this many bytes of ``X`` per tile
#: (at least 256 columns), so that a tile is still in the L2 cache when the
#: GEMM reads it.
TILE_BYTES = 512 << 10
#: :func:`lower_gemm` tiles when ``X`` is larger than this and the weight block
#: has at most ``TILE_MAX_ROWS`` rows: then the GEMM does few flops per byte of
#: ``X`` (``2 * rows`` per float), so streaming ``X`` through memory is what
#: costs.  With more rows the GEMM is compute-bound and one big call is
#: faster (VGG16 conv4_2, 512 rows: 10% slower tiled).
UNTILED_BYTES = 4 << 20
TILE_MAX_ROWS = 128
#: ... and always beyond this size of ``X``, to bound the scratch memory.
ALWAYS_TILE_BYTES = 128 << 20


def lower_gemm(layer: Layer, W: np.ndarray, b: np.ndarray | None, x: np.ndarray, *,
               relu: bool = False, workspace: Workspace | None = None, row0: int = 0) -> tuple:
    """``gemm(W, b, lower(layer, x).X)`` without materialising all of ``X``.

    Local.  For a pitched convolution whose ``X`` would be large (VGG16's
    conv1_2: 116 MB, C3D's conv2a: 359 MB) and whose weight block has few
    rows, the columns of ``X`` are lowered and multiplied one cache-sized tile
    at a time (``TILE_BYTES``), each tile straight after its copy, into the
    columns of one ``(rows, L)`` product.  It is the same product as the
    single GEMM -- same ``W`` row block, same columns, junk included, so
    parity decoding and :meth:`Lowered.finish` work unchanged -- but ``X``
    never goes out to memory and back: on one core, VGG16's conv1_2 takes
    0.68x the time of lower + GEMM, and a worker's 16-row block of it 0.5x.
    Other layers take the plain :func:`lower` + :func:`gemm` path (see
    ``UNTILED_BYTES`` for the rule).

    Parameters
    ----------
    layer : a ``conv`` or ``dense`` layer.
    W, b : the (row block of the) weight matrix and its bias (``b`` may be None).
    x : the layer input activation.
    relu : also apply ReLU to the product (junk columns included), in place.
    workspace : scratch memory for the lowering, see :class:`Workspace`.
    row0 : first output channel of ``W``'s rows; only a grouped conv needs it
        (its row block reads the input channels of its own groups, see
        :func:`_grouped_gemm`).  Rows past the layer's output channels (a
        zero-padded last block) give zeros plus their bias.

    Returns
    -------
    (Y, lowered)
        The ``(rows, L)`` float32 product, and the :class:`Lowered` that
        describes its columns (its ``X`` is ``None`` when ``X`` was tiled).
    """
    if layer.op != "conv":
        lo = lower(layer, x, workspace=workspace)
        Y = gemm(W, b, lo.X)
    elif conv_groups(layer, np.shape(x)[0]) > 1:
        Y, lo = _grouped_gemm(layer, W, b, x, row0, workspace)
    else:
        x = np.asarray(x, dtype=DTYPE)
        kernel, stride, padding, extra = _conv_params(layer, x.shape)
        x = _prepad(x, extra)
        kernel, stride, padding = _check_geometry(x.shape, kernel, stride, padding)
        rows = x.shape[0] * math.prod(kernel)
        if W.shape[1] != rows:
            raise ValueError(f"layer {layer.name!r}: weight block has {W.shape[1]} columns, "
                             f"the lowered input has {rows} rows")
        view, out, pitch, pitched = _lowering_view(x, kernel, stride, padding, workspace)
        L = math.prod(pitch)
        tile = max(256, (TILE_BYTES // (4 * rows)) // 64 * 64)
        nbytes = 4 * rows * L
        if pitched and tile < L and (nbytes > ALWAYS_TILE_BYTES
                                     or (nbytes > UNTILED_BYTES and W.shape[0] <= TILE_MAX_ROWS)):
            Y = np.empty((W.shape[0], L), dtype=DTYPE)
            buf = _scratch(workspace, "X", rows * tile)
            for start in range(0, L, tile):
                stop = min(L, start + tile)
                T = buf[:rows * (stop - start)].reshape(rows, stop - start)
                np.copyto(T.reshape(view.shape[:-1] + (stop - start,)), view[..., start:stop])
                np.matmul(W, T, out=Y[:, start:stop])
            # bias and ReLU once over the whole contiguous product: long rows make
            # the ufuncs several times faster than per-tile calls on short rows
            if b is not None:
                Y += b[:, None]
            lo = Lowered(None, out, pitch)
        else:
            X = _scratch(workspace, "X", rows * L).reshape(rows, L)
            np.copyto(X.reshape(view.shape), view)
            lo = Lowered(X, out, pitch)
            Y = gemm(W, b, X)
    if relu:
        np.maximum(Y, 0, out=Y)
    return Y, lo


def _grouped_gemm(layer: Layer, W, b, x, row0: int, workspace):
    """Product of a grouped conv's row block ``W`` (rows ``row0...``): one GEMM per group.

    The layer's weight matrix has ``(C / groups) * prod(kernel)`` columns (torch's
    ``weight.reshape(out, -1)``); output channel ``o`` belongs to group
    ``o // (out / groups)`` and reads the lowered rows of that group's input
    channels.  Only the channels of the groups the block touches are lowered; a
    block of whole groups is one batched matmul, any other block one GEMM per
    group.  The columns are those of the whole layer (:func:`lowered_layout`).
    """
    x = np.asarray(x, dtype=DTYPE)
    C, out_ch = x.shape[0], layer.attrs["out"]
    groups = conv_groups(layer, C)
    cpg, opg = C // groups, out_ch // groups
    kernel, stride, padding, extra = _conv_params(layer, x.shape)
    x = _prepad(x, extra)
    kernel, stride, padding = _check_geometry(x.shape, kernel, stride, padding)
    K = math.prod(kernel)
    rows = W.shape[0]
    if W.shape[1] != cpg * K:
        raise ValueError(f"layer {layer.name!r}: weight block has {W.shape[1]} columns, a group of "
                         f"{groups} reads {cpg * K} lowered rows")
    if not 0 <= row0 < out_ch:
        raise ValueError(f"layer {layer.name!r}: row0={row0} outside its {out_ch} output channels")
    valid = min(rows, out_ch - row0)
    g0, g1 = row0 // opg, (row0 + valid - 1) // opg + 1
    view, out, pitch, _ = _lowering_view(x[g0 * cpg:g1 * cpg], kernel, stride, padding, workspace,
                                         layout_shape=x.shape)
    L = math.prod(pitch)
    X = _scratch(workspace, "X", (g1 - g0) * cpg * K * L).reshape((g1 - g0) * cpg * K, L)
    np.copyto(X.reshape(view.shape), view)
    Y = np.zeros((rows, L), dtype=DTYPE)
    if row0 % opg == 0 and valid % opg == 0:
        np.matmul(W[:valid].reshape(g1 - g0, opg, cpg * K), X.reshape(g1 - g0, cpg * K, L),
                  out=Y[:valid].reshape(g1 - g0, opg, L))
    else:
        for g in range(g0, g1):
            lo_r, hi_r = max(row0, g * opg) - row0, min(row0 + valid, (g + 1) * opg) - row0
            Xg = X[(g - g0) * cpg * K:(g - g0 + 1) * cpg * K]
            np.matmul(W[lo_r:hi_r], Xg, out=Y[lo_r:hi_r])
    if b is not None:
        Y += b[:, None]
    return Y, Lowered(None, out, pitch)


def linear_forward(layer: Layer, W: np.ndarray, b: np.ndarray, x: np.ndarray, *,
                   workspace: Workspace | None = None) -> np.ndarray:
    """Full linear layer on one process: lower, one GEMM, finish (tiled, see :func:`lower_gemm`)."""
    Y, lo = lower_gemm(layer, W, b, x, workspace=workspace)
    return lo.finish(Y)


# ---------------------------------------------------------------- nonlinear ops

def _pool_params(layer, x):
    """``(kernel, stride, pads)`` of a pool, ``pads`` one ``(begin, end)`` per spatial axis."""
    nd = x.ndim - 1
    kernel = _attr_list(layer, "kernel", nd, 1)
    return (kernel, _attr_list(layer, "stride", nd, kernel),
            pad_pairs(layer.attrs.get("padding", 0), nd, layer.name))


def _separable(x, kernel, stride, padding, ufunc, fill):
    """Reduce every pooling window of ``x`` with ``ufunc``, one spatial axis at a time.

    A box window is separable, so each axis costs ``kernel[a] - 1`` ufunc calls
    on strided views; the outermost axis goes first so that the large early
    passes read whole contiguous rows.  Always returns a new array.
    """
    nd = x.ndim - 1
    x = _prepad(x, padding, fill)
    result = None
    for a in range(nd):
        k, s = kernel[a], stride[a]
        o = (x.shape[a + 1] - k) // s + 1
        if k == 1 and s == 1 and o == x.shape[a + 1]:
            continue
        lead = (slice(None),) * (a + 1)
        views = [x[lead + (slice(t, t + s * (o - 1) + 1, s),)] for t in range(k)]
        y = views[0].copy() if k == 1 else ufunc(views[0], views[1])
        for v in views[2:]:
            ufunc(y, v, out=y)
        x = result = y
    return x.copy() if result is None else x


def maxpool(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Max pooling with ``-inf`` padding (torch/ONNX semantics)."""
    kernel, stride, padding = _pool_params(layer, x)
    return _separable(x, kernel, stride, padding, np.maximum, -np.inf)


def avgpool(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Average pooling; padded cells are excluded from the count unless ``count_include_pad``."""
    kernel, stride, padding = _pool_params(layer, x)
    total = _separable(x.astype(DTYPE, copy=False), kernel, stride, padding, np.add, 0)
    if any(b or e for b, e in padding) and not layer.attrs.get("count_include_pad", False):
        count = np.ones((1,) * x.ndim, dtype=DTYPE)
        for a, (k, s, (p, _)) in enumerate(zip(kernel, stride, padding)):
            n = x.shape[a + 1]
            start = np.arange(total.shape[a + 1]) * s - p
            valid = (np.minimum(start + k, n) - np.maximum(start, 0)).astype(DTYPE)
            count = count * valid.reshape((1,) * (a + 1) + (-1,) + (1,) * (x.ndim - a - 2))
        return total / count
    total /= DTYPE(math.prod(kernel))
    return total


def lrn(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Local response normalisation across channels (as in AlexNet, ONNX LRN and torch).

    ``y_c = x_c / (k + alpha / size * sum_{j in window(c)} x_j^2) ** beta`` with
    the window ``[c - size//2, c + (size-1)//2]`` clipped to the channels.  The
    window sums are ``size`` shifted adds of the zero-padded squares, in
    float32 like torch (7x faster than a float64 cumulative sum; the sums
    have only ``size`` terms).
    """
    a = layer.attrs
    size = int(a.get("size", 5))
    C = x.shape[0]
    sq = np.zeros((C + size - 1,) + x.shape[1:], dtype=DTYPE)
    np.square(x, out=sq[size // 2:size // 2 + C])
    s = sq[:C].copy()
    for i in range(1, size):
        s += sq[i:i + C]
    s *= DTYPE(a.get("alpha", 1e-4) / size)
    s += DTYPE(a.get("k", 2.0))
    np.power(s, DTYPE(-a.get("beta", 0.75)), out=s)
    s *= x
    return s


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the first (class / channel) axis."""
    z = x - x.max(axis=0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=0, keepdims=True)


def hardsigmoid(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """``clip(alpha * x + beta, 0, 1)`` in float32."""
    y = x * DTYPE(alpha)
    y += DTYPE(beta)
    return np.clip(y, 0, 1, out=y)


def nonlinear(layer: Layer, inputs: list) -> np.ndarray:
    """Run a parameter-free op on the master; ``inputs`` are the input activations in order."""
    op, x = layer.op, inputs[0]
    if op == "relu":
        return np.maximum(x, 0)
    if op == "maxpool":
        return maxpool(layer, x)
    if op == "avgpool":
        return avgpool(layer, x)
    if op == "gap":
        y = x.reshape(x.shape[0], -1).mean(axis=1, dtype=np.float64).astype(DTYPE)
        return y.reshape((x.shape[0],) + (1,) * (x.ndim - 1)) if layer.attrs.get("keepdims") else y
    if op == "lrn":
        return lrn(layer, x)
    if op == "flatten":
        return np.ascontiguousarray(x).reshape(-1)
    if op == "softmax":
        return softmax(x)
    if op == "concat":
        return np.concatenate(inputs, axis=0)
    if op == "add":
        return sum(inputs[1:], start=inputs[0].copy())
    if op == "batchnorm":
        shape = (-1,) + (1,) * (x.ndim - 1)
        scale = np.asarray(layer.attrs["scale"], DTYPE).reshape(shape)
        shift = np.asarray(layer.attrs["shift"], DTYPE).reshape(shape)
        return x * scale + shift
    if op == "identity":
        return x
    if op == "clip":
        return np.clip(x, DTYPE(layer.attrs.get("min", -np.inf)), DTYPE(layer.attrs.get("max", np.inf)))
    if op == "gmp":
        y = x.reshape(x.shape[0], -1).max(axis=1)
        return y.reshape((x.shape[0],) + (1,) * (x.ndim - 1)) if layer.attrs.get("keepdims") else y
    if op == "hardsigmoid":
        return hardsigmoid(x, layer.attrs.get("alpha", 1 / 6), layer.attrs.get("beta", 0.5))
    if op == "hardswish":
        return x * hardsigmoid(x, 1 / 6, 0.5)
    if op == "channel_shuffle":
        g = layer.attrs["groups"]
        return np.ascontiguousarray(x.reshape((g, x.shape[0] // g) + x.shape[1:]).swapaxes(0, 1)).reshape(x.shape)
    if op == "pad":
        pads = pad_pairs(layer.attrs["pads"], x.ndim, layer.name)
        out = np.full(tuple(n + b + e for n, (b, e) in zip(x.shape, pads)), layer.attrs.get("value", 0.0), DTYPE)
        out[tuple(slice(b, b + n) for n, (b, _) in zip(x.shape, pads))] = x
        return out
    if op == "slice":
        return x[layer.attrs["start"]:layer.attrs["stop"]]
    raise ValueError(f"layer {layer.name!r}: no kernel for op {op!r}")


# ---------------------------------------------------------------- inputs and reference forward

def check_input(model: Model, x) -> np.ndarray:
    """Validate an input tensor (no batch axis, or a batch axis of 1) and return it as float32."""
    x = np.asarray(x)
    expected = tuple(model.input_shape)
    if x.shape == (1,) + expected:
        x = x[0]
    if x.shape != expected:
        raise ValueError(f"model {model.name!r} expects input of shape {expected} "
                         f"(or {(1,) + expected}), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"model {model.name!r} expects a real-valued input, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=DTYPE)
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ValueError(f"the input has {bad} non-finite value(s) (NaN or infinity) of {x.size}; "
                         "every value must be a finite number")
    return x


def default_input(model: Model, seed: int = 0) -> np.ndarray:
    """The deterministic input used when none is given: uniform [0, 1) pixels."""
    return np.random.default_rng(seed).random(model.input_shape, dtype=DTYPE)


def forward(model: Model, weights: dict, x, return_all: bool = False, *,
            workspace: Workspace | None = None, timings: dict | None = None):
    """Serial reference forward of ``model`` on one process (batch 1).

    Parameters
    ----------
    model, weights : the graph and ``{layer: (W, b)}`` of its linear layers.
    x : input of shape ``model.input_shape`` (or with a batch axis of 1).
    return_all : return a dict of every layer's output (plus ``"input"``)
        instead of the output activation.
    workspace : scratch memory for the lowering, reused across layers; pass
        the same :class:`Workspace` to repeated calls to also reuse it across
        requests.  ``None`` uses a fresh one for this call.
    timings : if a dict, filled with ``{layer: seconds}`` (wall clock) of
        this call; a ReLU fused into its linear layer is timed with it and
        gets 0.

    Notes
    -----
    Every linear layer computes the product the workers compute
    (:func:`lower_gemm`, i.e. :func:`lower` + :func:`gemm`, followed by
    :meth:`Lowered.finish`).  Without ``return_all`` a ReLU that is the only
    reader of a linear layer's output is applied in place on the product
    (junk columns included), and activations are dropped after their last
    reader, which saves a pass and a copy per layer and keeps the peak memory
    down; the values are identical.  The walk is :func:`mpicdc.core.graph.walk`
    with a :class:`LocalExecutor`.
    """
    return walk(model, check_input(model, x), LocalExecutor(weights, workspace),
                keep_all=return_all, timings=timings)


class LocalExecutor(LayerExecutor):
    """Runs every layer on this process with numpy: the serial forward and the master's own layers.

    Parameters
    ----------
    weights : ``{layer: (W, b)}`` of the linear layers it runs.
    workspace : scratch memory for the lowerings (``None``: a fresh one).

    A ReLU fused into a linear layer is applied in place on its product (junk
    columns included), which saves a pass and a copy; the values are identical.
    """

    fuses_relu = True

    def __init__(self, weights: dict, workspace: Workspace | None = None):
        self.weights = weights
        self.workspace = Workspace() if workspace is None else workspace

    def linear(self, layer: Layer, x, *, relu: bool = False) -> np.ndarray:
        W, b = self.weights[layer.name]
        Y, lo = lower_gemm(layer, W, b, x, relu=relu, workspace=self.workspace)
        return lo.finish(Y)

    def nonlinear(self, layer: Layer, inputs: list) -> np.ndarray:
        return nonlinear(layer, inputs)
