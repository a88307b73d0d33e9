"""Layer specs, model graphs and the model zoo.

A model is a graph of :class:`Layer` specs in topological order, not a forward
function: the same graph drives the serial reference forward, the weight
preparation tool and the distributed runtime.  Linear layers (``conv`` and
``dense``) own a GEMM weight matrix with one row per output channel; every
other op is a parameter-free nonlinear step that runs on the master.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable

LINEAR_OPS = ("conv", "dense")
NONLINEAR_OPS = ("relu", "maxpool", "avgpool", "gap", "lrn", "flatten", "softmax",
                 "concat", "add", "batchnorm", "identity", "clip", "gmp", "hardsigmoid",
                 "hardswish", "channel_shuffle", "pad", "slice")
ALL_OPS = LINEAR_OPS + NONLINEAR_OPS


class UnknownModelError(ValueError):
    """Raised for a model name that is not in the zoo; the message lists the known ones."""


@dataclass(frozen=True)
class Layer:
    """One node of a model graph.

    Parameters
    ----------
    name : unique layer name, also the key of its weights.
    op : one of :data:`ALL_OPS`.
    inputs : names of the layers feeding this one (``"input"`` is the model input).
    attrs : op attributes (JSON-serialisable: ints, floats, lists, strings).
    """

    name: str
    op: str
    inputs: tuple
    attrs: dict = field(default_factory=dict, hash=False, compare=True)

    @property
    def is_linear(self) -> bool:
        return self.op in LINEAR_OPS

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs), "attrs": self.attrs}

    @classmethod
    def from_dict(cls, d: dict) -> "Layer":
        unknown = set(d) - {"name", "op", "inputs", "attrs"}
        if unknown:
            raise ValueError(f"layer spec has unknown keys {sorted(unknown)}")
        return cls(d["name"], d["op"], tuple(d["inputs"]), dict(d.get("attrs", {})))


@dataclass(frozen=True)
class Model:
    """A model graph: input shape (no batch axis), layers in topological order, output layer."""

    name: str
    input_shape: tuple
    layers: tuple
    description: str = ""

    def __post_init__(self):
        seen = {"input"}
        for layer in self.layers:
            if layer.op not in ALL_OPS:
                raise ValueError(f"layer {layer.name!r}: unknown op {layer.op!r}; known ops: {', '.join(ALL_OPS)}")
            if layer.name in seen:
                raise ValueError(f"duplicate layer name {layer.name!r} in model {self.name!r}")
            missing = [i for i in layer.inputs if i not in seen]
            if missing:
                raise ValueError(f"layer {layer.name!r} reads {missing} before they are defined")
            seen.add(layer.name)
        # derived data (shapes, readers), computed on first use: the graph is immutable
        object.__setattr__(self, "_derived", {})

    def _memo(self, key: str, compute: Callable):
        """The value ``compute()`` for ``key``, computed once per model and stored on it."""
        derived = self._derived
        if key not in derived:
            derived[key] = compute()
        return derived[key]

    @property
    def output(self) -> str:
        return self.layers[-1].name

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"model {self.name!r} has no layer {name!r}")

    @property
    def linear_layers(self) -> list:
        return [layer for layer in self.layers if layer.is_linear]

    def shapes(self) -> dict:
        """Output shape (no batch axis) of every layer, plus ``"input"``.

        Computed once per model; each call returns a new dict (of tuples), so
        callers may modify it without affecting the model.
        """
        return dict(self._memo("shapes", self._infer_shapes))

    def _infer_shapes(self) -> dict:
        shapes = {"input": tuple(self.input_shape)}
        for layer in self.layers:
            shapes[layer.name] = infer_shape(layer, [shapes[i] for i in layer.inputs])
        return shapes

    def weight_shapes(self) -> dict:
        """``{layer: (rows, cols)}`` of every linear layer's GEMM weight matrix.

        Computed once per model; each call returns a new dict, as :meth:`shapes`.
        """
        return dict(self._memo("weight_shapes", self._weight_shapes))

    def _weight_shapes(self) -> dict:
        shapes = self._memo("shapes", self._infer_shapes)
        out = {}
        for layer in self.linear_layers:
            in_shape = shapes[layer.inputs[0]]
            if layer.op == "dense":
                out[layer.name] = (layer.attrs["out"], math.prod(in_shape))
            else:
                groups = conv_groups(layer, in_shape[0])
                out[layer.name] = (layer.attrs["out"], in_shape[0] // groups * math.prod(layer.attrs["kernel"]))
        return out

    def readers(self) -> dict:
        """``{name: (layer, ...)}``: the layers reading each activation (``"input"`` included), in order.

        Activations nobody reads (the output) are absent.  Computed once per
        model; the mapping is read-only, the tuples immutable.
        """
        return self._memo("readers", self._readers)

    def _readers(self):
        readers: dict = {}
        for layer in self.layers:
            for name in dict.fromkeys(layer.inputs):
                readers.setdefault(name, []).append(layer)
        return MappingProxyType({name: tuple(layers) for name, layers in readers.items()})

    def flops(self) -> dict:
        """Multiply-add FLOPs (2 per MAC) of every linear layer at batch 1."""
        shapes = self.shapes()
        return {name: 2 * rows * cols * _spatial_size(shapes[name])
                for name, (rows, cols) in self.weight_shapes().items()}

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "input_shape": list(self.input_shape),
                           "description": self.description,
                           "layers": [layer.to_dict() for layer in self.layers]})

    @classmethod
    def from_json(cls, text: str) -> "Model":
        d = json.loads(text)
        return cls(d["name"], tuple(d["input_shape"]),
                   tuple(Layer.from_dict(x) for x in d["layers"]), d.get("description", ""))


def _spatial_size(shape) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _window_out(size, kernel, stride, pad, name):
    begin, end = pad
    out = (size + begin + end - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"layer {name!r}: window {kernel} (stride {stride}, pad {begin},{end}) "
                         f"does not fit input extent {size}")
    return out


def _expand(value, ndim):
    return [value] * ndim if isinstance(value, int) else list(value)


def pad_pairs(value, nd: int, name: str = "?") -> list:
    """``[(begin, end)] * nd`` from a padding attribute.

    Accepted forms: an int (same on every side), a list of ``nd`` ints
    (symmetric per axis) or a list of ``nd`` ``[begin, end]`` pairs.
    """
    if isinstance(value, int):
        return [(value, value)] * nd
    value = list(value)
    if len(value) != nd:
        raise ValueError(f"layer {name!r}: padding {value} needs {nd} entries (an int or a "
                         f"[begin, end] pair per spatial axis)")
    pairs = []
    for v in value:
        if isinstance(v, int):
            pairs.append((v, v))
        elif len(v) == 2 and all(isinstance(e, int) for e in v):
            pairs.append((int(v[0]), int(v[1])))
        else:
            raise ValueError(f"layer {name!r}: padding entry {v!r} is neither an int nor a [begin, end] pair")
    if any(min(p) < 0 for p in pairs):
        raise ValueError(f"layer {name!r}: negative padding {value}")
    return pairs


def conv_groups(layer: Layer, in_channels: int) -> int:
    """The ``groups`` of a conv layer, checked: it must divide the input and output channels."""
    groups = int(layer.attrs.get("groups", 1))
    out = layer.attrs["out"]
    if groups < 1 or in_channels % groups or out % groups:
        raise ValueError(f"conv {layer.name!r}: groups={groups} must divide its {in_channels} input "
                         f"and {out} output channels")
    return groups


def infer_shape(layer: Layer, in_shapes: list) -> tuple:
    """Output shape of ``layer`` given its input shapes (no batch axis)."""
    a, op = layer.attrs, layer.op
    x = in_shapes[0] if in_shapes else None
    if op in ("conv", "maxpool", "avgpool"):
        nd = len(x) - 1
        if op == "conv":
            conv_groups(layer, x[0])
        k, s = (_expand(a.get(key, d), nd) for key, d in
                (("kernel", 1), ("stride", 1 if op == "conv" else a["kernel"])))
        p = pad_pairs(a.get("padding", 0), nd, layer.name)
        spatial = tuple(_window_out(x[i + 1], k[i], s[i], p[i], layer.name) for i in range(nd))
        return ((a["out"] if op == "conv" else x[0]),) + spatial
    if op == "dense":
        return (a["out"],)
    if op in ("gap", "gmp"):
        return (x[0],) + ((1,) * (len(x) - 1) if a.get("keepdims") else ())
    if op == "flatten":
        return (math.prod(x),)
    if op == "concat":
        rest = {tuple(s[1:]) for s in in_shapes}
        if len(rest) != 1:
            raise ValueError(f"concat {layer.name!r}: inputs {in_shapes} differ beyond the channel axis")
        return (sum(s[0] for s in in_shapes),) + tuple(in_shapes[0][1:])
    if op == "add":
        if len({tuple(s) for s in in_shapes}) != 1:
            raise ValueError(f"add {layer.name!r}: input shapes {in_shapes} differ")
        return tuple(x)
    if op == "channel_shuffle":
        if x[0] % a["groups"]:
            raise ValueError(f"channel_shuffle {layer.name!r}: groups={a['groups']} does not divide "
                             f"{x[0]} channels")
        return tuple(x)
    if op == "pad":
        pads = pad_pairs(a["pads"], len(x), layer.name)
        return tuple(n + b + e for n, (b, e) in zip(x, pads))
    if op == "slice":
        start, stop = a["start"], a["stop"]
        if not 0 <= start < stop <= x[0]:
            raise ValueError(f"slice {layer.name!r}: channels {start}:{stop} outside 0:{x[0]}")
        return (stop - start,) + tuple(x[1:])
    return tuple(x)  # relu, lrn, softmax, batchnorm, identity, clip, hard-sigmoid/-swish keep the shape


class GraphBuilder:
    """Small helper to write zoo graphs: each method appends a layer and returns its name."""

    def __init__(self, name: str, input_shape: tuple, description: str = ""):
        self.name, self.input_shape, self.description = name, tuple(input_shape), description
        self.layers: list = []
        self._count: dict = {}

    def _add(self, op, inputs, name=None, **attrs):
        if name is None:
            self._count[op] = self._count.get(op, 0) + 1
            name = f"{op}{self._count[op]}"
        self.layers.append(Layer(name, op, tuple(inputs), attrs))
        return name

    def conv(self, x, out, kernel, stride=1, padding=0, name=None, groups=1):
        nd = len(self.input_shape) - 1
        attrs = {"out": out, "kernel": _expand(kernel, nd), "stride": _expand(stride, nd),
                 "padding": _expand(padding, nd)}
        if groups != 1:
            attrs["groups"] = groups
        return self._add("conv", [x], name, **attrs)

    def dense(self, x, out, name=None):
        return self._add("dense", [x], name, out=out)

    def relu(self, x, name=None):
        return self._add("relu", [x], name)

    def maxpool(self, x, kernel, stride=None, padding=0, name=None):
        nd = len(self.input_shape) - 1
        stride = kernel if stride is None else stride
        return self._add("maxpool", [x], name, kernel=_expand(kernel, nd),
                         stride=_expand(stride, nd), padding=_expand(padding, nd))

    def avgpool(self, x, kernel, stride=None, padding=0, name=None):
        nd = len(self.input_shape) - 1
        stride = kernel if stride is None else stride
        return self._add("avgpool", [x], name, kernel=_expand(kernel, nd),
                         stride=_expand(stride, nd), padding=_expand(padding, nd),
                         count_include_pad=False)

    def gap(self, x, name=None, keepdims=False):
        return self._add("gap", [x], name, **({"keepdims": True} if keepdims else {}))

    def gmp(self, x, name=None, keepdims=False):
        return self._add("gmp", [x], name, **({"keepdims": True} if keepdims else {}))

    def clip(self, x, low, high, name=None):
        return self._add("clip", [x], name, min=low, max=high)

    def relu6(self, x, name=None):
        return self.clip(x, 0.0, 6.0, name=name)

    def hardsigmoid(self, x, alpha=1 / 6, beta=0.5, name=None):
        """``clip(alpha * x + beta, 0, 1)``; the defaults are torch's (ONNX's alpha is 0.2)."""
        return self._add("hardsigmoid", [x], name, alpha=alpha, beta=beta)

    def hardswish(self, x, name=None):
        return self._add("hardswish", [x], name)

    def channel_shuffle(self, x, groups, name=None):
        return self._add("channel_shuffle", [x], name, groups=groups)

    def pad(self, x, pads, value=0.0, name=None):
        """Constant padding; ``pads`` is one ``[begin, end]`` (or int) per axis, channel axis first."""
        return self._add("pad", [x], name, pads=[list(p) if not isinstance(p, int) else p for p in pads],
                         value=value)

    def slice(self, x, start, stop, name=None):
        """Channels ``start:stop`` of ``x``."""
        return self._add("slice", [x], name, start=start, stop=stop)

    def lrn(self, x, size=5, alpha=1e-4, beta=0.75, k=2.0, name=None):
        return self._add("lrn", [x], name, size=size, alpha=alpha, beta=beta, k=k)

    def flatten(self, x, name=None):
        return self._add("flatten", [x], name)

    def softmax(self, x, name=None):
        return self._add("softmax", [x], name)

    def concat(self, xs, name=None):
        return self._add("concat", xs, name)

    def add(self, xs, name=None):
        return self._add("add", xs, name)

    def conv_relu(self, x, out, kernel, stride=1, padding=0, name=None, groups=1):
        c = self.conv(x, out, kernel, stride, padding, name=name, groups=groups)
        return self.relu(c, name=None if name is None else f"{name}_relu")

    def classifier(self, x, hidden, classes, first_index):
        """Flatten, then dense+ReLU layers of widths ``hidden`` and a ``classes``-way softmax head.

        Dense layers are named ``fc{first_index}``, ``fc{first_index + 1}``, ...; the output is ``prob``.
        """
        x = self.flatten(x, name="flatten")
        for i, width in enumerate(hidden):
            name = f"fc{first_index + i}"
            x = self.relu(self.dense(x, width, name=name), name=f"{name}_relu")
        x = self.dense(x, classes, name=f"fc{first_index + len(hidden)}")
        return self.softmax(x, name="prob")

    def build(self) -> Model:
        return Model(self.name, self.input_shape, tuple(self.layers), self.description)


_ZOO: dict = {}


def register(name: str) -> Callable:
    """Decorator adding a zero-argument model factory to the zoo under ``name``."""
    def wrap(factory):
        _ZOO[name] = factory
        return factory
    return wrap


def model_names() -> list:
    return sorted(_ZOO)


def get_model(name: str) -> Model:
    """Build the zoo model ``name``; unknown names raise :class:`UnknownModelError` listing the zoo."""
    try:
        factory = _ZOO[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(model_names())}") from None
    return factory()


@register("tiny")
def tiny() -> Model:
    """A few small layers covering every op kind, including a branch (concat) and a residual (add)."""
    b = GraphBuilder("tiny", (3, 16, 16), "test model: conv, branches, residual, LRN, pools, fc")
    x = b.conv_relu("input", 8, 3, padding=1, name="conv1")
    x = b.lrn(x, size=3, name="lrn1")
    left = b.conv(x, 6, 1, name="branch_a")
    right = b.conv(x, 6, 3, padding=1, name="branch_b")
    x = b.relu(b.concat([left, right], name="concat1"), name="concat1_relu")
    x = b.maxpool(x, 2, name="pool1")
    skip = b.conv(x, 12, 1, name="proj")
    y = b.conv_relu(b.relu(skip, name="proj_relu"), 12, 3, padding=1, name="conv2")
    x = b.relu(b.add([skip, y], name="add1"), name="add1_relu")
    x = b.avgpool(x, 2, name="pool2")
    x = b.flatten(x, name="flatten")
    x = b.dense(x, 32, name="fc1")
    x = b.relu(x, name="fc1_relu")
    x = b.dense(x, 10, name="fc2")
    b.softmax(x, name="prob")
    return b.build()


@register("lenet")
def lenet() -> Model:
    """LeNet-5 style network for 1x28x28 MNIST digits."""
    b = GraphBuilder("lenet", (1, 28, 28), "LeNet-5 for MNIST (ReLU, max pooling)")
    x = b.conv_relu("input", 6, 5, padding=2, name="conv1")
    x = b.maxpool(x, 2, name="pool1")
    x = b.conv_relu(x, 16, 5, name="conv2")
    x = b.maxpool(x, 2, name="pool2")
    b.classifier(x, (120, 84), 10, first_index=1)
    return b.build()


@register("alexnet")
def alexnet() -> Model:
    """AlexNet (Krizhevsky et al. 2012) with LRN, single tower (no grouped convolutions)."""
    return _alexnet("alexnet", "AlexNet with local response normalisation, single tower", groups=1)


def _alexnet(name: str, description: str, groups: int) -> Model:
    """AlexNet with LRN on 3x224x224; conv2, conv4 and conv5 have ``groups`` (the paper's towers: 2)."""
    b = GraphBuilder(name, (3, 224, 224), description)
    x = b.conv_relu("input", 96, 11, stride=4, padding=2, name="conv1")
    x = b.lrn(x, size=5, alpha=1e-4, beta=0.75, k=2.0, name="norm1")
    x = b.maxpool(x, 3, stride=2, name="pool1")
    x = b.conv_relu(x, 256, 5, padding=2, name="conv2", groups=groups)
    x = b.lrn(x, size=5, alpha=1e-4, beta=0.75, k=2.0, name="norm2")
    x = b.maxpool(x, 3, stride=2, name="pool2")
    x = b.conv_relu(x, 384, 3, padding=1, name="conv3")
    x = b.conv_relu(x, 384, 3, padding=1, name="conv4", groups=groups)
    x = b.conv_relu(x, 256, 3, padding=1, name="conv5", groups=groups)
    x = b.maxpool(x, 3, stride=2, name="pool5")
    b.classifier(x, (4096, 4096), 1000, first_index=6)
    return b.build()


@register("vgg16")
def vgg16() -> Model:
    """VGG16 (Simonyan and Zisserman 2015), configuration D."""
    b = GraphBuilder("vgg16", (3, 224, 224), "VGG16, configuration D, 1000 ImageNet classes")
    x = "input"
    for stage, (width, depth) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], 1):
        for i in range(1, depth + 1):
            x = b.conv_relu(x, width, 3, padding=1, name=f"conv{stage}_{i}")
        x = b.maxpool(x, 2, name=f"pool{stage}")
    b.classifier(x, (4096, 4096), 1000, first_index=6)
    return b.build()


