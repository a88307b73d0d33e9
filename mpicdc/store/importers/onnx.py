"""ONNX graphs -> mpicdc model graph and GEMM weights.

Local, pure apart from reading the file.  Needs the optional ``onnx`` package
(``pip install mpicdc[onnx]``), imported inside :func:`load_onnx`.

Handles graphs from ``torch.onnx.export`` (both the TorchScript and the dynamo
exporter) and from tf2onnx (NHWC graphs with Transpose nodes).  Weights come
from initializers and ``Constant`` nodes (read with ``onnx.numpy_helper``); shape
arithmetic (``Shape``/``Gather``/``Concat``/... on constants) is evaluated at import.
See docs/importers.md for the op table and the layout rules.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional

import numpy as np

from mpicdc.store.importers.common import (
    GraphState,
    ModelImportError,
    UnsupportedOpError,
    Value,
    identity_perm,
    scaled_rows,
)
from mpicdc.store.importers.onnx_lazy import Constants, read_onnx

log = logging.getLogger(__name__)

#: ONNX ops turned into mpicdc layers (or absorbed by one): the ``op_*`` handlers of the converter,
#: set at the end of this module so that the list cannot drift from the code (docs/importers.md
#: is checked against it by tests/test_onnx_modern.py).
SUPPORTED_OPS: tuple = ()
#: op patterns recognised across several nodes (fused into one mpicdc layer).
FUSED_PATTERNS = {
    "LocalResponseNorm (torch dynamo export)": "Mul/Pow -> Reshape -> Pad -> AveragePool -> Squeeze -> Mul -> "
                                               "Add -> Pow -> Div  =>  lrn",
    "channel shuffle": "Reshape (1,g,C/g,*sp) -> Transpose (0,2,1,...) -> Reshape (1,C,*sp)  =>  channel_shuffle",
    "hard swish (tf2onnx / Keras)": "Mul(x, Mul(Clip(Add(x, 3), 0, 6), 1/6) or Div(..., 6) or "
                                    "HardSigmoid(x, alpha=1/6, beta=0.5))  =>  hardswish",
}
#: ops evaluated at import time when all their inputs are constants.
CONSTANT_OPS = ("Constant", "Identity", "Cast", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat",
                "Reshape", "Slice", "Add", "Sub", "Mul", "Div", "ConstantOfShape", "Transpose", "Range")


def _require_onnx():
    try:
        import onnx
        from onnx import numpy_helper  # noqa: F401
    except ImportError as exc:
        raise ImportError("reading ONNX files needs the onnx package: pip install mpicdc[onnx]") from exc
    return onnx


def load_onnx(path, *, input_shape: Optional[tuple] = None, name: Optional[str] = None) -> tuple:
    """Import an ONNX file as ``(Model, weights)``.  Local.

    Parameters
    ----------
    path : the ``.onnx`` file.
    input_shape : framework input shape without the batch axis, for graphs whose input has
        symbolic spatial dimensions (a symbolic batch dimension is taken as 1).
    name : model name (default: the file name without suffix).

    Returns
    -------
    (Model, weights) : the graph in channel-first layout and ``{layer: (W, b)}`` float32.

    Raises
    ------
    ImportError : without the onnx package.
    UnsupportedOpError : an op, attribute or layout mpicdc cannot represent (names op and node).
    ModelImportError : the file is not a valid ONNX model.
    """
    onnx = _require_onnx()
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no such ONNX file: {source}")
    try:   # large initializers stay on disk until their layer is converted (onnx_lazy.py)
        proto, refs = read_onnx(onnx, source)
    except Exception as exc:  # MalformedOnnx, DecodeError, OSError, ... from protobuf
        raise ModelImportError(f"{source}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelImportError(f"{source}: not an ONNX model (no graph nodes found)")
    if name is None:
        name = os.path.splitext(os.path.basename(source))[0]
    return _OnnxConverter(onnx, proto, source, name, input_shape, refs).run()


def _attrs(onnx, node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _OnnxConverter:
    def __init__(self, onnx, proto, source, name, input_shape, refs=None):
        self.onnx = onnx
        self.proto = proto
        self.graph = proto.graph
        self.source = source
        self.state = GraphState(source, name)
        self.input_shape = input_shape
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.consts = Constants(refs)     # initializers left on disk are read when used, not kept
        self.values: dict = {}
        self.consumers: dict = {}
        self.producer: dict = {}
        self.skip: set = set()
        self.fused: dict = {}
        self.batch_transposed: dict = {}

    # ------------------------------------------------------------ helpers
    def where(self, node) -> str:
        return f"{self.source}: node {node.name or '<unnamed>'!r} ({node.op_type})"

    def unsupported(self, node, why: str):
        return UnsupportedOpError(f"{self.where(node)}: {why}")

    def const(self, node, i: int, what: str) -> np.ndarray:
        if i >= len(node.input) or not node.input[i]:
            raise ModelImportError(f"{self.where(node)}: missing input {what}")
        name = node.input[i]
        if name not in self.consts:
            raise self.unsupported(node, f"input {what} ({name!r}) must be a constant (initializer)")
        return self.consts[name]

    def opt_const(self, node, i: int):
        if i < len(node.input) and node.input[i]:
            return self.const(node, i, f"#{i}")
        return None

    def value(self, node, i: int = 0) -> Value:
        name = node.input[i]
        if name in self.values:
            v = self.values[name]
            # a tensor read by several nodes must not absorb a later bias / batch norm
            return v if self.consumers.get(name, 0) == 1 else v.stale()
        if name in self.consts:
            raise self.unsupported(node, f"input {name!r} is a constant where an activation is expected")
        raise ModelImportError(f"{self.where(node)}: input {name!r} is produced by no earlier node")

    def hint(self, node) -> str:
        return node.name or node.op_type.lower()

    def linear_hint(self, node, weight_input: int) -> str:
        """torch-style ``conv1.weight`` initializer names give readable layer names."""
        if len(node.input) > weight_input:
            w = node.input[weight_input]
            if w.endswith(".weight"):
                return w[: -len(".weight")]
        return self.hint(node)

    def foldable(self, node, i: int = 0) -> bool:
        """The tensor feeding ``node`` at input ``i`` has no other consumer (so it can be folded)."""
        return self.consumers.get(node.input[i], 0) == 1

    # ------------------------------------------------------------ constant evaluation
    def eval_const(self, node) -> Optional[list]:
        """Outputs of ``node`` if it is computable at import time, else None."""
        op, a = node.op_type, _attrs(self.onnx, node)
        if op == "Constant":
            return [self._constant_attr(node, a)]
        if op == "Shape" and node.input[0] in self.values:
            shape = np.array((1,) + tuple(self.values[node.input[0]].shape), np.int64)
            return [shape[a.get("start", 0): a.get("end", len(shape))]]
        if op not in CONSTANT_OPS or any(n and n not in self.consts for n in node.input):
            return None   # checked before reading: a weight on disk is read only by the layer that uses it
        if op == "Identity" and self.consts.alias(node.output[0], node.input[0]):
            return []     # the output names the same tensor on disk
        ins = [self.consts.get(n) if n else None for n in node.input]
        present = [x for n, x in zip(node.input, ins) if n]
        if op == "Identity":
            return [ins[0]]
        if op == "Cast":
            return [ins[0].astype(self.onnx.helper.tensor_dtype_to_np_dtype(a["to"]))]
        if op == "Shape":
            shape = np.array(ins[0].shape, np.int64)
            return [shape[a.get("start", 0): a.get("end", len(shape))]]
        if op == "Gather":
            return [np.take(ins[0], ins[1], axis=a.get("axis", 0))]
        if op in ("Unsqueeze", "Squeeze"):
            axes = a.get("axes")
            if axes is None and len(ins) > 1 and ins[1] is not None:
                axes = [int(x) for x in ins[1]]
            x = ins[0]
            if op == "Squeeze":
                return [np.squeeze(x, axis=tuple(axes)) if axes is not None else np.squeeze(x)]
            rank = x.ndim + len(axes)
            for ax in sorted(int(ax) % rank for ax in axes):
                x = np.expand_dims(x, ax)
            return [x]
        if op == "Concat":
            return [np.concatenate([x for x in present], axis=a["axis"])]
        if op == "Reshape":
            shape = [int(d) for d in ins[1]]
            if not a.get("allowzero", 0):
                shape = [ins[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
            return [ins[0].reshape(shape)]
        if op == "Slice":
            if self.opset < 10:
                starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
            else:
                starts, ends = ins[1], ins[2]
                axes = ins[3] if len(ins) > 3 and ins[3] is not None else None
                steps = ins[4] if len(ins) > 4 and ins[4] is not None else None
            x = ins[0]
            axes = list(range(len(starts))) if axes is None else [int(ax) for ax in axes]
            steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
            sl = [slice(None)] * x.ndim
            for s, e, ax, st in zip(starts, ends, axes, steps):
                sl[ax] = slice(int(s), int(e), st)
            return [x[tuple(sl)]]
        if op in ("Add", "Sub", "Mul", "Div"):
            x, y = ins[0], ins[1]
            if op == "Div" and np.issubdtype(x.dtype, np.integer):
                return [(x // y).astype(x.dtype)]
            fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
            return [fn(x, y).astype(np.result_type(x, y))]
        if op == "ConstantOfShape":
            value = a.get("value")
            fill = self.onnx.numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
            return [np.full([int(d) for d in ins[0]], fill, dtype=np.asarray(fill).dtype)]
        if op == "Transpose":
            return [np.transpose(ins[0], a.get("perm"))]
        if op == "Range":
            return [np.arange(ins[0], ins[1], ins[2])]
        return None  # pragma: no cover

    def _constant_attr(self, node, a):
        nh = self.onnx.numpy_helper
        if "value" in a:
            return nh.to_array(a["value"])
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                           ("value_int", np.int64), ("value_ints", np.int64)):
            if key in a:
                return np.array(a[key], dtype=dtype)
        raise self.unsupported(node, f"Constant with attributes {sorted(a)}")

    # ------------------------------------------------------------ main loop
    def run(self) -> tuple:
        nh = self.onnx.numpy_helper
        g = self.graph
        for init in g.initializer:
            if init.name not in self.consts:
                self.consts[init.name] = nh.to_array(init)
        for node in g.node:
            for n in node.input:
                if n:
                    self.consumers[n] = self.consumers.get(n, 0) + 1
            for n in node.output:
                self.producer[n] = node
        for out in g.output:
            self.consumers[out.name] = self.consumers.get(out.name, 0) + 1
        # constants that need no activation shapes (lets pattern matching see them)
        for node in g.node:
            if node.domain in ("", "ai.onnx") and node.op_type != "Shape" and \
                    all(not n or n in self.consts for n in node.input):
                outs = self.eval_const(node)
                if outs is not None:
                    self.consts.update(zip(node.output, outs))
        self._find_lrn_patterns()
        self._find_shuffle_patterns()
        self._find_hardswish_patterns()
        self._setup_input()
        for node in g.node:
            if id(node) in self.skip:
                continue
            if all(n in self.consts for n in node.output if n):
                continue
            if node.domain not in ("", "ai.onnx"):
                raise self.unsupported(node, f"op {node.op_type!r} of domain {node.domain!r} is not supported")
            outs = self.eval_const(node)
            if outs is not None:
                self.consts.update(zip(node.output, outs))
                continue
            if id(node) in self.fused:
                self._emit_fused(node)
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                raise UnsupportedOpError(
                    f"{self.where(node)}: op {node.op_type!r} is not supported by the mpicdc ONNX importer "
                    f"(supported: {', '.join(SUPPORTED_OPS)})")
            handler(node, _attrs(self.onnx, node))
        if len(g.output) != 1:
            raise UnsupportedOpError(f"{self.source}: the graph has {len(g.output)} outputs; mpicdc models have "
                                     f"exactly one")
        out_name = g.output[0].name
        if out_name not in self.values:
            raise ModelImportError(f"{self.source}: graph output {out_name!r} is not computed from the input")
        return self.state.build(self.values[out_name], f"imported from ONNX {os.path.basename(self.source)}")

    def _setup_input(self):
        inits = {i.name for i in self.graph.initializer}
        inputs = [i for i in self.graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise UnsupportedOpError(f"{self.source}: the graph has {len(inputs)} inputs "
                                     f"{[i.name for i in inputs]}; mpicdc models have exactly one")
        inp = inputs[0]
        dims = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
        if not dims:
            raise ModelImportError(f"{self.source}: input {inp.name!r} has no shape information")
        if dims[0] not in (None, 1):
            raise UnsupportedOpError(f"{self.source}: input {inp.name!r} has batch size {dims[0]}; "
                                     f"mpicdc runs batch 1")
        shape = dims[1:]
        if self.input_shape is not None:
            given = tuple(int(d) for d in self.input_shape)
            if len(given) != len(shape) or any(d is not None and d != g for d, g in zip(shape, given)):
                raise ModelImportError(f"{self.source}: input_shape {given} does not fit the graph input "
                                       f"{inp.name!r} of shape {tuple(dims)}")
            shape = list(given)
        if any(d is None for d in shape):
            raise ModelImportError(f"{self.source}: input {inp.name!r} has symbolic dimensions {tuple(dims)}; "
                                   f"pass input_shape=(...) without the batch axis")
        fw = tuple(shape)
        perm = None
        if len(fw) > 1:
            perm = self._input_perm(inp.name, len(fw))
        m_shape = fw if perm is None else tuple(fw[perm.index(i)] for i in range(len(fw)))
        self.values[inp.name] = self.state.set_input(m_shape, perm)

    def _input_perm(self, name: str, rank: int) -> Optional[tuple]:
        """tf2onnx graphs start with Transpose(NHWC -> NCHW): make the mpicdc input that NCHW tensor."""
        users = [n for n in self.graph.node if name in n.input]
        if not users or any(n.op_type != "Transpose" for n in users):
            return None
        perms = {tuple(_attrs(self.onnx, n).get("perm", ())) for n in users}
        if len(perms) != 1:
            return None
        q = perms.pop()
        if len(q) != rank + 1 or q[0] != 0:
            return None
        q = tuple(p - 1 for p in q[1:])
        # after Transpose(q): framework = act.transpose(perm_in)[q] -> identity needs perm_in = argsort(q)
        return tuple(int(i) for i in np.argsort(q))

    # ------------------------------------------------------------ LRN as exported by torch (dynamo)
    def _find_lrn_patterns(self):
        """Fuse torch's LocalResponseNorm decomposition into one ``lrn`` layer.

        ``x / (k + alpha * AvgPool3d(Pad(Reshape(x*x)), (size,1,1)).squeeze(1)) ** beta``
        """
        for node in self.graph.node:
            if node.op_type != "Div":
                continue
            found = self._match_lrn(node)
            if found is not None:
                chain, x_name, attrs = found
                self.skip.update(id(n) for n in chain)
                self.fused[id(node)] = ("lrn", x_name, attrs)

    def _single(self, name: str, op_types: tuple):
        node = self.producer.get(name)
        if node is None or node.op_type not in op_types or self.consumers.get(name, 0) != 1:
            return None
        return node

    def _scalar(self, name: str) -> Optional[float]:
        value = self.consts.get(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(-1)[0])

    def _match_lrn(self, div):
        pow_ = self._single(div.input[1], ("Pow",))
        if pow_ is None or self._scalar(pow_.input[1]) is None:
            return None
        beta = self._scalar(pow_.input[1])
        add = self._single(pow_.input[0], ("Add",))
        if add is None:
            return None
        k_i = 1 if self._scalar(add.input[1]) is not None else 0
        k = self._scalar(add.input[k_i])
        mul = self._single(add.input[1 - k_i], ("Mul",))
        if k is None or mul is None:
            return None
        a_i = 1 if self._scalar(mul.input[1]) is not None else 0
        alpha = self._scalar(mul.input[a_i])
        squeeze = self._single(mul.input[1 - a_i], ("Squeeze",))
        if alpha is None or squeeze is None:
            return None
        pool = self._single(squeeze.input[0], ("AveragePool",))
        if pool is None:
            return None
        pa = _attrs(self.onnx, pool)
        kernel = list(pa.get("kernel_shape", []))
        if len(kernel) != 3 or kernel[1:] != [1, 1] or any(s != 1 for s in pa.get("strides", [1])) or \
                any(pa.get("pads", [0])) or pa.get("count_include_pad", 0) != 1:
            return None
        size = int(kernel[0])
        pad = self._single(pool.input[0], ("Pad",))
        if pad is None:
            return None
        pads = self.consts.get(pad.input[1]) if len(pad.input) > 1 else None
        if pads is None:
            pads = np.asarray(_attrs(self.onnx, pad).get("pads", []))
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        want = [0] * 10
        want[2], want[7] = size // 2, (size - 1) // 2
        if pads != want or _str(_attrs(self.onnx, pad).get("mode", b"constant")) != "constant":
            return None
        if len(pad.input) > 2 and pad.input[2] and self._scalar(pad.input[2]) != 0.0:
            return None
        reshape = self._single(pad.input[0], ("Reshape", "Unsqueeze"))
        if reshape is None:
            return None
        sq = self._single(reshape.input[0], ("Mul", "Pow"))
        if sq is None:
            return None
        x = div.input[0]
        if sq.op_type == "Mul" and not (sq.input[0] == x and sq.input[1] == x):
            return None
        if sq.op_type == "Pow" and not (sq.input[0] == x and self._scalar(sq.input[1]) == 2.0):
            return None
        return ([pow_, add, mul, squeeze, pool, pad, reshape, sq], x,
                dict(size=size, alpha=alpha, beta=beta, k=k))

    def _find_shuffle_patterns(self):
        """``Reshape(1, g, C/g, *sp) -> Transpose(0, 2, 1, ...) -> Reshape(1, C, *sp)`` is a channel shuffle."""
        for r2 in self.graph.node:
            if r2.op_type != "Reshape" or len(r2.input) < 2 or r2.input[1] not in self.consts:
                continue
            tr = self._single(r2.input[0], ("Transpose",))
            if tr is None:
                continue
            perm = list(_attrs(self.onnx, tr).get("perm", []))
            if len(perm) < 4 or perm[:3] != [0, 2, 1] or perm[3:] != list(range(3, len(perm))):
                continue
            r1 = self._single(tr.input[0], ("Reshape",))
            if r1 is None or len(r1.input) < 2 or r1.input[1] not in self.consts:
                continue
            self.skip.update((id(r1), id(tr)))
            self.fused[id(r2)] = ("shuffle", r1.input[0], dict(split=self._target(r1), merged=self._target(r2)))

    # ------------------------------------------------------------ hard swish written with elementwise ops
    def _find_hardswish_patterns(self):
        """``x * hard_sigmoid(x)`` as tf2onnx writes Keras's MobileNet v3 hard swish (``x * relu6(x + 3) / 6``)."""
        for node in self.graph.node:
            if node.op_type != "Mul" or len(node.input) != 2 or any(n in self.consts for n in node.input):
                continue
            for x_i in (0, 1):
                chain = self._match_hard_sigmoid(node.input[1 - x_i], node.input[x_i])
                if chain is not None:
                    self.skip.update(id(n) for n in chain)
                    self.fused[id(node)] = ("hardswish", node.input[x_i], {})
                    break

    def _clip_bounds(self, clip) -> tuple:
        if self.opset < 11:
            a = _attrs(self.onnx, clip)
            return a.get("min"), a.get("max")
        return tuple(self._scalar(clip.input[i]) if len(clip.input) > i and clip.input[i] else None
                     for i in (1, 2))

    def _match_hard_sigmoid(self, gate: str, x: str) -> Optional[list]:
        """The nodes computing ``gate = relu6(x + 3) / 6`` (or ``HardSigmoid(x)`` with torch's 1/6, 0.5), each
        read only by the next one; None when ``gate`` is anything else."""
        def near(value, want):
            return value is not None and abs(value - want) <= 1e-6 * abs(want)

        hs = self._single(gate, ("HardSigmoid",))
        if hs is not None:
            a = _attrs(self.onnx, hs)
            ok = hs.input[0] == x and near(float(a.get("alpha", 0.2)), 1 / 6) and near(float(a.get("beta", 0.5)), 0.5)
            return [hs] if ok else None
        scale = self._single(gate, ("Mul", "Div"))
        if scale is None:
            return None
        if scale.op_type == "Div":
            c_i, want = 1, 6.0
        else:
            c_i, want = (1 if self._scalar(scale.input[1]) is not None else 0), 1 / 6
        if not near(self._scalar(scale.input[c_i]), want):
            return None
        clip = self._single(scale.input[1 - c_i], ("Clip",))
        if clip is None:
            return None
        low, high = self._clip_bounds(clip)
        if low is None or high is None or float(low) != 0.0 or float(high) != 6.0:
            return None
        add = self._single(clip.input[0], ("Add",))
        if add is None:
            return None
        k_i = 1 if self._scalar(add.input[1]) is not None else 0
        if add.input[1 - k_i] != x or self._scalar(add.input[k_i]) != 3.0:
            return None
        return [scale, clip, add]

    def _target(self, reshape) -> tuple:
        """``(shape, allowzero)`` of a Reshape node with a constant shape."""
        return ([int(d) for d in self.consts[reshape.input[1]].reshape(-1)],
                int(_attrs(self.onnx, reshape).get("allowzero", 0)))

    def _resolve_shape(self, node, current: tuple, target: tuple) -> list:
        shape, allowzero = target
        if not allowzero:
            shape = [current[i] if d == 0 and i < len(current) else d for i, d in enumerate(shape)]
        if shape.count(-1) > 1:
            raise ModelImportError(f"{self.where(node)}: more than one -1 in shape {shape}")
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            if known == 0 or math.prod(current) % known:
                raise ModelImportError(f"{self.where(node)}: cannot reshape {current} to {shape}")
            shape[shape.index(-1)] = math.prod(current) // known
        return shape

    def _emit_fused(self, node):
        kind, x_name, attrs = self.fused[id(node)]
        v = self.values.get(x_name)
        if v is None:
            raise ModelImportError(f"{self.where(node)}: input {x_name!r} is not an activation")
        if kind == "hardswish":
            self.values[node.output[0]] = self.state.elementwise("hardswish", v, self.hint(node))
            return
        if kind == "lrn":
            self.state.require_spatial(v, identity_perm(len(v.shape)), f"{self.where(node)} (LocalResponseNorm)")
            self.values[node.output[0]] = self.state.elementwise("lrn", v, self.hint(node) + "_lrn", **attrs)
            return
        what = f"{self.where(node)} (channel shuffle: Reshape-Transpose-Reshape)"
        self.state.require_spatial(v, identity_perm(len(v.shape)), what)
        full = (1,) + tuple(v.shape)
        split = self._resolve_shape(node, full, attrs["split"])
        merged = self._resolve_shape(node, tuple(split[:1] + split[2:3] + split[1:2] + split[3:]), attrs["merged"])
        if split[0] != 1 or split[1] * split[2] != full[1] or tuple(split[3:]) != full[2:] or \
                tuple(merged) != full:
            raise self.unsupported(node, f"{what}: reshapes {split} and {merged} of a tensor of shape {full} are "
                                         f"not a channel shuffle")
        self.values[node.output[0]] = self.state.elementwise("channel_shuffle", v, self.hint(node) + "_shuffle",
                                                             groups=int(split[1]))

    # ------------------------------------------------------------ window helpers
    def _window(self, node, a, v: Value, kernel, overhang_ok: bool = True):
        """Strides and pads (an int or a ``[begin, end]`` pair per axis) of a Conv / pool node over ``v`` (NCHW).

        ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID and explicit asymmetric ``pads`` are exact.
        ``ceil_mode=1`` becomes extra end padding when ``overhang_ok`` (the padded cells never win a
        max and are not counted by an average that excludes padding).
        """
        nd = len(kernel)
        strides = [int(x) for x in a.get("strides", [1] * nd)]
        if any(d != 1 for d in a.get("dilations", [1] * nd)):
            raise self.unsupported(node, f"dilations {list(a['dilations'])} are not supported (only 1)")
        auto_pad = _str(a.get("auto_pad", "NOTSET"))
        spatial = v.shape[1:]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begins, ends = [], []
            for size, k, s in zip(spatial, kernel, strides):
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                small, large = total // 2, total - total // 2
                begins.append(small if auto_pad == "SAME_UPPER" else large)
                ends.append(large if auto_pad == "SAME_UPPER" else small)
        elif auto_pad == "VALID":
            begins = ends = [0] * nd
        else:
            pads = [int(x) for x in a.get("pads", [0] * 2 * nd)]
            begins, ends = pads[:nd], pads[nd:]
        ends = list(ends)
        if a.get("ceil_mode", 0):
            for i, (size, k, s, b) in enumerate(zip(spatial, kernel, strides, begins)):
                span = size + b + ends[i] - k
                out = -(-span // s) + 1
                if (out - 1) * s >= size + b:   # the last window would start in the end padding
                    out -= 1
                extra = max(0, (out - 1) * s + k - (size + b + ends[i]))
                if extra and not overhang_ok:
                    raise self.unsupported(node, "ceil_mode=1 with an average that counts the padding changes "
                                                 "the divisor of the last windows; only floor rounding is "
                                                 "supported here")
                ends[i] += extra
        return strides, [int(b) if b == e else [int(b), int(e)] for b, e in zip(begins, ends)]

    def _nchw(self, node, v: Value):
        self.state.require_spatial(v, identity_perm(len(v.shape)), self.where(node))

    # ------------------------------------------------------------ op handlers
    def op_Conv(self, node, a):
        v = self.state.unflatten(self.value(node))
        W = self.const(node, 1, "W")
        b = self.opt_const(node, 2)
        groups = int(a.get("group", 1))
        self._nchw(node, v)
        kernel = list(a.get("kernel_shape", W.shape[2:]))
        if list(W.shape[2:]) != kernel:
            raise ModelImportError(f"{self.where(node)}: kernel_shape {kernel} differs from weight shape {W.shape}")
        strides, pads = self._window(node, a, v, kernel)
        v, pads = self.state.fold_pad(v, pads, (0.0,))
        self.values[node.output[0]] = self.state.conv(v, W, b, strides, pads, self.linear_hint(node, 1),
                                                      identity_perm(len(v.shape)), groups=groups)

    def op_Gemm(self, node, a):
        if a.get("transA", 0):
            v = self.batch_transposed.get(node.input[0])
            if v is None:
                raise self.unsupported(node, "transA=1 is supported only on Transpose(perm=[1, 0]) of the "
                                             "(1, features) activation")
        else:
            v = self.value(node)
        B = self.const(node, 1, "B")
        C = self.opt_const(node, 2)
        if B.ndim != 2:
            raise self.unsupported(node, f"B of shape {B.shape} is not a matrix")
        # (out, in), float32 C-ordered; alpha applied in float64 a few rows at a time (no full float64 copy)
        W = scaled_rows(B.T if not a.get("transB", 0) else B, float(a.get("alpha", 1.0)))
        del B
        b = None
        if C is not None:
            C = np.asarray(C, np.float64) * a.get("beta", 1.0)
            if C.size not in (1, W.shape[0]):
                raise self.unsupported(node, f"bias C of shape {C.shape} is not per output")
            b = np.broadcast_to(C.reshape(-1), (W.shape[0],))
        self.values[node.output[0]] = self.state.dense(v, W, b, self.linear_hint(node, 1))

    def op_MatMul(self, node, a):
        if node.input[0] in self.consts:
            raise self.unsupported(node, "constant @ activation is not supported (only activation @ constant)")
        v = self.value(node)
        B = self.const(node, 1, "B")
        if B.ndim != 2:
            raise self.unsupported(node, f"B of shape {B.shape} is not a matrix")
        if len(v.shape) != 1:
            raise self.unsupported(node, f"MatMul on a tensor of shape {(1,) + tuple(v.shape)}; only "
                                         f"(1, features) inputs are supported")
        self.values[node.output[0]] = self.state.dense(v, B.T, None, self.hint(node))

    def _binary(self, node, a, op):
        n0, n1 = node.input[0], node.input[1]
        c0, c1 = n0 in self.consts, n1 in self.consts
        if not c0 and not c1:
            if op != "Add":
                hint = ""
                if op == "Mul" and n0 == n1:
                    hint = ("; if this is torch's LocalResponseNorm exported by the TorchScript exporter "
                            "(dynamo=False), export with the default dynamo exporter, whose LRN pattern is "
                            "recognised")
                raise self.unsupported(node, f"{op} of two activations is not supported (only Add){hint}")
            return self._add_acts(node)
        act_i = 1 if c0 else 0
        v = self.value(node, act_i)
        c = np.asarray(self.consts[node.input[1 - act_i]], np.float64)
        per = self._per_channel(node, v, c)
        if op == "Add":
            scale, shift = np.ones_like(per), per
        elif op == "Sub":
            scale, shift = (np.ones_like(per), -per) if act_i == 0 else (-np.ones_like(per), per)
        elif op == "Mul":
            scale, shift = per, np.zeros_like(per)
        else:  # Div
            if act_i == 1:
                raise self.unsupported(node, "constant / activation is not supported")
            scale, shift = 1.0 / per, np.zeros_like(per)
        self.values[node.output[0]] = self.state.affine(v, scale, shift, self.hint(node),
                                                        can_fold=self.foldable(node, act_i))

    def _per_channel(self, node, v: Value, c: np.ndarray) -> np.ndarray:
        """Reduce a broadcast constant to one value per channel (spatial) or per feature (flat)."""
        full = (1,) + tuple(v.shape)
        if c.ndim > len(full):
            raise self.unsupported(node, f"constant of shape {c.shape} broadcasts beyond {full}")
        cs = (1,) * (len(full) - c.ndim) + tuple(c.shape)
        if v.is_flat:
            if math.prod(cs) in (1, math.prod(v.shape)):
                return np.broadcast_to(c.reshape(-1), (math.prod(v.shape),)) if c.size > 1 else c.reshape(1)
        else:
            axis = 1 + v.perm.index(0)  # framework axis (with batch) holding channels
            if all(d == 1 for i, d in enumerate(cs) if i != axis) and cs[axis] in (1, full[axis]):
                return c.reshape(-1)
        raise self.unsupported(node, f"constant of shape {c.shape} is not a scalar or per-channel value for a "
                                     f"tensor of shape {full}")

    def _add_acts(self, node):
        vs = [self.value(node, i) for i in range(len(node.input))]
        first = vs[0]
        for v in vs[1:]:
            if tuple(v.shape) != tuple(first.shape) or v.perm != first.perm or \
                    (v.index is None) != (first.index is None) or \
                    (v.index is not None and not np.array_equal(v.index, first.index)):
                raise self.unsupported(node, f"Add of tensors with shapes {[x.shape for x in vs]} in different "
                                             f"layouts (broadcasting is not supported)")
        name = self.state.add("add", [v.layer for v in vs], self.hint(node))
        self.values[node.output[0]] = Value(name, first.shape, first.perm, first.index)

    def op_Add(self, node, a):
        self._binary(node, a, "Add")

    def op_Sub(self, node, a):
        self._binary(node, a, "Sub")

    def op_Mul(self, node, a):
        self._binary(node, a, "Mul")

    def op_Div(self, node, a):
        self._binary(node, a, "Div")

    def op_Relu(self, node, a):
        self.values[node.output[0]] = self.state.elementwise("relu", self.value(node), self.hint(node))

    def _pool(self, node, a, op):
        v = self.value(node)
        self._nchw(node, v)
        kernel = [int(k) for k in a["kernel_shape"]]
        if len(kernel) != len(v.shape) - 1:
            raise self.unsupported(node, f"kernel {kernel} does not fit input shape {v.shape}")
        include = bool(a.get("count_include_pad", 0))
        strides, pads = self._window(node, a, v, kernel, overhang_ok=not (op == "avgpool" and include))
        if op == "maxpool":
            v, pads = self.state.fold_pad(v, pads, (-math.inf,))
        elif include:
            v, pads = self.state.fold_pad(v, pads, (0.0,))
        attrs = dict(kernel=kernel, stride=strides, padding=pads)
        if op == "avgpool":
            attrs["count_include_pad"] = include
        if op == "maxpool" and len(node.output) > 1 and node.output[1]:
            raise self.unsupported(node, "the Indices output of MaxPool is not supported")
        name = self.state.add(op, [v.layer], self.hint(node), **attrs)
        self.values[node.output[0]] = self.state.spatial(name, v.perm)

    def op_MaxPool(self, node, a):
        self._pool(node, a, "maxpool")

    def op_AveragePool(self, node, a):
        self._pool(node, a, "avgpool")

    def _gap(self, node, v: Value, out_shape: tuple, op: str = "gap"):
        name = self.state.add(op, [v.layer], self.hint(node))
        self.values[node.output[0]] = Value(name, tuple(out_shape))

    def op_GlobalAveragePool(self, node, a):
        v = self.value(node)
        self._nchw(node, v)
        self._gap(node, v, (v.shape[0],) + (1,) * (len(v.shape) - 1))

    def op_GlobalMaxPool(self, node, a):
        v = self.value(node)
        self._nchw(node, v)
        self._gap(node, v, (v.shape[0],) + (1,) * (len(v.shape) - 1), "gmp")

    def op_ReduceMean(self, node, a):
        self._reduce(node, a, "gap")

    def op_ReduceMax(self, node, a):
        self._reduce(node, a, "gmp")

    def _reduce(self, node, a, op):
        v = self.value(node)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = [int(x) for x in self.const(node, 1, "axes")]
        if v.is_flat or axes is None:
            raise self.unsupported(node, "only a reduction over all spatial axes (global pooling) is supported")
        rank = len(v.shape) + 1
        fw_axes = sorted({int(ax) % rank - 1 for ax in axes})
        if -1 in fw_axes or sorted(v.perm[i] for i in fw_axes) != list(range(1, len(v.shape))):
            raise self.unsupported(node, f"reduction over axes {list(axes)} of a tensor of shape {(1,) + v.shape} "
                                         f"is not a global pooling")
        keep = a.get("keepdims", 1)
        out = tuple(1 if i in fw_axes else d for i, d in enumerate(v.shape) if keep or i not in fw_axes)
        self._gap(node, v, out, op)

    def op_LRN(self, node, a):
        v = self.value(node)
        self._nchw(node, v)
        size = int(a["size"])
        if size % 2 == 0:
            raise self.unsupported(node, f"even LRN size {size}: ONNX centres even windows differently from "
                                         f"mpicdc/torch; only odd sizes are supported")
        self.values[node.output[0]] = self.state.elementwise(
            "lrn", v, self.hint(node), size=size, alpha=float(a.get("alpha", 1e-4)),
            beta=float(a.get("beta", 0.75)), k=float(a.get("bias", 1.0)))

    def op_BatchNormalization(self, node, a):
        if a.get("training_mode", 0):
            raise self.unsupported(node, "training_mode=1 is not supported (export the model in eval mode)")
        if len([o for o in node.output if o]) > 1 and any(self.consumers.get(o, 0) for o in node.output[1:] if o):
            raise self.unsupported(node, "the running-statistics outputs are not supported")
        v = self.value(node)
        scale, bias, mean, var = (np.asarray(self.const(node, i, what), np.float64)
                                  for i, what in ((1, "scale"), (2, "B"), (3, "mean"), (4, "var")))
        eps = float(a.get("epsilon", 1e-5))
        s = scale / np.sqrt(var + eps)
        t = bias - mean * s
        if not v.is_flat:
            self.state.channel_axis(v, 0, self.where(node))
        self.values[node.output[0]] = self.state.affine(v, s, t, self.hint(node), can_fold=self.foldable(node))

    def op_Concat(self, node, a):
        vs = [self.value(node, i) for i in range(len(node.input))]
        axis = int(a["axis"])
        rank = len(vs[0].shape) + 1
        if axis % rank == 0:
            raise self.unsupported(node, "concatenation along the batch axis is not supported")
        fw_axis = axis % rank - 1
        for v in vs:
            if len(v.shape) != len(vs[0].shape) or v.is_flat != vs[0].is_flat or v.perm != vs[0].perm:
                raise self.unsupported(node, f"inputs in different layouts {[x.shape for x in vs]}")
            self.state.channel_axis(v, fw_axis, self.where(node))
        name = self.state.add("concat", [v.layer for v in vs], self.hint(node))
        shape = list(vs[0].shape)
        shape[fw_axis] = sum(v.shape[fw_axis] for v in vs)
        if vs[0].is_flat:
            index = None
            if any(v.index is not None for v in vs):
                parts, offset = [], 0
                for v in vs:
                    n = math.prod(v.shape)
                    parts.append((np.arange(n) if v.index is None else v.index) + offset)
                    offset += n
                index = np.concatenate(parts)
            self.values[node.output[0]] = Value(name, tuple(shape), None, index)
        else:
            self.values[node.output[0]] = self.state.spatial(name, vs[0].perm)

    def op_Flatten(self, node, a):
        v = self.value(node)
        current = (1,) + tuple(v.shape)
        axis = a.get("axis", 1) % len(current)
        if axis <= 1:
            self.values[node.output[0]] = self.state.flatten(v, self.hint(node))
        else:
            self._reshape_to(node, v, [math.prod(current[:axis]), math.prod(current[axis:])])

    def _reshape_to(self, node, v: Value, full: list):
        if full[0] != 1:
            raise self.unsupported(node, f"reshape to {tuple(full)} changes the batch axis")
        self.values[node.output[0]] = self.state.reshape(v, tuple(full[1:]), self.where(node))

    def op_Reshape(self, node, a):
        v = self.value(node)
        self.const(node, 1, "shape")
        self._reshape_to(node, v, self._resolve_shape(node, (1,) + tuple(v.shape), self._target(node)))

    def _axes(self, node, a):
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = [int(x) for x in self.const(node, 1, "axes")]
        return axes

    def op_Squeeze(self, node, a):
        v = self.value(node)
        current = [1] + list(v.shape)
        axes = self._axes(node, a)
        axes = [i for i, d in enumerate(current) if d == 1 and i > 0] if axes is None else \
            [int(ax) % len(current) for ax in axes]
        if 0 in axes:
            raise self.unsupported(node, "squeezing the batch axis is not supported")
        self._reshape_to(node, v, [d for i, d in enumerate(current) if i not in axes])

    def op_Unsqueeze(self, node, a):
        v = self.value(node)
        out = [1] + list(v.shape)
        axes = self._axes(node, a)
        rank = len(out) + len(axes)
        for ax in sorted(int(ax) % rank for ax in axes):
            if ax == 0:
                raise self.unsupported(node, "unsqueezing before the batch axis is not supported")
            out.insert(ax, 1)
        self._reshape_to(node, v, out)

    def op_Transpose(self, node, a):
        v = self.value(node)
        rank = len(v.shape) + 1
        q = list(a.get("perm", list(range(rank))[::-1]))
        if q == [1, 0] and v.is_flat and self._all_gemm_trans_a(node.output[0]):
            self.batch_transposed[node.output[0]] = v  # Gemm(transA=1) undoes it
            return
        if q[0] != 0:
            raise self.unsupported(node, f"transpose {q} moves the batch axis")
        q = [p - 1 for p in q[1:]]
        if v.is_flat:
            moved = [v.shape[p] for p in q]
            if [d for d in moved if d != 1] != [d for d in v.shape if d != 1]:
                raise self.unsupported(node, f"transpose {q} of a flat tensor of shape {v.shape}")
            self.values[node.output[0]] = Value(v.layer, tuple(moved), None, v.index, v.fresh)
            return
        perm = tuple(v.perm[p] for p in q)
        self.values[node.output[0]] = Value(v.layer, tuple(v.shape[p] for p in q), perm, None, v.fresh)

    def _all_gemm_trans_a(self, name: str) -> bool:
        users = [n for n in self.graph.node if name in n.input]
        return bool(users) and all(n.op_type == "Gemm" and n.input[0] == name and n.input[1] != name and
                                   _attrs(self.onnx, n).get("transA", 0) for n in users)

    def op_Softmax(self, node, a):
        v = self.value(node)
        rank = len(v.shape) + 1
        axis = a.get("axis", 1 if self.opset < 13 else -1) % rank
        if axis == 0:
            raise self.unsupported(node, "softmax over the batch axis is not supported")
        fw_axis = axis - 1
        if self.opset < 13:  # softmax over all axes from `axis` on: fine when only one is not 1
            tail = [i for i in range(fw_axis, len(v.shape)) if v.shape[i] != 1]
            if len(tail) > 1:
                raise self.unsupported(node, f"softmax (opset {self.opset}) over several axes of shape "
                                             f"{(1,) + tuple(v.shape)}")
            fw_axis = tail[0] if tail else fw_axis
        self.state.channel_axis(v, fw_axis, self.where(node))
        self.values[node.output[0]] = self.state.elementwise("softmax", v, self.hint(node))

    def op_Clip(self, node, a):
        if self.opset < 11:
            low, high = a.get("min"), a.get("max")
        else:
            low, high = (self.opt_const(node, i) for i in (1, 2))
        bounds = {k: float(np.asarray(x).reshape(-1)[0]) for k, x in (("min", low), ("max", high)) if x is not None}
        v = self.value(node)
        if bounds == {"min": 0.0}:
            self.values[node.output[0]] = self.state.elementwise("relu", v, self.hint(node))
        else:
            self.values[node.output[0]] = self.state.elementwise("clip", v, self.hint(node), **bounds)

    def op_HardSigmoid(self, node, a):
        self.values[node.output[0]] = self.state.elementwise(
            "hardsigmoid", self.value(node), self.hint(node), alpha=float(a.get("alpha", 0.2)),
            beta=float(a.get("beta", 0.5)))

    def op_HardSwish(self, node, a):
        self.values[node.output[0]] = self.state.elementwise("hardswish", self.value(node), self.hint(node))

    def op_Sum(self, node, a):
        if any(n in self.consts for n in node.input):
            raise self.unsupported(node, "Sum with a constant input is not supported (only of activations)")
        self._add_acts(node)

    def op_Pad(self, node, a):
        v = self.value(node)
        mode = _str(a.get("mode", "constant"))
        if mode != "constant":
            raise self.unsupported(node, f"mode {mode!r} is not supported (only constant padding)")
        rank = len(v.shape) + 1
        if self.opset < 11:
            pads, value, axes = list(a["pads"]), float(a.get("value", 0.0)), None
        else:
            pads = [int(x) for x in self.const(node, 1, "pads").reshape(-1)]
            c = self.opt_const(node, 2)
            value = float(c.reshape(-1)[0]) if c is not None and c.size else 0.0
            axes = self.opt_const(node, 3)
        axes = list(range(rank)) if axes is None else [int(ax) % rank for ax in np.asarray(axes).reshape(-1)]
        begin, end = [0] * rank, [0] * rank
        for ax, b, e in zip(axes, pads[:len(axes)], pads[len(axes):]):
            begin[ax], end[ax] = int(b), int(e)
        if begin[0] or end[0]:
            raise self.unsupported(node, "padding the batch axis is not supported")
        if min(begin + end) < 0:
            raise self.unsupported(node, f"negative pads {pads} (cropping) are not supported")
        self.values[node.output[0]] = self.state.pad(v, begin[1:], end[1:], value, self.hint(node),
                                                     fresh=self.foldable_out(node))

    def foldable_out(self, node) -> bool:
        """The node's output is read once (a following conv / pool may absorb it)."""
        return self.consumers.get(node.output[0], 0) == 1

    def _channel_slices(self, node, v: Value, axis: int, bounds: list) -> None:
        """Outputs of ``node`` as channel slices ``[start, stop)`` of ``v`` along framework ``axis``."""
        self.state.channel_axis(v, axis, self.where(node))
        if v.is_flat and v.index is not None:
            raise self.unsupported(node, "slicing a flat tensor in non-channel-first order is not supported")
        total = v.shape[axis % len(v.shape)]
        for out, (start, stop) in zip(node.output, bounds):
            if not out:
                continue
            if (start, stop) == (0, total):
                self.values[out] = v.stale()
                continue
            hint = self.hint(node) if len(node.output) == 1 else f"{self.hint(node)}_{out}"
            name = self.state.add("slice", [v.layer], hint, start=int(start), stop=int(stop))
            shape = list(v.shape)
            shape[axis % len(shape)] = stop - start
            self.values[out] = Value(name, tuple(shape)) if v.is_flat else self.state.spatial(name, v.perm)

    def op_Split(self, node, a):
        v = self.value(node)
        axis = int(a.get("axis", 0))
        if axis % (len(v.shape) + 1) == 0:
            raise self.unsupported(node, "splitting the batch axis is not supported")
        fw_axis = axis % (len(v.shape) + 1) - 1
        total, n = v.shape[fw_axis], len(node.output)
        sizes = a.get("split")
        if sizes is None and len(node.input) > 1 and node.input[1]:
            sizes = self.const(node, 1, "split").reshape(-1)
        if sizes is None:
            parts = int(a.get("num_outputs", n))
            step = -(-total // parts)
            sizes = [min(step, total - i * step) for i in range(parts)]
        sizes = [int(x) for x in sizes]
        if sum(sizes) != total or len(sizes) != n:
            raise ModelImportError(f"{self.where(node)}: split sizes {sizes} do not cover {total} entries "
                                   f"into {n} outputs")
        starts = np.cumsum([0] + sizes)
        self._channel_slices(node, v, fw_axis, list(zip(starts[:-1], starts[1:])))

    def op_Slice(self, node, a):
        v = self.value(node)
        rank = len(v.shape) + 1
        if self.opset < 10:
            starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
        else:
            starts, ends = self.const(node, 1, "starts"), self.const(node, 2, "ends")
            axes, steps = self.opt_const(node, 3), self.opt_const(node, 4)
        starts, ends = [int(x) for x in np.reshape(starts, -1)], [int(x) for x in np.reshape(ends, -1)]
        axes = list(range(len(starts))) if axes is None else [int(x) % rank for x in np.reshape(axes, -1)]
        steps = [1] * len(starts) if steps is None else [int(x) for x in np.reshape(steps, -1)]
        full = (1,) + tuple(v.shape)
        cut = []
        for ax, s0, e0, st in zip(axes, starts, ends, steps):
            lo, hi, _ = slice(s0, e0, st).indices(full[ax])
            if (lo, hi, st) != (0, full[ax], 1):
                cut.append((ax, lo, hi, st))
        if not cut:
            self._passthrough(node)
            return
        if len(cut) > 1 or cut[0][0] == 0 or cut[0][3] != 1:
            raise self.unsupported(node, f"slice of axes {[c[0] for c in cut]} with steps {[c[3] for c in cut]}: "
                                         f"only a contiguous slice of the channel axis is supported")
        ax, lo, hi, _ = cut[0]
        self._channel_slices(node, v, ax - 1, [(lo, hi)])

    def _passthrough(self, node):
        self.values[node.output[0]] = self.value(node)

    def op_Dropout(self, node, a):
        if len(node.output) > 1 and node.output[1] and self.consumers.get(node.output[1], 0):
            raise self.unsupported(node, "the mask output of Dropout is not supported")
        self._passthrough(node)

    def op_Identity(self, node, a):
        self._passthrough(node)


SUPPORTED_OPS = tuple(sorted(name[3:] for name in dir(_OnnxConverter) if name.startswith("op_")))
