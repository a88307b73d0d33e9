"""Write an mpicdc model and its weights as an ONNX file (the inverse of :mod:`.onnx` for common graphs).

Local.  Needs the optional ``onnx`` package.  Used to build real ONNX files of zoo models
(with their seeded random weights) for the importer-memory benchmark and tests
(``python -m mpicdc.bench prepare --onnx``), and to hand a zoo model to onnxruntime.

Weights are written as ``raw_data`` inside the file, as ``torch.onnx.export`` does for models
under 2 GB; layers are made (or taken from ``weights``) one at a time.
"""
from __future__ import annotations

import os

import numpy as np

from mpicdc.core.models import Model, pad_pairs

#: mpicdc ops this writer turns into ONNX nodes.
EXPORTABLE_OPS = ("conv", "dense", "relu", "maxpool", "avgpool", "gap", "lrn", "flatten", "softmax",
                  "concat", "add", "identity")


def _window(attrs: dict, nd: int, name: str, pool: bool = False) -> dict:
    """ONNX ``kernel_shape``/``strides``/``pads`` of a conv or pool (a pool's stride defaults to its kernel)."""
    k = attrs.get("kernel", 1)
    kernel = [int(k)] * nd if np.ndim(k) == 0 else [int(x) for x in k]
    s = attrs.get("stride", kernel if pool else 1)
    strides = [int(s)] * nd if np.ndim(s) == 0 else [int(x) for x in s]
    pairs = pad_pairs(attrs.get("padding", 0), nd, name)
    return {"kernel_shape": kernel, "strides": strides, "pads": [b for b, _ in pairs] + [e for _, e in pairs]}


def save_onnx(path, model: Model, weights: dict | None = None, *, seed: int = 0, opset: int = 13) -> str:
    """Write ``model`` to ``path`` as an ONNX graph; returns the path.  Local.

    ``weights`` is ``{layer: (W, b)}`` in the GEMM layout; ``None`` uses the zoo's seeded random
    weights (:func:`mpicdc.core.random_weights.layer_weights`), made one layer at a time.
    Convolutions become ``Conv`` (weights ``(out, in / groups, *kernel)``), dense layers
    ``Gemm(transB=1)`` after a ``Flatten``.  Raises ``ValueError`` naming a layer whose op is
    not in :data:`EXPORTABLE_OPS`.
    """
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as exc:
        raise ImportError("writing ONNX files needs the onnx package: pip install mpicdc[onnx]") from exc
    from mpicdc.core.random_weights import layer_weights

    shapes = model.shapes()
    nodes, inits = [], []

    def tensor(name: str, array: np.ndarray):
        a = np.ascontiguousarray(array, np.float32)
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, a.shape, a.tobytes(), raw=True))

    def src(layer, i: int = 0) -> str:
        return "x" if layer.inputs[i] == "input" else layer.inputs[i]

    for layer in model.layers:
        op, a, out = layer.op, layer.attrs, layer.name
        if op not in EXPORTABLE_OPS:
            raise ValueError(f"layer {layer.name!r}: op {op!r} cannot be written to ONNX by save_onnx "
                             f"(it writes {', '.join(EXPORTABLE_OPS)})")
        in_shape = shapes[layer.inputs[0]] if layer.inputs[0] != "input" else tuple(model.input_shape)
        if op in ("conv", "dense"):
            W, b = weights[layer.name] if weights is not None else layer_weights(model, layer.name, seed)
            if op == "conv":
                groups = int(a.get("groups", 1))
                kshape = (a["out"], in_shape[0] // groups) + tuple(_window(a, len(in_shape) - 1, out)["kernel_shape"])
                tensor(f"{out}.weight", np.reshape(W, kshape))
                tensor(f"{out}.bias", b)
                nodes.append(helper.make_node("Conv", [src(layer), f"{out}.weight", f"{out}.bias"], [out], name=out,
                                              group=groups, **_window(a, len(in_shape) - 1, out)))
            else:
                x = src(layer)
                if len(in_shape) != 1 or layer.inputs[0] == "input":
                    nodes.append(helper.make_node("Flatten", [x], [f"{out}_flat"], axis=1))
                    x = f"{out}_flat"
                tensor(f"{out}.weight", W)
                tensor(f"{out}.bias", b)
                nodes.append(helper.make_node("Gemm", [x, f"{out}.weight", f"{out}.bias"], [out], name=out,
                                              transB=1))
            del W, b
        elif op in ("maxpool", "avgpool"):
            kw = _window(a, len(in_shape) - 1, out, pool=True)
            if op == "avgpool":
                kw["count_include_pad"] = int(bool(a.get("count_include_pad", True)))
            nodes.append(helper.make_node("MaxPool" if op == "maxpool" else "AveragePool", [src(layer)], [out],
                                          name=out, **kw))
        elif op == "gap":
            pooled = out if a.get("keepdims") else f"{out}_pooled"
            nodes.append(helper.make_node("GlobalAveragePool", [src(layer)], [pooled], name=out))
            if not a.get("keepdims"):
                nodes.append(helper.make_node("Flatten", [pooled], [out], axis=1))
        elif op == "lrn":
            nodes.append(helper.make_node("LRN", [src(layer)], [out], name=out, size=int(a.get("size", 5)),
                                          alpha=float(a.get("alpha", 1e-4)), beta=float(a.get("beta", 0.75)),
                                          bias=float(a.get("k", 2.0))))
        elif op == "flatten":
            nodes.append(helper.make_node("Flatten", [src(layer)], [out], name=out, axis=1))
        elif op == "softmax":
            nodes.append(helper.make_node("Softmax", [src(layer)], [out], name=out, axis=1))
        elif op == "concat":
            nodes.append(helper.make_node("Concat", [src(layer, i) for i in range(len(layer.inputs))], [out],
                                          name=out, axis=1))
        elif op == "add":
            nodes.append(helper.make_node("Sum", [src(layer, i) for i in range(len(layer.inputs))], [out], name=out))
        else:  # relu, identity
            nodes.append(helper.make_node({"relu": "Relu", "identity": "Identity"}[op], [src(layer)], [out],
                                          name=out))
    out_shape = [1] + list(shapes[model.output])
    graph = helper.make_graph(nodes, model.name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1] + list(model.input_shape))],
                              [helper.make_tensor_value_info(model.output, TensorProto.FLOAT, out_shape)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="mpicdc")
    target = os.fspath(path)
    onnx.save(proto, target)
    return target