@register("c3d")
def c3d() -> Model:
    """C3D (Tran et al. 2015): 3-D convolutions over a 3x16x112x112 clip, fc6/fc7 of 4096."""
    b = GraphBuilder("c3d", (3, 16, 112, 112), "C3D for video clips, 487 Sports-1M classes")
    x = b.conv_relu("input", 64, 3, padding=1, name="conv1a")
    x = b.maxpool(x, (1, 2, 2), name="pool1")
    x = b.conv_relu(x, 128, 3, padding=1, name="conv2a")
    x = b.maxpool(x, 2, name="pool2")
    for stage, width in ((3, 256), (4, 512), (5, 512)):
        x = b.conv_relu(x, width, 3, padding=1, name=f"conv{stage}a")
        x = b.conv_relu(x, width, 3, padding=1, name=f"conv{stage}b")
        x = b.maxpool(x, 2, padding=(0, 1, 1) if stage == 5 else 0, name=f"pool{stage}")
    b.classifier(x, (4096, 4096), 487, first_index=6)
    return b.build()


@register("actionrec")
def actionrec() -> Model:
    """Small 3-D CNN for extreme low-resolution activity recognition (16 frames of 12x16 pixels)."""
    b = GraphBuilder("actionrec", (3, 16, 12, 16),
                     "3-D CNN for extreme low-resolution video, in the spirit of Ryoo et al. (AAAI 2018)")
    x = b.conv_relu("input", 32, 3, padding=1, name="conv1")
    x = b.maxpool(x, (1, 2, 2), name="pool1")
    x = b.conv_relu(x, 64, 3, padding=1, name="conv2")
    x = b.maxpool(x, 2, name="pool2")
    x = b.conv_relu(x, 128, 3, padding=1, name="conv3")
    x = b.maxpool(x, 2, name="pool3")
    b.classifier(x, (512, 256), 10, first_index=4)
    return b.build()


