"""Keras HDF5 files -> mpicdc model graph and GEMM weights, read with h5py alone (no keras import).

Local.  Three layouts:

* **full model** ``.h5`` (``model.save("m.h5")`` in Keras 2, or the legacy HDF5 format of
  Keras 3): the root attribute ``model_config`` holds the architecture as JSON (Sequential or
  functional; both the Keras 2 and the Keras 3 config dialects) and the group
  ``model_weights/<layer>`` holds each layer's arrays, listed by its ``weight_names`` attribute;
* **Keras 2 weights-only** ``.h5`` (``model.save_weights("m.h5")`` in Keras 2): root attribute
  ``layer_names`` and the same per-layer groups, no architecture;
* **Keras 3 weights** ``.weights.h5`` (``model.save_weights``): ``layers/<path>/vars/<i>``.

Weights-only files are paired with an mpicdc architecture (see :func:`mpicdc.store.importers.common.bind_weights`).
Keras is channels-last by default: kernels ``(*kernel, cin, cout)`` become the GEMM layout
``(cout, cin * prod(kernel))``, the model input becomes channel-first, and a Flatten of a
channels-last tensor is absorbed by permuting the next Dense layer's input columns.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

import numpy as np

from mpicdc.store.importers.common import (
    DTYPE,
    GraphState,
    ModelImportError,
    SourceWeight,
    UnsupportedOpError,
    Value,
    WeightMismatchError,
    bind_weights,
    channels_last_perm,
    identity_perm,
    natural_key,
    rebind,
    resolve_model,
)

log = logging.getLogger(__name__)

#: Keras layer classes the full-model importer understands.
SUPPORTED_LAYERS = ("InputLayer", "Conv1D", "Conv2D", "Conv3D", "Dense", "MaxPooling1D", "MaxPooling2D",
                    "MaxPooling3D", "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
                    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D", "Flatten",
                    "Activation", "ReLU", "Softmax", "BatchNormalization", "Concatenate", "Add", "Dropout",
                    "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
                    "GaussianNoise", "AlphaDropout", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D",
                    "SeparableConv2D", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D")
_PASSTHROUGH = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
                "GaussianNoise", "AlphaDropout")


def _open(path):
    import h5py
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no such Keras file: {source}")
    if not h5py.is_hdf5(source):
        raise ModelImportError(f"{source}: not an HDF5 file (Keras .h5 files are HDF5)")
    try:
        return h5py.File(source, "r"), source
    except OSError as exc:
        raise ModelImportError(f"{source}: cannot open as HDF5 ({exc})") from None


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value[()])
    return str(value)


def _names(attr) -> list:
    return [_text(x) for x in np.asarray(attr).reshape(-1)] if attr is not None else []


def file_kind(f) -> str:
    """``"model"``, ``"keras2-weights"``, ``"keras3-weights"`` or ``""`` for an open h5py file."""
    if "model_config" in f.attrs:
        return "model"
    if "layer_names" in f.attrs:
        return "keras2-weights"
    if "layers" in f and hasattr(f["layers"], "keys"):
        return "keras3-weights"
    return ""


def load_keras_h5(path, model=None, *, input_shape: Optional[tuple] = None) -> tuple:
    """Import a Keras HDF5 file as ``(Model, weights)``.  Local.

    A full-model file gives its own graph; with ``model`` (a zoo name or Model) the weights are
    put onto that architecture instead (same ops in the same order, shapes checked).  A
    weights-only file (Keras 2 ``.h5`` or Keras 3 ``.weights.h5``) needs ``model``.

    Parameters
    ----------
    path : the ``.h5`` file.
    model : architecture for weights-only files (optional for full models).
    input_shape : framework input shape without batch axis, when the config leaves it open.
    """
    f, source = _open(path)
    with f:
        kind = file_kind(f)
        if kind == "model":
            imported = _KerasConverter(f, source, input_shape).run()
            return rebind(*imported, model, source) if model is not None else imported
        if kind in ("keras2-weights", "keras3-weights"):
            target = resolve_model(model, source, "Keras weights-only")
            return target, _read_weights_only(f, source, target, kind, "channels_last")
    raise ModelImportError(f"{source}: HDF5 file is not a Keras model or weights file (no model_config or "
                           f"layer_names attribute, no layers group)")


def load_keras_weights(path, model, *, data_format: str = "channels_last") -> tuple:
    """Import a Keras 2 weights-only ``.h5`` or a Keras 3 ``.weights.h5`` onto architecture ``model``.

    ``data_format`` is the Keras model's: with ``"channels_last"`` (the Keras default) a dense
    layer that reads a flattened feature map gets its input columns permuted from HWC to CHW
    order.  Returns ``(Model, weights)``.  Local.
    """
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
    f, source = _open(path)
    with f:
        kind = file_kind(f)
        target = resolve_model(model, source, "Keras weights-only")
        if kind == "model":
            if "model_weights" not in f:
                raise ModelImportError(f"{source}: full-model file without a model_weights group")
            return target, _read_weights_only(f["model_weights"], source, target, "keras2-weights", data_format)
        if not kind:
            raise ModelImportError(f"{source}: HDF5 file is not a Keras weights file (no layer_names attribute, "
                                   f"no layers group)")
        return target, _read_weights_only(f, source, target, kind, data_format)


# ---------------------------------------------------------------- weights-only files

def _layer_arrays(group, layer: str, source: str) -> list:
    """``[(short_name, array)]`` of one layer in the Keras 2 layout (``weight_names`` attribute)."""
    g = group[layer]
    out = []
    for wn in _names(g.attrs.get("weight_names")):
        if wn not in g:
            raise ModelImportError(f"{source}: layer {layer!r} lists weight {wn!r} but the file has no such "
                                   f"dataset")
        out.append((wn.split("/")[-1].split(":")[0], np.asarray(g[wn])))
    return out


def _source_weight(name: str, arrays: list, source: str, channels_last: bool) -> Optional[SourceWeight]:
    """Turn one Keras layer's arrays (kernel first) into a torch-layout :class:`SourceWeight`."""
    if not arrays:
        return None
    named = dict(arrays)
    if {"gamma", "beta", "moving_mean", "moving_variance"} & set(named) or \
            (arrays[0][1].ndim == 1 and len(arrays) >= 2):
        raise UnsupportedOpError(
            f"{source}: layer {name!r} holds batch-normalisation weights; mpicdc architectures fold batch norm "
            f"into the convolution, so import the full model .h5 (or ONNX) instead of weights only")
    if "kernel" in named:
        kernel, bias = named["kernel"], named.get("bias")
        extra = set(named) - {"kernel", "bias"}
    else:  # Keras 3 vars/0, vars/1
        kernel = arrays[0][1]
        bias = arrays[1][1] if len(arrays) > 1 else None
        extra = list(named)[2:]
    if kernel.ndim < 2 or extra or (bias is not None and bias.ndim != 1):
        raise UnsupportedOpError(f"{source}: layer {name!r} has weights {[(n, a.shape) for n, a in arrays]} that "
                                 f"are neither a convolution nor a dense layer")
    nd = kernel.ndim - 2
    if nd == 0:
        W = kernel.T
    else:
        W = kernel.transpose((nd + 1, nd) + tuple(range(nd)))
    return SourceWeight(name, W, bias, channels_last_flatten=channels_last and nd == 0)


