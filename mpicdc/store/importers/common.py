"""Shared machinery of the importers: errors, layout tracking, graph assembly, weight binding.

Pure (numpy only).  The format modules (:mod:`.onnx`, :mod:`.keras`,
:mod:`.torch_state`, :mod:`.npz`) translate a file into calls on
:class:`GraphState` (for formats that carry a graph) or into a list of
:class:`SourceWeight` handed to :func:`bind_weights` (for weights-only formats
paired with a zoo architecture).

Layout tracking
---------------
mpicdc activations are channel-first, ``(C, *spatial)``, and ``flatten`` flattens
in that order.  A framework tensor (batch axis dropped) is described by a
:class:`Value`: the mpicdc layer that computes it plus how the framework's view
differs from the mpicdc activation:

* a *spatial* value has ``perm``: ``framework = mpicdc_activation.transpose(perm)``
  (identity for NCHW graphs, ``(1, 2, 0)`` for an NHWC tensor);
* a *flat* value (the mpicdc activation is 1-D) has ``index``:
  ``framework.reshape(-1)[j] == mpicdc_activation[index[j]]`` (``None`` when
  the orders agree).  A flatten of an NHWC tensor produces such an index, and
  the next dense layer absorbs it by permuting its weight columns.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from mpicdc.core.models import LINEAR_OPS, Layer, Model, get_model, infer_shape, pad_pairs

log = logging.getLogger(__name__)

DTYPE = np.float32


class ModelImportError(ValueError):
    """A source file cannot be imported: wrong format, missing layers, shape mismatch.

    The message names the file and what is wrong.
    """


class UnsupportedOpError(ModelImportError):
    """The source graph uses an op (or an op variant) that mpicdc cannot represent.

    The message names the op, the node or layer, and the file.
    """


class WeightMismatchError(ModelImportError):
    """Weights do not fit the architecture: missing or extra layers, wrong shapes.

    The message names the layer, the expected and the found shapes.
    """


# ---------------------------------------------------------------- small helpers

def identity_perm(rank: int) -> tuple:
    return tuple(range(rank))


def channels_last_perm(rank: int) -> tuple:
    """``perm`` of a channels-last framework tensor over a channel-first activation of ``rank`` axes."""
    return tuple(range(1, rank)) + (0,)


def flatten_index(m_shape: tuple, perm: tuple) -> Optional[np.ndarray]:
    """Index such that ``act.transpose(perm).reshape(-1) == act.reshape(-1)[index]`` (None if identity)."""
    if tuple(perm) == identity_perm(len(perm)):
        return None
    size = math.prod(m_shape)
    return np.arange(size).reshape(m_shape).transpose(perm).reshape(-1)


def sanitize_name(text: str) -> str:
    """Layer names become HDF5 keys and CLI arguments: keep ``[A-Za-z0-9_.-]``."""
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(text)).strip("_.")
    return name


def natural_key(text: str) -> tuple:
    """Sort key putting ``conv2d_2`` before ``conv2d_10``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def numeric(array, what: str, source: str) -> np.ndarray:
    """``array`` as a numpy array; :class:`ModelImportError` unless its dtype is a number."""
    a = np.asarray(array)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ModelImportError(f"{source}: {what} has non-numeric dtype {a.dtype}")
    return a


def as_float32(array, what: str, source: str) -> np.ndarray:
    a = np.ascontiguousarray(numeric(array, what, source), dtype=DTYPE)
    if not np.all(np.isfinite(a)):
        raise ModelImportError(f"{source}: {what} contains NaN or infinite values")
    return a