@register("inception_v3")
def inception_v3() -> Model:
    """Inception v3 (Szegedy et al. 2016) as in torchvision, for 3x299x299 inputs, without AuxLogits.

    Every BasicConv2d (conv, BatchNorm, ReLU) is a conv with bias (BatchNorm folded) and a ReLU.
    The branch pools are 3x3 stride-1 average pools that count the padding, as torchvision's
    ``F.avg_pool2d(x, 3, 1, 1)`` does.  Factorised 1x7 / 7x1 and 1x3 / 3x1 convolutions keep
    asymmetric kernels and padding.
    """
    b = GraphBuilder("inception_v3", (3, 299, 299),
                     "Inception v3 (torchvision layout, BatchNorm folded, no auxiliary head)")

    def conv(x, out, kernel, name, stride=1, padding=0):
        return b.conv_relu(x, out, kernel, stride=stride, padding=padding, name=name)

    def branch_pool(x, name):
        return b._add("avgpool", [x], f"{name}_pool", kernel=[3, 3], stride=[1, 1], padding=[1, 1],
                      count_include_pad=True)

    def block_a(x, name, pool_features):
        b1 = conv(x, 64, 1, f"{name}_1x1")
        b5 = conv(conv(x, 48, 1, f"{name}_5x5_1"), 64, 5, f"{name}_5x5_2", padding=2)
        b3 = conv(conv(x, 64, 1, f"{name}_3x3dbl_1"), 96, 3, f"{name}_3x3dbl_2", padding=1)
        b3 = conv(b3, 96, 3, f"{name}_3x3dbl_3", padding=1)
        bp = conv(branch_pool(x, name), pool_features, 1, f"{name}_pool_proj")
        return b.concat([b1, b5, b3, bp], name=f"{name}_concat")

    def block_b(x, name):
        b3 = conv(x, 384, 3, f"{name}_3x3", stride=2)
        bd = conv(conv(x, 64, 1, f"{name}_3x3dbl_1"), 96, 3, f"{name}_3x3dbl_2", padding=1)
        bd = conv(bd, 96, 3, f"{name}_3x3dbl_3", stride=2)
        bp = b.maxpool(x, 3, stride=2, name=f"{name}_pool")
        return b.concat([b3, bd, bp], name=f"{name}_concat")

    def block_c(x, name, c7):
        b1 = conv(x, 192, 1, f"{name}_1x1")
        b7 = conv(x, c7, 1, f"{name}_7x7_1")
        b7 = conv(b7, c7, (1, 7), f"{name}_7x7_2", padding=(0, 3))
        b7 = conv(b7, 192, (7, 1), f"{name}_7x7_3", padding=(3, 0))
        bd = conv(x, c7, 1, f"{name}_7x7dbl_1")
        bd = conv(bd, c7, (7, 1), f"{name}_7x7dbl_2", padding=(3, 0))
        bd = conv(bd, c7, (1, 7), f"{name}_7x7dbl_3", padding=(0, 3))
        bd = conv(bd, c7, (7, 1), f"{name}_7x7dbl_4", padding=(3, 0))
        bd = conv(bd, 192, (1, 7), f"{name}_7x7dbl_5", padding=(0, 3))
        bp = conv(branch_pool(x, name), 192, 1, f"{name}_pool_proj")
        return b.concat([b1, b7, bd, bp], name=f"{name}_concat")

    def block_d(x, name):
        b3 = conv(conv(x, 192, 1, f"{name}_3x3_1"), 320, 3, f"{name}_3x3_2", stride=2)
        b7 = conv(x, 192, 1, f"{name}_7x7x3_1")
        b7 = conv(b7, 192, (1, 7), f"{name}_7x7x3_2", padding=(0, 3))
        b7 = conv(b7, 192, (7, 1), f"{name}_7x7x3_3", padding=(3, 0))
        b7 = conv(b7, 192, 3, f"{name}_7x7x3_4", stride=2)
        bp = b.maxpool(x, 3, stride=2, name=f"{name}_pool")
        return b.concat([b3, b7, bp], name=f"{name}_concat")

    def block_e(x, name):
        b1 = conv(x, 320, 1, f"{name}_1x1")
        b3 = conv(x, 384, 1, f"{name}_3x3_1")
        b3 = b.concat([conv(b3, 384, (1, 3), f"{name}_3x3_2a", padding=(0, 1)),
                       conv(b3, 384, (3, 1), f"{name}_3x3_2b", padding=(1, 0))], name=f"{name}_3x3_cat")
        bd = conv(conv(x, 448, 1, f"{name}_3x3dbl_1"), 384, 3, f"{name}_3x3dbl_2", padding=1)
        bd = b.concat([conv(bd, 384, (1, 3), f"{name}_3x3dbl_3a", padding=(0, 1)),
                       conv(bd, 384, (3, 1), f"{name}_3x3dbl_3b", padding=(1, 0))],
                      name=f"{name}_3x3dbl_cat")
        bp = conv(branch_pool(x, name), 192, 1, f"{name}_pool_proj")
        return b.concat([b1, b3, bd, bp], name=f"{name}_concat")

    x = conv("input", 32, 3, "Conv2d_1a_3x3", stride=2)
    x = conv(x, 32, 3, "Conv2d_2a_3x3")
    x = conv(x, 64, 3, "Conv2d_2b_3x3", padding=1)
    x = b.maxpool(x, 3, stride=2, name="maxpool1")
    x = conv(x, 80, 1, "Conv2d_3b_1x1")
    x = conv(x, 192, 3, "Conv2d_4a_3x3")
    x = b.maxpool(x, 3, stride=2, name="maxpool2")
    x = block_a(x, "Mixed_5b", 32)
    x = block_a(x, "Mixed_5c", 64)
    x = block_a(x, "Mixed_5d", 64)
    x = block_b(x, "Mixed_6a")
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        x = block_c(x, name, c7)
    x = block_d(x, "Mixed_7a")
    x = block_e(x, "Mixed_7b")
    x = block_e(x, "Mixed_7c")
    x = b.gap(x, name="avgpool")
    x = b.dense(x, 1000, name="fc")
    b.softmax(x, name="prob")
    return b.build()