def _read_weights_only(f, source: str, model, kind: str, data_format: str) -> dict:
    channels_last = data_format == "channels_last"
    entries = []
    if kind == "keras2-weights":
        for layer in _names(f.attrs.get("layer_names")):
            if layer not in f:
                raise ModelImportError(f"{source}: layer_names lists {layer!r} but the file has no such group")
            e = _source_weight(layer, _layer_arrays(f, layer, source), source, channels_last)
            if e is not None:
                entries.append(e)
    else:
        layers = f["layers"]
        for path in sorted(layers.keys(), key=natural_key):
            g = layers[path]
            if "layers" in g:
                raise UnsupportedOpError(f"{source}: layer {path!r} is a nested model; only flat models are "
                                         f"supported")
            vars_ = g.get("vars")
            if vars_ is None or len(vars_) == 0:
                continue
            name = _text(vars_.attrs.get("name", path))
            arrays = [(str(k), np.asarray(vars_[k])) for k in sorted(vars_.keys(), key=int)]
            e = _source_weight(name, arrays, source, channels_last)
            if e is not None:
                entries.append(e)
    if not entries:
        raise ModelImportError(f"{source}: no layer with weights found")
    return bind_weights(model, entries, source, consume=True)


# ---------------------------------------------------------------- full models

def _history_names(obj) -> list:
    """Layer names of the Keras 3 ``__keras_tensor__`` references inside a node's args, in order."""
    out = []
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            out.append(obj["config"]["keras_history"][0])
        else:
            for v in obj.values():
                out.extend(_history_names(v))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out.extend(_history_names(v))
    return out


