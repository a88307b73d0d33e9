"""numpy kernels for every op, and the serial reference forward.

Every linear layer runs as three steps so that the runtime can put them on
different ranks:

1. :func:`lower` turns the layer input into a matrix ``X`` (im2col for
   convolutions, a column vector for dense layers) -- done by each worker;
2. ``W_i @ X + b_i`` with the worker's row block (one GEMM) -- :func:`gemm`;
3. :meth:`Lowered.finish` turns the decoded ``(rows, L)`` product back into an
   activation tensor -- done by the master, followed by the nonlinear ops.

Convolutions with unit stride use a *pitched* im2col: the input is zero-padded
and flattened, so each of the ``C*prod(kernel)`` rows of ``X`` is one
contiguous slice of it.  The GEMM then also produces a few junk columns (the
padded tail of each output row), which :meth:`Lowered.finish` drops.  This
keeps the copy into ``X`` at memory speed and the whole layer one GEMM.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from itertools import product

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .models import Layer, Model

DTYPE = np.float32


@dataclass(frozen=True)
class Lowered:
    """The GEMM operand ``X`` of a linear layer plus what is needed to undo the lowering."""

    X: np.ndarray          # (cols, L) float32
    out_spatial: tuple     # valid output extent per spatial axis, () for dense
    pitch: tuple           # extent of each spatial axis inside the L columns

    def finish(self, Y: np.ndarray) -> np.ndarray:
        """Reshape a ``(rows, L)`` GEMM product into the ``(rows, *out_spatial)`` activation."""
        if not self.out_spatial:
            return Y.reshape(-1)
        Y = Y.reshape((Y.shape[0],) + self.pitch)
        if self.pitch != self.out_spatial:
            Y = Y[(slice(None),) + tuple(slice(0, o) for o in self.out_spatial)]
        return Y


def _attr_list(layer: Layer, key: str, nd: int, default):
    value = layer.attrs.get(key, default)
    return [value] * nd if isinstance(value, int) else list(value)


def _out_extent(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def im2col(x: np.ndarray, kernel, stride, padding) -> Lowered:
    """Lower a ``(C, *spatial)`` tensor for an N-d convolution (rows ordered channel-major).

    Unit stride uses the pitched layout (contiguous row copies, junk columns);
    other strides use a dense strided view with exactly ``prod(out)`` columns.
    """
    C, spatial = x.shape[0], x.shape[1:]
    nd = len(spatial)
    padded = tuple(spatial[i] + 2 * padding[i] for i in range(nd))
    out = tuple(_out_extent(spatial[i], kernel[i], stride[i], padding[i]) for i in range(nd))
    item = x.itemsize
    if all(s == 1 for s in stride):
        plane = math.prod(padded)
        axis_step = [math.prod(padded[i + 1:]) for i in range(nd)]
        tail = sum((kernel[i] - 1) * axis_step[i] for i in range(1, nd))
        buf = np.zeros(C * plane + tail, dtype=x.dtype)
        inner = buf[:C * plane].reshape((C,) + padded)
        inner[(slice(None),) + tuple(slice(padding[i], padding[i] + spatial[i]) for i in range(nd))] = x
        L = out[0] * axis_step[0]
        view = as_strided(buf, shape=(C,) + tuple(kernel) + (L,),
                          strides=(plane * item,) + tuple(a * item for a in axis_step) + (item,),
                          writeable=False)
        X = view.reshape(C * math.prod(kernel), L)
        return Lowered(X, out, (out[0],) + padded[1:])
    if any(padding):
        xp = np.zeros((C,) + padded, dtype=x.dtype)
        xp[(slice(None),) + tuple(slice(padding[i], padding[i] + spatial[i]) for i in range(nd))] = x
    else:
        xp = np.ascontiguousarray(x)
    st = xp.strides
    view = as_strided(xp, shape=(C,) + tuple(kernel) + out,
                      strides=(st[0],) + tuple(st[1:]) + tuple(st[i + 1] * stride[i] for i in range(nd)),
                      writeable=False)
    X = view.reshape(C * math.prod(kernel), math.prod(out))
    return Lowered(X, out, out)


def lower(layer: Layer, x: np.ndarray) -> Lowered:
    """Lower the input of a linear layer (``conv`` or ``dense``) into its GEMM operand."""
    if layer.op == "dense":
        return Lowered(np.ascontiguousarray(x, dtype=DTYPE).reshape(-1, 1), (), ())
    if layer.op != "conv":
        raise ValueError(f"layer {layer.name!r} ({layer.op}) is not linear")
    nd = x.ndim - 1
    return im2col(np.asarray(x, dtype=DTYPE), _attr_list(layer, "kernel", nd, 1),
                  _attr_list(layer, "stride", nd, 1), _attr_list(layer, "padding", nd, 0))


def gemm(W: np.ndarray, b: np.ndarray | None, X: np.ndarray) -> np.ndarray:
    """``W @ X + b[:, None]``: the one GEMM a worker runs for its row block."""
    Y = W @ X
    if b is not None:
        Y += b[:, None]
    return Y


def linear_forward(layer: Layer, W: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Full linear layer on one process: lower, one GEMM, finish."""
    lo = lower(layer, x)
    return lo.finish(gemm(W, b, lo.X))