@register("alexnet_2tower")
def alexnet_2tower() -> Model:
    """AlexNet as in the paper (Krizhevsky et al. 2012): two towers, i.e. conv2, conv4 and conv5 grouped by 2.

    Same layers and 3x224x224 input as the single-tower ``alexnet``; conv3 and the
    fully connected layers read both towers, as in the paper.
    """
    return _alexnet("alexnet_2tower", "AlexNet with LRN, two towers (groups=2 in conv2, conv4, conv5)", groups=2)


def _resnet(name: str, description: str, stages, residual) -> Model:
    """A ResNet on 3x224x224 in torchvision's layout, BatchNorm folded into the convs (biases).

    Stem (7x7/2 conv + ReLU, 3x3/2 max pool), then per stage ``(repeats, width)`` blocks
    ``relu(residual(x) + skip(x))`` (the first block of stages 2+ has stride 2; ``skip`` is
    a 1x1 strided conv when the shape changes, else ``x``), global pool, fc 1000, softmax.
    ``residual(b, x, width, stride, name)`` adds a block's convs and returns ``(y, out channels)``.
    """
    b = GraphBuilder(name, (3, 224, 224), description)
    x = b.conv_relu("input", 64, 7, stride=2, padding=3, name="conv1")
    x = b.maxpool(x, 3, stride=2, padding=1, name="maxpool")
    channels = 64
    for stage, (repeats, width) in enumerate(stages, 1):
        for block in range(repeats):
            name = f"layer{stage}_{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            y, out = residual(b, x, width, stride, name)
            skip = b.conv(x, out, 1, stride=stride, name=f"{name}_downsample") if stride != 1 or channels != out else x
            x = b.relu(b.add([y, skip], name=f"{name}_add"), name=f"{name}_relu")
            channels = out
    x = b.gap(x, name="avgpool")
    b.softmax(b.dense(x, 1000, name="fc"), name="prob")
    return b.build()