def _inbound(layer_cfg: dict, source: str) -> list:
    nodes = layer_cfg.get("inbound_nodes") or []
    name = layer_cfg.get("name") or layer_cfg["config"].get("name")
    if len(nodes) > 1:
        raise UnsupportedOpError(f"{source}: layer {name!r} is called {len(nodes)} times (shared layer); "
                                 f"not supported")
    if not nodes:
        return []
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        return _history_names(node.get("args", []))
    return [entry[0] for entry in node]  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]


def _refs(value) -> list:
    """Normalise ``input_layers`` / ``output_layers`` to a list of layer names."""
    if value and isinstance(value[0], str):
        value = [value]
    return [v[0] for v in value]


def _parse_config(cfg: dict, source: str):
    """``(layers, input_name, output_name)`` with layers ``[(class, name, config, inbound)]``."""
    cls, c = cfg.get("class_name"), cfg.get("config", {})
    if cls == "Sequential":
        layers, prev = [], None
        for entry in c.get("layers", []):
            lc = entry.get("config", {})
            name = lc.get("name") or entry.get("name")
            if entry["class_name"] == "InputLayer":
                layers.append(("InputLayer", name, lc, []))
                prev = name
                continue
            if prev is None:
                shape = lc.get("batch_input_shape") or lc.get("batch_shape") or c.get("build_input_shape")
                if shape is None:
                    raise ModelImportError(f"{source}: Sequential model without an input shape")
                prev = "input_layer" if name != "input_layer" else "input_layer_0"
                layers.append(("InputLayer", prev, {"batch_shape": shape}, []))
            layers.append((entry["class_name"], name, lc, [prev]))
            prev = name
        if prev is None or len(layers) < 2:
            raise ModelImportError(f"{source}: Sequential model without layers")
        return layers, layers[0][1], prev
    if cls in ("Functional", "Model"):
        layers = [(entry["class_name"], entry.get("name") or entry["config"]["name"], entry.get("config", {}),
                   _inbound(entry, source)) for entry in c.get("layers", [])]
        inputs, outputs = _refs(c.get("input_layers", [])), _refs(c.get("output_layers", []))
        if len(inputs) != 1 or len(outputs) != 1:
            raise UnsupportedOpError(f"{source}: model has inputs {inputs} and outputs {outputs}; mpicdc models "
                                     f"have exactly one of each")
        return layers, inputs[0], outputs[0]
    raise UnsupportedOpError(f"{source}: top-level model class {cls!r} is not supported (Sequential or "
                             f"functional only)")


def _tuple(value, nd: int) -> list:
    if isinstance(value, int):
        return [value] * nd
    return [int(v) for v in value]