# ---------------------------------------------------------------- nonlinear ops

def _windows(x, kernel, stride, padding, fill):
    """Yield the strided view of ``x`` for each window offset (pooling without Python pixel loops)."""
    nd = x.ndim - 1
    spatial = x.shape[1:]
    out = tuple(_out_extent(spatial[i], kernel[i], stride[i], padding[i]) for i in range(nd))
    if any(padding):
        xp = np.full((x.shape[0],) + tuple(spatial[i] + 2 * padding[i] for i in range(nd)), fill, dtype=x.dtype)
        xp[(slice(None),) + tuple(slice(padding[i], padding[i] + spatial[i]) for i in range(nd))] = x
    else:
        xp = x
    for offset in product(*(range(k) for k in kernel)):
        yield xp[(slice(None),) + tuple(slice(offset[i], offset[i] + stride[i] * (out[i] - 1) + 1, stride[i])
                                        for i in range(nd))]


def _pool_params(layer, x):
    nd = x.ndim - 1
    kernel = _attr_list(layer, "kernel", nd, 1)
    return kernel, _attr_list(layer, "stride", nd, kernel), _attr_list(layer, "padding", nd, 0)


def maxpool(layer: Layer, x: np.ndarray) -> np.ndarray:
    kernel, stride, padding = _pool_params(layer, x)
    out = None
    for view in _windows(x, kernel, stride, padding, -np.inf):
        out = view.copy() if out is None else np.maximum(out, view, out=out)
    return out


def avgpool(layer: Layer, x: np.ndarray) -> np.ndarray:
    kernel, stride, padding = _pool_params(layer, x)
    total = None
    for view in _windows(x, kernel, stride, padding, 0):
        total = view.astype(DTYPE, copy=True) if total is None else np.add(total, view, out=total)
    if any(padding) and not layer.attrs.get("count_include_pad", False):
        ones = np.ones((1,) + x.shape[1:], dtype=DTYPE)
        count = sum(v for v in _windows(ones, kernel, stride, padding, 0))
        return total / count
    return total / DTYPE(math.prod(kernel))


def lrn(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Local response normalisation across channels (as in AlexNet, ONNX LRN and torch)."""
    size, a = layer.attrs.get("size", 5), layer.attrs
    sq = np.square(x, dtype=np.float64)
    csum = np.concatenate([np.zeros((1,) + x.shape[1:]), np.cumsum(sq, axis=0)])
    C = x.shape[0]
    lo = np.clip(np.arange(C) - size // 2, 0, C)
    hi = np.clip(np.arange(C) + (size - 1) // 2 + 1, 0, C)
    window = csum[hi] - csum[lo]
    div = (a.get("k", 2.0) + a.get("alpha", 1e-4) / size * window) ** a.get("beta", 0.75)
    return (x / div).astype(DTYPE)


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=0, keepdims=True)


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
        return x.reshape(x.shape[0], -1).mean(axis=1, dtype=np.float64).astype(DTYPE)
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
    raise ValueError(f"layer {layer.name!r}: no kernel for op {op!r}")


# ---------------------------------------------------------------- weights and reference forward

def layer_weights(model: Model, name: str, seed: int = 0) -> tuple:
    """Deterministic He-initialised ``(W, b)`` of one linear layer, independent of the other layers."""
    rows, cols = model.weight_shapes()[name]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    W = rng.standard_normal((rows, cols), dtype=DTYPE) * DTYPE(math.sqrt(2.0 / cols))
    b = rng.standard_normal(rows, dtype=DTYPE) * DTYPE(0.01)
    return W, b


def init_weights(model: Model, seed: int = 0) -> dict:
    """``{layer: (W, b)}`` for every linear layer; seeded so every model runs without a download."""
    return {layer.name: layer_weights(model, layer.name, seed) for layer in model.linear_layers}


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
    return np.ascontiguousarray(x, dtype=DTYPE)


def default_input(model: Model, seed: int = 0) -> np.ndarray:
    """The deterministic input used when none is given: uniform [0, 1) pixels."""
    return np.random.default_rng(seed).random(model.input_shape, dtype=DTYPE)


def forward(model: Model, weights: dict, x, return_all: bool = False):
    """Serial reference forward of ``model`` on one process (batch 1).

    Returns the output activation, or with ``return_all`` a dict of every
    layer's output (plus ``"input"``).
    """
    acts = {"input": check_input(model, x)}
    for layer in model.layers:
        ins = [acts[i] for i in layer.inputs]
        if layer.is_linear:
            W, b = weights[layer.name]
            acts[layer.name] = linear_forward(layer, W, b, ins[0])
        else:
            acts[layer.name] = nonlinear(layer, ins)
    return acts if return_all else acts[model.output]