def _basic_block(b, x, width, stride, name):
    """ResNet-18/34: 3x3 (stride) + ReLU, 3x3."""
    y = b.conv_relu(x, width, 3, stride=stride, padding=1, name=f"{name}_conv1")
    return b.conv(y, width, 3, padding=1, name=f"{name}_conv2"), width


def _bottleneck(b, x, width, stride, name):
    """ResNet-50 v1.5: 1x1 reduce + ReLU, 3x3 (stride) + ReLU, 1x1 expand to 4x width."""
    y = b.conv_relu(x, width, 1, name=f"{name}_conv1")
    y = b.conv_relu(y, width, 3, stride=stride, padding=1, name=f"{name}_conv2")
    return b.conv(y, 4 * width, 1, name=f"{name}_conv3"), 4 * width


@register("resnet18")
def resnet18() -> Model:
    """ResNet-18 (He et al. 2016) in torchvision's layout, BatchNorm folded into the convs (biases)."""
    return _resnet("resnet18", "ResNet-18 (torchvision layout, BatchNorm folded)",
                   ((2, 64), (2, 128), (2, 256), (2, 512)), _basic_block)


@register("resnet50")
def resnet50() -> Model:
    """ResNet-50 (He et al. 2016) in torchvision's layout (v1.5: stride in the 3x3 conv), BatchNorm folded."""
    return _resnet("resnet50", "ResNet-50 v1.5 (torchvision layout, BatchNorm folded)",
                   ((3, 64), (4, 128), (6, 256), (3, 512)), _bottleneck)