class _KerasConverter:
    def __init__(self, f, source: str, input_shape):
        self.f = f
        self.source = source
        self.input_shape = input_shape
        try:
            self.cfg = json.loads(_text(f.attrs["model_config"]))
        except (ValueError, TypeError) as exc:
            raise ModelImportError(f"{source}: model_config is not valid JSON ({exc})") from None
        self.keras_version = _text(f.attrs.get("keras_version", "unknown"))
        self.weights_group = f["model_weights"] if "model_weights" in f else f
        self.state = GraphState(source, self.cfg.get("config", {}).get("name") or
                                os.path.splitext(os.path.basename(source))[0])
        self.values: dict = {}
        self.uses: dict = {}

    def where(self, cls: str, name: str) -> str:
        return f"{self.source}: layer {name!r} ({cls})"

    def unsupported(self, cls, name, why):
        return UnsupportedOpError(f"{self.where(cls, name)}: {why}")

    def value(self, name: str) -> Value:
        v = self.values[name]
        return v if self.uses.get(name, 0) == 1 else v.stale()

    def arrays(self, name: str) -> dict:
        if name not in self.weights_group:
            raise WeightMismatchError(f"{self.source}: no weights group for layer {name!r}")
        return dict(_layer_arrays(self.weights_group, name, self.source))

    def perm(self, c: dict, rank: int) -> tuple:
        fmt = c.get("data_format") or "channels_last"
        if fmt not in ("channels_last", "channels_first"):
            raise ModelImportError(f"{self.source}: unknown data_format {fmt!r}")
        return channels_last_perm(rank) if fmt == "channels_last" else identity_perm(rank)

    def run(self) -> tuple:
        layers, input_name, output_name = _parse_config(self.cfg, self.source)
        for _, _, _, inbound in layers:
            for src in inbound:
                self.uses[src] = self.uses.get(src, 0) + 1
        self.uses[output_name] = self.uses.get(output_name, 0) + 1
        known = {name for _, name, _, _ in layers}
        for cls, name, c, inbound in layers:
            missing = [i for i in inbound if i not in known]
            if missing:
                raise ModelImportError(f"{self.where(cls, name)}: reads unknown layers {missing}")
            if cls == "InputLayer":
                if name != input_name:
                    raise UnsupportedOpError(f"{self.where(cls, name)}: second model input")
                self.values[name] = self._input(c, layers)
                continue
            if cls not in SUPPORTED_LAYERS:
                raise UnsupportedOpError(f"{self.where(cls, name)}: Keras layer class {cls!r} is not supported "
                                         f"(supported: {', '.join(SUPPORTED_LAYERS)})")
            ins = [self.value(i) for i in inbound]
            if not ins:
                raise ModelImportError(f"{self.where(cls, name)}: layer has no input")
            self.values[name] = self._layer(cls, name, c, ins)
        if output_name not in self.values:
            raise ModelImportError(f"{self.source}: output layer {output_name!r} not found")
        return self.state.build(self.values[output_name],
                                f"imported from Keras {self.keras_version} HDF5 {os.path.basename(self.source)}")

    def _input(self, c: dict, layers: list) -> Value:
        shape = c.get("batch_shape") or c.get("batch_input_shape")
        if shape is None:
            raise ModelImportError(f"{self.source}: InputLayer without batch_shape")
        fw = list(shape[1:])
        if self.input_shape is not None:
            fw = [int(d) for d in self.input_shape]
            if len(fw) != len(shape) - 1:
                raise ModelImportError(f"{self.source}: input_shape {tuple(fw)} does not fit {tuple(shape)}")
        if any(d is None for d in fw):
            raise ModelImportError(f"{self.source}: input shape {tuple(shape)} has open dimensions; pass "
                                   f"input_shape=(...) without the batch axis")
        if len(fw) == 1:
            return self.state.set_input(tuple(fw), None)
        fmt = next((lc.get("data_format") for _, _, lc, _ in layers if lc.get("data_format")), "channels_last")
        perm = channels_last_perm(len(fw)) if fmt == "channels_last" else identity_perm(len(fw))
        m_shape = tuple(fw[perm.index(i)] for i in range(len(fw)))
        return self.state.set_input(m_shape, perm)

    # ------------------------------------------------------------ layers
    def _layer(self, cls: str, name: str, c: dict, ins: list) -> Value:
        st = self.state
        v = ins[0]
        if cls.startswith("Conv"):
            return self._activation(self._conv(cls, name, c, v), c.get("activation"), cls, name)
        if cls.startswith(("DepthwiseConv", "SeparableConv")):
            return self._activation(self._depthwise(cls, name, c, v), c.get("activation"), cls, name)
        if cls.startswith("ZeroPadding"):
            return self._zero_padding(cls, name, c, v)
        if cls == "Dense":
            w = self.arrays(name)
            if "kernel" not in w:
                raise WeightMismatchError(f"{self.where(cls, name)}: no kernel in the file")
            bias = w.get("bias") if c.get("use_bias", True) else None
            return self._activation(st.dense(v, np.asarray(w["kernel"], DTYPE).T, bias, name),
                                    c.get("activation"), cls, name)
        if cls.startswith(("MaxPooling", "AveragePooling")):
            return self._pool(cls, name, c, v)
        if cls.startswith("GlobalAveragePooling"):
            perm = self.perm(c, len(v.shape))
            st.require_spatial(v, perm, self.where(cls, name))
            out = st.add("gap", [v.layer], name)
            channels = st.shapes[out][0]
            if c.get("keepdims", False):
                shape = tuple(channels if p == 0 else 1 for p in perm)
            else:
                shape = (channels,)
            return Value(out, shape)
        if cls == "Flatten":
            perm = None
            if (c.get("data_format") or "channels_last") == "channels_first" and len(v.shape) > 1:
                perm = channels_last_perm(len(v.shape))
            return st.flatten(v, name, perm)
        if cls == "Activation":
            return self._activation(v, c.get("activation"), cls, name, standalone=True)
        if cls == "ReLU":
            if c.get("max_value") is not None or float(c.get("negative_slope", 0) or 0) != 0 or \
                    float(c.get("threshold", 0) or 0) != 0:
                raise self.unsupported(cls, name, "only a plain ReLU is supported (no max_value, negative_slope "
                                                  "or threshold)")
            return st.elementwise("relu", v, name)
        if cls == "Softmax":
            st.channel_axis(v, self._axis(c.get("axis", -1), v), self.where(cls, name))
            return st.elementwise("softmax", v, name)
        if cls == "BatchNormalization":
            return self._batchnorm(cls, name, c, v)
        if cls == "Concatenate":
            axis = self._axis(c.get("axis", -1), v)
            for x in ins:
                if x.perm != v.perm or len(x.shape) != len(v.shape) or x.is_flat != v.is_flat or \
                        x.index is not None:
                    raise self.unsupported(cls, name, f"inputs in different layouts {[x.shape for x in ins]}")
                st.channel_axis(x, axis, self.where(cls, name))
            out = st.add("concat", [x.layer for x in ins], name)
            if v.is_flat:
                shape = list(v.shape)
                shape[axis] = sum(x.shape[axis] for x in ins)
                return Value(out, tuple(shape))
            return st.spatial(out, v.perm)
        if cls == "Add":
            for x in ins:
                if x.shape != v.shape or x.perm != v.perm or (x.index is None) != (v.index is None) or \
                        (x.index is not None and not np.array_equal(x.index, v.index)):
                    raise self.unsupported(cls, name, f"inputs {[x.shape for x in ins]} differ (no broadcasting)")
            out = st.add("add", [x.layer for x in ins], name)
            return Value(out, v.shape, v.perm, v.index)
        if cls in _PASSTHROUGH:
            return v
        raise self.unsupported(cls, name, "not supported")  # pragma: no cover - guarded by SUPPORTED_LAYERS

    def _axis(self, axis, v: Value) -> int:
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise UnsupportedOpError(f"{self.source}: multi-axis {axis} not supported")
            axis = axis[0]
        axis = int(axis)
        return axis if axis < 0 else axis - 1  # Keras axes count the batch axis

    def _activation(self, v: Value, act, cls: str, name: str, standalone: bool = False) -> Value:
        if isinstance(act, dict):  # Keras 3 may serialise activations as objects
            act = act.get("config", {}).get("name") or act.get("class_name")
        if act in (None, "linear"):
            return v
        hint = name if standalone else f"{name}_{act}"
        if act == "relu":
            return self.state.elementwise("relu", v, hint)
        if act == "softmax":
            self.state.channel_axis(v, -1, self.where(cls, name))
            return self.state.elementwise("softmax", v, hint)
        raise self.unsupported(cls, name, f"activation {act!r} is not supported (linear, relu, softmax)")

    def _same_padding(self, cls, name, spatial, kernel, strides) -> list:
        pads = []
        for size, k, s in zip(spatial, kernel, strides):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            # TensorFlow puts the odd cell at the end
            pads.append(total // 2 if total % 2 == 0 else [total // 2, total - total // 2])
        return pads

    def _padding(self, cls, name, c, v, kernel, strides) -> list:
        padding = c.get("padding", "valid")
        spatial = self.state.shapes[v.layer][1:]
        if padding == "valid":
            return [0] * len(kernel)
        if padding == "same":
            return self._same_padding(cls, name, spatial, kernel, strides)
        raise self.unsupported(cls, name, f"padding={padding!r} is not supported")

    def _conv_input(self, cls, name, c, v: Value) -> tuple:
        """``(perm, nd)`` of a conv-like layer's input, checked: spatial in the layer's layout, no dilation."""
        perm = self.perm(c, len(v.shape))
        self.state.require_spatial(v, perm, self.where(cls, name))
        nd = len(v.shape) - 1
        if any(d != 1 for d in _tuple(c.get("dilation_rate", 1), nd)):
            raise self.unsupported(cls, name, f"dilation_rate {c.get('dilation_rate')} is not supported")
        return perm, nd

    def _conv_window(self, cls, name, c, v: Value, ksize: list) -> tuple:
        """``(input, strides, pads)`` of a conv-like layer, a ZeroPadding before it folded into ``pads``."""
        strides = _tuple(c.get("strides", 1), len(ksize))
        pads = self._padding(cls, name, c, v, ksize, strides)
        v, pads = self.state.fold_pad(v, pads, (0.0,))
        return v, strides, pads

    def _conv(self, cls, name, c, v: Value) -> Value:
        perm, nd = self._conv_input(cls, name, c, v)
        groups = int(c.get("groups", 1) or 1)
        w = self.arrays(name)
        if "kernel" not in w:
            raise WeightMismatchError(f"{self.where(cls, name)}: no kernel in the file")
        kernel = np.asarray(w["kernel"])
        if kernel.ndim != nd + 2:
            raise WeightMismatchError(f"{self.where(cls, name)}: kernel of shape {kernel.shape} for a "
                                      f"{nd}-d convolution")
        W = kernel.transpose((nd + 1, nd) + tuple(range(nd)))
        v, strides, pads = self._conv_window(cls, name, c, v, list(kernel.shape[:nd]))
        bias = w.get("bias") if c.get("use_bias", True) else None
        return self.state.conv(v, W, bias, strides, pads, name, perm, groups=groups)

    def _depthwise(self, cls, name, c, v: Value) -> Value:
        """DepthwiseConv (groups = channels, output ``c * multiplier + m``), SeparableConv = that + a 1x1 conv."""
        perm, nd = self._conv_input(cls, name, c, v)
        w = self.arrays(name)
        dk = w.get("depthwise_kernel", w.get("kernel") if cls.startswith("Depthwise") else None)
        if dk is None or np.ndim(dk) != nd + 2:
            raise WeightMismatchError(f"{self.where(cls, name)}: no depthwise kernel of rank {nd + 2} in the file "
                                      f"(found {sorted(w)})")
        dk = np.asarray(dk)
        cin, mult = dk.shape[nd], dk.shape[nd + 1]
        # (*k, cin, mult) -> torch (cin * mult, 1, *k), output channel c * mult + m as in TensorFlow
        W = dk.reshape(dk.shape[:nd] + (cin * mult,)).transpose((nd,) + tuple(range(nd)))[:, None]
        v, strides, pads = self._conv_window(cls, name, c, v, list(dk.shape[:nd]))
        bias = w.get("bias") if c.get("use_bias", True) else None
        separable = cls.startswith("Separable")
        out = self.state.conv(v, W, None if separable else bias, strides, pads,
                              f"{name}_depthwise" if separable else name, perm, groups=cin)
        if not separable:
            return out
        pk = w.get("pointwise_kernel")
        if pk is None:
            raise WeightMismatchError(f"{self.where(cls, name)}: no pointwise_kernel in the file")
        pk = np.asarray(pk)
        Wp = pk.reshape(pk.shape[nd:]).T.reshape((pk.shape[-1], pk.shape[nd]) + (1,) * nd)
        return self.state.conv(out, Wp, bias, [1] * nd, [0] * nd, name, perm)

    def _zero_padding(self, cls, name, c, v: Value) -> Value:
        perm = self.perm(c, len(v.shape))
        self.state.require_spatial(v, perm, self.where(cls, name))
        nd = len(v.shape) - 1
        pad = c.get("padding", 1)
        pad = [pad] * nd if isinstance(pad, int) else list(pad)
        pairs = [(int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in pad]
        if len(pairs) != nd:
            raise self.unsupported(cls, name, f"padding {c.get('padding')} for {nd} spatial axes")
        spatial = [i for i in range(len(v.shape)) if perm[i] != 0]   # framework spatial axes, in order
        begin, end = [0] * len(v.shape), [0] * len(v.shape)
        for i, (b, e) in zip(spatial, pairs):
            begin[i], end[i] = b, e
        return self.state.pad(v, begin, end, 0.0, name, fresh=self.uses.get(name, 0) == 1)

    def _pool(self, cls, name, c, v: Value) -> Value:
        perm = self.perm(c, len(v.shape))
        self.state.require_spatial(v, perm, self.where(cls, name))
        nd = len(v.shape) - 1
        kernel = _tuple(c.get("pool_size", 2), nd)
        strides = _tuple(c.get("strides") or kernel, nd)
        pads = self._padding(cls, name, c, v, kernel, strides)
        op = "maxpool" if cls.startswith("Max") else "avgpool"
        attrs = dict(kernel=kernel, stride=strides, padding=pads)
        if op == "avgpool":
            attrs["count_include_pad"] = False  # TF/Keras average only over real inputs
        out = self.state.add(op, [v.layer], name, **attrs)
        return self.state.spatial(out, perm)

    def _batchnorm(self, cls, name, c, v: Value) -> Value:
        axis = self._axis(c.get("axis", -1), v)
        self.state.channel_axis(v, axis, self.where(cls, name))
        w = self.arrays(name)
        try:
            mean, var = np.asarray(w["moving_mean"], np.float64), np.asarray(w["moving_variance"], np.float64)
        except KeyError:
            raise WeightMismatchError(f"{self.where(cls, name)}: moving_mean / moving_variance missing from the "
                                      f"file (found {sorted(w)})") from None
        gamma = np.asarray(w["gamma"], np.float64) if c.get("scale", True) else np.ones_like(mean)
        beta = np.asarray(w["beta"], np.float64) if c.get("center", True) else np.zeros_like(mean)
        s = gamma / np.sqrt(var + float(c.get("epsilon", 1e-3)))
        return self.state.affine(v, s, beta - mean * s, name, can_fold=True)