def scaled_rows(W, scale, rows_per_step: int = 0) -> np.ndarray:
    """``(float64(W) * scale).astype(float32)``, C-ordered, computed a few rows at a time.

    ``scale`` is a scalar or one factor per row.  Bit-identical to the one-line expression but
    without its two full-size float64 temporaries (5x the layer's float32 bytes for a 400 MB
    dense layer).  A scale of exactly 1 returns ``W`` itself when it is already C-ordered
    float32 (``float64(x) * 1.0`` rounds back to ``x``), else a float32 copy.
    """
    W = np.asarray(W)
    scale = np.asarray(scale, np.float64)
    if scale.ndim == 0 and scale == 1.0:
        return np.ascontiguousarray(W, dtype=DTYPE)
    out = np.empty(W.shape, DTYPE)
    if scale.ndim:
        scale = scale.reshape((-1,) + (1,) * (W.ndim - 1))
    step = rows_per_step or max(1, (4 << 20) // max(1, 8 * math.prod(W.shape[1:])))
    for r0 in range(0, W.shape[0], step):
        s = scale if scale.ndim == 0 else scale[r0:r0 + step]
        out[r0:r0 + step] = W[r0:r0 + step].astype(np.float64) * s
    return out


def scatter_columns(W, index: np.ndarray) -> np.ndarray:
    """New C-ordered float32 ``out`` with ``out[:, index] = W``, a few rows at a time.

    In one statement numpy first copies a transposed ``W`` (a Keras dense kernel) to a temporary,
    a third full-size array; by rows the temporaries stay small.
    """
    out = np.empty(W.shape, DTYPE)
    step = max(1, (4 << 20) // max(1, 4 * W.shape[1]))
    for r0 in range(0, W.shape[0], step):
        out[r0:r0 + step, index] = W[r0:r0 + step]
    return out


def resolve_model(model, source: str, fmt: str) -> Model:
    """Turn a zoo name or a :class:`Model` into a Model; ``None`` is an error naming the format."""
    if model is None:
        raise ModelImportError(
            f"{source}: a {fmt} file holds weights only; pass the architecture as "
            f"model_name (a zoo model name or a mpicdc Model)")
    if isinstance(model, Model):
        return model
    if isinstance(model, str):
        return get_model(model)
    raise TypeError(f"model must be a zoo model name or a mpicdc Model, got {type(model).__name__}")


# ---------------------------------------------------------------- values and graph assembly

@dataclass(frozen=True)
class Value:
    """A framework tensor in terms of an mpicdc layer output (see the module docstring)."""

    layer: str                       # mpicdc layer name, or "input"
    shape: tuple                     # framework shape without the batch axis
    perm: Optional[tuple] = None     # spatial values: framework = act.transpose(perm)
    index: Optional[np.ndarray] = None   # flat values: framework_flat[j] = act[index[j]]
    fresh: bool = False              # raw output of a linear layer (bias / BN may fold into it)

    @property
    def is_flat(self) -> bool:
        return self.perm is None

    def stale(self) -> "Value":
        return replace(self, fresh=False) if self.fresh else self


class GraphState:
    """Accumulates mpicdc layers and weights while a format module walks a source graph."""

    def __init__(self, source: str, name: str):
        self.source = source
        self.name = sanitize_name(name) or "imported"
        self.layers: list = []
        self.weights: dict = {}
        self.shapes: dict = {}
        self.notes: list = []
        self._count: dict = {}

    # ------------------------------------------------------------ input
    def set_input(self, m_shape: tuple, perm: Optional[tuple]) -> Value:
        """Declare the model input (channel-first ``m_shape``) and return its framework view."""
        m_shape = tuple(int(d) for d in m_shape)
        if not m_shape or any(d < 1 for d in m_shape):
            raise ModelImportError(f"{self.source}: input shape {m_shape} is not a fixed positive shape")
        self.shapes["input"] = m_shape
        if len(m_shape) == 1:
            return Value("input", m_shape)
        perm = identity_perm(len(m_shape)) if perm is None else tuple(perm)
        if perm != identity_perm(len(perm)):
            self.notes.append(f"input is channel-first: framework input = x.transpose{perm} of mpicdc input x")
        return Value("input", tuple(m_shape[p] for p in perm), perm)

    # ------------------------------------------------------------ layers
    def unique(self, hint: str, op: str) -> str:
        base = sanitize_name(hint) if hint else ""
        if not base or base == "input":
            self._count[op] = self._count.get(op, 0) + 1
            base = f"{op}{self._count[op]}"
        name, i = base, 1
        while name in self.shapes:
            i += 1
            name = f"{base}_{i}"
        return name

    def add(self, op: str, inputs: list, hint: str = "", **attrs) -> str:
        name = self.unique(hint, op)
        layer = Layer(name, op, tuple(inputs), attrs)
        try:
            shape = infer_shape(layer, [self.shapes[i] for i in inputs])
        except ValueError as exc:
            raise ModelImportError(f"{self.source}: {exc}") from None
        self.layers.append(layer)
        self.shapes[name] = shape
        return name

    def add_linear(self, op: str, inputs: list, hint: str, W: np.ndarray, b: Optional[np.ndarray],
                   **attrs) -> str:
        name = self.add(op, inputs, hint, **attrs)
        W = np.ascontiguousarray(W, dtype=DTYPE)
        b = np.zeros(W.shape[0], DTYPE) if b is None else np.ascontiguousarray(np.reshape(b, -1), dtype=DTYPE)
        if b.shape != (W.shape[0],):
            raise WeightMismatchError(f"{self.source}: layer {name!r}: bias has {b.size} entries, "
                                      f"expected {W.shape[0]} (one per output channel)")
        self.weights[name] = (W, b)
        return name

    def op_of(self, name: str) -> str:
        for layer in reversed(self.layers):
            if layer.name == name:
                return layer.op
        return "input"

    # ------------------------------------------------------------ value-level ops
    def spatial(self, layer: str, perm: tuple, fresh: bool = False) -> Value:
        m = self.shapes[layer]
        return Value(layer, tuple(m[p] for p in perm), tuple(perm), None, fresh)

    def require_spatial(self, v: Value, perm: tuple, what: str) -> None:
        if v.is_flat:
            raise UnsupportedOpError(f"{self.source}: {what} needs a (channels, *spatial) tensor but its input "
                                     f"is flat with shape {v.shape}")
        if tuple(v.perm) != tuple(perm):
            raise UnsupportedOpError(
                f"{self.source}: {what} reads its input in layout {tuple(v.perm)} (axes of the channel-first "
                f"activation) but mpicdc can only run it in layout {tuple(perm)}; insert no transposes between "
                f"spatial layers")

    def elementwise(self, op: str, v: Value, hint: str, **attrs) -> Value:
        """A shape-keeping op (relu, lrn-like) that runs in any layout."""
        name = self.add(op, [v.layer], hint, **attrs)
        return replace(v, layer=name, fresh=False)

    def channel_axis(self, v: Value, axis: int, what: str) -> None:
        """Check that framework ``axis`` (no batch) is the channel axis (or the only non-1 axis of a flat value)."""
        rank = len(v.shape)
        if not -rank <= axis < rank:
            raise UnsupportedOpError(f"{self.source}: {what}: axis {axis} out of range for shape {v.shape}")
        axis %= rank
        if v.is_flat:
            if any(d != 1 for i, d in enumerate(v.shape) if i != axis):
                raise UnsupportedOpError(f"{self.source}: {what}: axis {axis} of shape {v.shape} is not the "
                                         f"feature axis")
        elif v.perm[axis] != 0:
            raise UnsupportedOpError(f"{self.source}: {what}: axis {axis} of shape {v.shape} is not the "
                                     f"channel axis; mpicdc runs this op along channels only")

    def flatten(self, v: Value, hint: str, perm: Optional[tuple] = None) -> Value:
        """Flatten a framework tensor (in framework order, optionally after ``transpose(perm)`` of it)."""
        if v.is_flat:
            if perm is not None and perm != identity_perm(len(perm)) and \
                    sum(d != 1 for d in v.shape) > 1:
                raise UnsupportedOpError(f"{self.source}: {hint}: transposed flatten of shape {v.shape}")
            return Value(v.layer, (math.prod(v.shape),), None, v.index, v.fresh)
        total = tuple(v.perm) if perm is None else tuple(v.perm[p] for p in perm)
        name = self.add("flatten", [v.layer], hint)
        index = flatten_index(self.shapes[v.layer], total)
        return Value(name, (math.prod(v.shape),), None, index)

    def reshape(self, v: Value, new_shape: tuple, hint: str) -> Value:
        """Framework reshape (no batch axis): no-op, a flatten, or a reshape of a flat value."""
        new_shape = tuple(int(d) for d in new_shape)
        if math.prod(new_shape) != math.prod(v.shape):
            raise ModelImportError(f"{self.source}: {hint}: cannot reshape {v.shape} to {new_shape}")
        if new_shape == tuple(v.shape):
            return v
        if v.is_flat:
            return replace(v, shape=new_shape)
        if len([d for d in new_shape if d != 1]) <= 1:
            flat = self.flatten(v, hint)
            return replace(flat, shape=new_shape)
        raise UnsupportedOpError(f"{self.source}: {hint}: reshape from {v.shape} to {new_shape} is not a "
                                 f"flatten; mpicdc only supports flatten-like reshapes")

    def dense(self, v: Value, W_fw: np.ndarray, b: Optional[np.ndarray], hint: str) -> Value:
        """Dense layer ``y = W_fw @ framework_flat(x) + b`` (W_fw is (out, in))."""
        if not v.is_flat:
            if sum(d != 1 for d in v.shape) > 1 or v.perm != identity_perm(len(v.perm)):
                raise UnsupportedOpError(f"{self.source}: {hint}: a dense layer needs a flat input, got shape "
                                         f"{v.shape}; flatten first")
            v = self.flatten(v, hint + "_flatten")
        W_fw = np.asarray(W_fw, DTYPE)
        if W_fw.shape[1] != v.shape[0]:
            raise WeightMismatchError(f"{self.source}: {hint}: weight has {W_fw.shape[1]} input columns, "
                                      f"its input has {v.shape[0]} features")
        W = W_fw if v.index is None else scatter_columns(W_fw, v.index)
        name = self.add_linear("dense", [v.layer], hint, W, b, out=int(W_fw.shape[0]))
        return Value(name, (W_fw.shape[0],), None, None, True)

    def conv(self, v: Value, W_torch: np.ndarray, b, stride, padding, hint: str, perm: tuple,
             groups: int = 1) -> Value:
        """Convolution with a torch-layout weight ``(out, in / groups, *kernel)``; runs in layout ``perm``.

        ``padding`` holds one int or one ``[begin, end]`` pair per spatial axis.
        """
        v = self.unflatten(v)
        self.require_spatial(v, perm, hint)
        cin = self.shapes[v.layer][0]
        if W_torch.ndim != len(self.shapes[v.layer]) + 1 or W_torch.shape[1] * groups != cin:
            raise WeightMismatchError(f"{self.source}: {hint}: kernel of shape {W_torch.shape} (groups={groups}) "
                                      f"does not fit an input of shape {self.shapes[v.layer]} (channel-first)")
        W = W_torch.reshape(W_torch.shape[0], -1)
        attrs = {} if groups == 1 else {"groups": int(groups)}
        name = self.add_linear("conv", [v.layer], hint, W, b, out=int(W_torch.shape[0]),
                               kernel=[int(k) for k in W_torch.shape[2:]], stride=[int(s) for s in stride],
                               padding=[int(p) if np.ndim(p) == 0 else [int(e) for e in p] for p in padding],
                               **attrs)
        return self.spatial(name, perm, fresh=True)

    def layer(self, name: str) -> Optional[Layer]:
        return next((layer for layer in reversed(self.layers) if layer.name == name), None)

    def fold_pad(self, v: Value, pads: list, ok_values: tuple) -> tuple:
        """``(input, pads)`` with a constant ``pad`` layer absorbed into a window op's ``pads``.

        Only when ``v`` is a fresh (read once) ``pad`` layer of spatial axes with a value in
        ``ok_values`` (0 for a conv, -inf for a max pool); else ``(v, pads)`` unchanged.
        """
        src = self.layer(v.layer)
        if src is None or src.op != "pad" or not v.fresh or src.attrs["value"] not in ok_values:
            return v, pads
        pp = pad_pairs(src.attrs["pads"], len(self.shapes[v.layer]), src.name)
        if pp[0] != (0, 0):
            return v, pads
        mine = pad_pairs(pads, len(pads), src.name)
        merged = [(b0 + b1, e0 + e1) for (b0, e0), (b1, e1) in zip(mine, pp[1:])]
        return self.spatial(src.inputs[0], v.perm), [b if b == e else [b, e] for b, e in merged]

    def pad(self, v: Value, begin: list, end: list, value: float, hint: str, fresh: bool) -> Value:
        """Constant padding of framework axes (no batch): ``begin[i]``/``end[i]`` cells on axis ``i``."""
        if v.is_flat:
            raise UnsupportedOpError(f"{self.source}: {hint}: padding a flat tensor of shape {v.shape} is not "
                                     f"supported")
        m_pads = [None] * len(v.shape)
        for i, p in enumerate(v.perm):   # framework axis i is mpicdc axis p
            m_pads[p] = int(begin[i]) if begin[i] == end[i] else [int(begin[i]), int(end[i])]
        name = self.add("pad", [v.layer], hint, pads=m_pads, value=float(value))
        return self.spatial(name, v.perm, fresh=fresh)

    def unflatten(self, v: Value) -> Value:
        """A flat ``(C, 1, ..., 1)`` value computed by a global pool as a spatial ``(C, 1, ..., 1)`` value.

        Global pools flatten by default (``gap`` feeding ``dense``); a 1x1 conv on their output
        (DenseNet / SqueezeNet classifiers, squeeze-and-excitation) needs the pool with
        ``keepdims``: it is added beside the flat one (which is pruned if nothing else reads it).
        """
        src = self.layer(v.layer) if v.is_flat else None
        if src is None or src.op not in ("gap", "gmp") or src.attrs.get("keepdims") or len(v.shape) < 2 or \
                any(d != 1 for d in v.shape[1:]) or v.index is not None:
            return v
        name = self.add(src.op, list(src.inputs), src.name + "_keepdims", keepdims=True)
        return self.spatial(name, identity_perm(len(v.shape)))

    def affine(self, v: Value, scale: np.ndarray, shift: np.ndarray, hint: str, can_fold: bool) -> Value:
        """Per-channel ``x * scale + shift`` (scale/shift indexed by framework channel / feature).

        Folded into the preceding conv/dense when ``v`` is its fresh output and ``can_fold``;
        otherwise a ``batchnorm`` layer.
        """
        scale = np.asarray(scale, np.float64).reshape(-1)
        shift = np.asarray(shift, np.float64).reshape(-1)
        channels = self.shapes[v.layer][0] if not v.is_flat else math.prod(v.shape)
        if scale.size == 1:
            scale = np.full(channels, scale[0])
        if shift.size == 1:
            shift = np.full(channels, shift[0])
        if scale.size != channels or shift.size != channels:
            raise WeightMismatchError(f"{self.source}: {hint}: per-channel parameters have {scale.size}/"
                                      f"{shift.size} entries, the tensor has {channels} channels")
        if v.is_flat and v.index is not None:  # framework feature j is activation entry index[j]
            s, t = np.empty_like(scale), np.empty_like(shift)
            s[v.index], t[v.index] = scale, shift
            scale, shift = s, t
        if can_fold and v.fresh and v.layer in self.weights:
            W, b = self.weights[v.layer]
            self.weights[v.layer] = (scaled_rows(W, scale), (b.astype(np.float64) * scale + shift).astype(DTYPE))
            return v
        name = self.add("batchnorm", [v.layer], hint, scale=[float(x) for x in scale],
                        shift=[float(x) for x in shift])
        return replace(v, layer=name, fresh=False)

    # ------------------------------------------------------------ finish
    def build(self, out: Value, description: str) -> tuple:
        """Prune layers that do not feed ``out`` and return ``(Model, weights)``."""
        if out.layer == "input":
            raise ModelImportError(f"{self.source}: the graph output is its input; nothing to import")
        if out.is_flat and out.index is not None:
            raise UnsupportedOpError(
                f"{self.source}: the graph output is a flatten in non-channel-first order; mpicdc has no "
                f"gather op to reproduce it (end the graph with a dense layer or flatten channel-first)")
        if not out.is_flat and tuple(out.perm) != identity_perm(len(out.perm)):
            self.notes.append(f"output is channel-first: framework output = y.transpose{tuple(out.perm)} of mpicdc output y")
        needed, stack = set(), [out.layer]
        by_name = {layer.name: layer for layer in self.layers}
        while stack:
            name = stack.pop()
            if name in needed or name == "input":
                continue
            needed.add(name)
            stack.extend(by_name[name].inputs)
        layers = [layer for layer in self.layers if layer.name in needed]
        dropped = [layer.name for layer in self.layers if layer.name not in needed]
        if dropped:
            log.info("%s: dropping %d layers that do not feed the output: %s", self.source, len(dropped), dropped)
        if layers[-1].name != out.layer:  # pragma: no cover - creation order is topological
            raise ModelImportError(f"{self.source}: output layer {out.layer!r} is not last")
        desc = "; ".join([description] + self.notes)
        model = Model(self.name, self.shapes["input"], tuple(layers), desc)
        weights = {name: self.weights[name] for name in (layer.name for layer in layers) if name in self.weights}
        check_weights(model, weights, self.source)
        return model, weights


# ---------------------------------------------------------------- weights checking and binding

def check_weights(model: Model, weights: dict, source: str) -> dict:
    """Check that ``weights`` has a float32 ``(W, b)`` of the right shape for every linear layer."""
    expected = model.weight_shapes()
    missing = [name for name in expected if name not in weights]
    if missing:
        raise WeightMismatchError(f"{source}: no weights for layers {missing} of model {model.name!r}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise WeightMismatchError(f"{source}: weights for layers {extra} that model {model.name!r} "
                                  f"does not have as linear layers")
    for name, shape in expected.items():
        W, b = weights[name]
        if tuple(W.shape) != tuple(shape):
            raise WeightMismatchError(f"{source}: layer {name!r}: expected weight of shape {tuple(shape)}, "
                                      f"found {tuple(W.shape)}")
        if tuple(b.shape) != (shape[0],):
            raise WeightMismatchError(f"{source}: layer {name!r}: expected bias of shape {(shape[0],)}, "
                                      f"found {tuple(b.shape)}")
        if W.dtype != DTYPE or b.dtype != DTYPE:
            raise WeightMismatchError(f"{source}: layer {name!r}: weights must be float32, "
                                      f"found {W.dtype}/{b.dtype}")
    return weights


@dataclass
class SourceWeight:
    """One weight layer of a weights-only file, converted to torch layout.

    ``weight`` is ``(out, in, *kernel)`` for a convolution, ``(out, in)`` for a dense layer.
    ``channels_last_flatten`` marks a dense weight whose columns follow a channels-last flatten
    (Keras): binding permutes them when the zoo layer reads a flattened spatial tensor.
    """

    name: str
    weight: np.ndarray
    bias: Optional[np.ndarray]
    channels_last_flatten: bool = False

    @property
    def kind(self) -> str:
        return "dense" if self.weight.ndim == 2 else "conv"


def _flatten_source_shape(model: Model, layer_name: str) -> Optional[tuple]:
    """Channel-first shape flattened on the way into dense ``layer_name`` (None if the input was never spatial)."""
    shapes = model.shapes()
    by_name = {layer.name: layer for layer in model.layers}
    name = model.layer(layer_name).inputs[0]
    while name != "input":
        layer = by_name[name]
        if layer.op == "flatten":
            src = shapes[layer.inputs[0]]
            return tuple(src) if len(src) > 1 else None
        if layer.op in ("relu", "identity", "batchnorm", "softmax") and len(layer.inputs) == 1:
            name = layer.inputs[0]
            continue
        return None
    return None


def bind_weights(model: Model, entries: list, source: str, *, consume: bool = False) -> dict:
    """Map weights-only ``entries`` onto the linear layers of ``model``.

    Rule (documented in docs/importers.md):

    1. **by name** when every linear layer of ``model`` has an entry of the same name (extra
       weight layers in the file are then an error);
    2. otherwise **in order, per kind**: the file's convolution weights, in file order, go onto
       the model's conv layers in graph order, and the file's dense weights onto its dense
       layers.  The counts must agree.

    Every shape is checked (the full kernel, not only the GEMM shape); errors name the
    layer, the expected and the found shape.  ``consume`` drops each entry's arrays once its
    layer is converted (the entries end up empty), so that the file's weights and the bound
    ones are never both whole in memory.
    """
    linear = model.linear_layers
    by_entry = {e.name: e for e in entries}
    if len(by_entry) != len(entries):
        dups = sorted({e.name for e in entries if sum(x.name == e.name for x in entries) > 1})
        raise WeightMismatchError(f"{source}: weight layers {dups} appear more than once")
    if linear and all(layer.name in by_entry for layer in linear):
        extra = [e.name for e in entries if e.name not in {layer.name for layer in linear}]
        if extra:
            raise WeightMismatchError(f"{source}: weight layers {extra} match no linear layer of model "
                                      f"{model.name!r} (linear layers: {[layer.name for layer in linear]})")
        pairs = [(layer, by_entry[layer.name]) for layer in linear]
    else:
        pairs = []
        for kind in ("conv", "dense"):
            layers = [layer for layer in linear if layer.op == kind]
            found = [e for e in entries if e.kind == kind]
            if len(layers) != len(found):
                raise WeightMismatchError(
                    f"{source}: model {model.name!r} has {len(layers)} {kind} layers "
                    f"{[layer.name for layer in layers]} but the file has {len(found)} {kind} weights "
                    f"{[e.name for e in found]} (names do not match, so layers are matched in order)")
            pairs.extend(zip(layers, found))
        order = {layer.name: i for i, layer in enumerate(linear)}
        pairs.sort(key=lambda p: order[p[0].name])
    shapes = model.shapes()
    weights = {}
    for layer, e in pairs:
        in_shape = shapes[layer.inputs[0]]
        out = layer.attrs["out"]
        where = f"{source}: layer {layer.name!r} (from {e.name!r})"
        if layer.op == "conv":
            expected = (out, in_shape[0]) + tuple(layer.attrs["kernel"])
        else:
            expected = (out, math.prod(in_shape))
        if e.kind != layer.op:
            raise WeightMismatchError(f"{where}: is a {layer.op} layer expecting weight shape {expected}, "
                                      f"found a {e.kind} weight of shape {tuple(e.weight.shape)}")
        if tuple(e.weight.shape) != expected:
            raise WeightMismatchError(f"{where}: expected weight of shape {expected}, "
                                      f"found {tuple(e.weight.shape)}")
        src = _flatten_source_shape(model, layer.name) if layer.op == "dense" and e.channels_last_flatten else None
        if src is not None:     # permute straight from the source layout: one converted copy
            index = flatten_index(src, channels_last_perm(len(src)))
            W = as_float32(scatter_columns(numeric(e.weight, f"weight {e.name!r}", source), index),
                           f"weight {e.name!r}", source)
        else:
            W = as_float32(e.weight, f"weight {e.name!r}", source).reshape(out, -1)
        if e.bias is None:
            b = np.zeros(out, DTYPE)
        else:
            b = as_float32(e.bias, f"bias {e.name!r}", source).reshape(-1)
            if b.shape != (out,):
                raise WeightMismatchError(f"{where}: expected bias of shape {(out,)}, found {tuple(e.bias.shape)}")
        weights[layer.name] = (np.ascontiguousarray(W), np.ascontiguousarray(b))
        if consume:
            e.weight = e.bias = None
    return check_weights(model, weights, source)


def rebind(src_model: Model, src_weights: dict, target, source: str) -> tuple:
    """Put the weights of an imported graph onto a given architecture (e.g. the zoo's).

    The two graphs must have the same ops in the same order (``identity`` ignored) and the
    same weight shapes; layers are matched in order.
    """
    target = resolve_model(target, source, "graph")
    a = [layer for layer in src_model.layers if layer.op != "identity"]
    b = [layer for layer in target.layers if layer.op != "identity"]
    ops_a, ops_b = [layer.op for layer in a], [layer.op for layer in b]
    if ops_a != ops_b:
        i = next((k for k, (x, y) in enumerate(zip(ops_a, ops_b)) if x != y), min(len(ops_a), len(ops_b)))
        raise WeightMismatchError(
            f"{source}: the imported graph does not have the architecture of model {target.name!r}: "
            f"{len(ops_a)} vs {len(ops_b)} layers, first difference at position {i}: "
            f"{a[i].name if i < len(a) else '<end>'} ({ops_a[i] if i < len(a) else '-'}) vs "
            f"{b[i].name if i < len(b) else '<end>'} ({ops_b[i] if i < len(b) else '-'})")
    if tuple(src_model.input_shape) != tuple(target.input_shape):
        raise WeightMismatchError(f"{source}: input shape {tuple(src_model.input_shape)} differs from model "
                                  f"{target.name!r}'s {tuple(target.input_shape)}")
    for la, lb in zip(a, b):
        diff = _attr_difference(la, lb)
        if diff:
            raise WeightMismatchError(f"{source}: layer {la.name!r} ({la.op}) does not match layer {lb.name!r} "
                                      f"of model {target.name!r}: {diff}")
    weights = {}
    for la, lb in zip(a, b):
        if la.op in LINEAR_OPS:
            weights[lb.name] = src_weights[la.name]
    expected = target.weight_shapes()
    for la, lb in zip(a, b):
        if la.op in LINEAR_OPS and tuple(weights[lb.name][0].shape) != tuple(expected[lb.name]):
            raise WeightMismatchError(f"{source}: layer {lb.name!r} (from {la.name!r}): expected weight of shape "
                                      f"{tuple(expected[lb.name])}, found {tuple(weights[lb.name][0].shape)}")
    return target, check_weights(target, weights, source)


def _attr_difference(a: Layer, b: Layer) -> str:
    """Describe how two layers' attributes differ (``""`` when they compute the same thing)."""
    if len(a.inputs) != len(b.inputs):
        return f"{len(a.inputs)} vs {len(b.inputs)} inputs"
    ignore = {"out"} if a.op in LINEAR_OPS else set()
    if a.op == "avgpool" and not any(a.attrs.get("padding", [0]) or [0]) \
            and not any(b.attrs.get("padding", [0]) or [0]):
        ignore.add("count_include_pad")  # only matters where windows overlap padding
    for key in sorted((set(a.attrs) | set(b.attrs)) - ignore):
        x, y = a.attrs.get(key), b.attrs.get(key)
        if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
            same = x is not None and y is not None and len(x) == len(y) and \
                np.allclose(np.asarray(x, float), np.asarray(y, float), rtol=1e-6, atol=0)
        elif isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            same = math.isclose(x, y, rel_tol=1e-6)
        else:
            same = x == y
        if not same:
            return f"attribute {key!r}: {x!r} vs {y!r}"
    return ""