@register("mobilenet_v2")
def mobilenet_v2() -> Model:
    """MobileNetV2 (Sandler et al. 2018), width 1.0, torchvision's layout, BatchNorm folded.

    Inverted residual blocks: 1x1 expansion + ReLU6, 3x3 depthwise conv (groups =
    channels) + ReLU6, 1x1 linear projection, plus the input when shapes allow.
    """
    b = GraphBuilder("mobilenet_v2", (3, 224, 224), "MobileNetV2 1.0 (torchvision layout, BatchNorm folded)")
    x = b.relu6(b.conv("input", 32, 3, stride=2, padding=1, name="features0"), name="features0_relu6")
    width, index = 32, 1
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            name, stride, hidden = f"features{index}", s if i == 0 else 1, width * t
            y = x
            if t != 1:
                y = b.relu6(b.conv(y, hidden, 1, name=f"{name}_expand"), name=f"{name}_expand_relu6")
            y = b.conv(y, hidden, 3, stride=stride, padding=1, groups=hidden, name=f"{name}_dw")
            y = b.conv(b.relu6(y, name=f"{name}_dw_relu6"), c, 1, name=f"{name}_project")
            x = b.add([x, y], name=f"{name}_add") if stride == 1 and width == c else y
            width, index = c, index + 1
    x = b.relu6(b.conv(x, 1280, 1, name=f"features{index}"), name=f"features{index}_relu6")
    x = b.gap(x, name="avgpool")
    b.softmax(b.dense(x, 1000, name="classifier"), name="prob")
    return b.build()


@register("shufflenet_v2")
def shufflenet_v2() -> Model:
    """ShuffleNetV2 x1.0 (Ma et al. 2018), torchvision's layout, BatchNorm folded.

    A stride-1 unit splits the channels in halves (``slice``), transforms the second
    (1x1 + ReLU, 3x3 depthwise, 1x1 + ReLU), concatenates and shuffles with 2 groups;
    a stride-2 unit transforms the whole input in two branches.
    """
    b = GraphBuilder("shufflenet_v2", (3, 224, 224), "ShuffleNetV2 x1.0 (torchvision layout, BatchNorm folded)")
    x = b.conv_relu("input", 24, 3, stride=2, padding=1, name="conv1")
    x = b.maxpool(x, 3, stride=2, padding=1, name="maxpool")
    width = 24
    for stage, (repeats, out) in enumerate(((4, 116), (8, 232), (4, 464)), 2):
        half = out // 2
        for i in range(repeats):
            name = f"stage{stage}_{i}"
            if i == 0:
                left = b.conv(x, width, 3, stride=2, padding=1, groups=width, name=f"{name}_b1_dw")
                left = b.conv_relu(left, half, 1, name=f"{name}_b1_pw")
                right = x
            else:
                left = b.slice(x, 0, half, name=f"{name}_left")
                right = b.slice(x, half, out, name=f"{name}_right")
            stride = 2 if i == 0 else 1
            right = b.conv_relu(right, half, 1, name=f"{name}_b2_pw1")
            right = b.conv(right, half, 3, stride=stride, padding=1, groups=half, name=f"{name}_b2_dw")
            right = b.conv_relu(right, half, 1, name=f"{name}_b2_pw2")
            x = b.channel_shuffle(b.concat([left, right], name=f"{name}_concat"), 2, name=f"{name}_shuffle")
            width = out
    x = b.conv_relu(x, 1024, 1, name="conv5")
    x = b.gap(x, name="avgpool")
    b.softmax(b.dense(x, 1000, name="fc"), name="prob")
    return b.build()
