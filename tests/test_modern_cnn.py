"""Modern CNN ops and zoo models (issue 12) against PyTorch.

Ops: grouped and depthwise convolutions (2-D, 3-D, any row block), asymmetric
pads, ReLU6 (clip), hard-sigmoid, hard-swish, global max pooling, channel
shuffle, constant Pad, channel slices, N-input add, a conv on the 1x1 output
of a global pool.  Models: ``resnet18``, ``resnet50``, ``mobilenet_v2``, ``shufflenet_v2``
and ``alexnet_2tower``, each against a twin written here with ``torch.nn``
modules (torchvision is not used): convolutions followed by BatchNorm with
random running statistics (eval mode), which the test folds into the mpicdc
conv weights and biases, as a BatchNorm-folding importer would.  Every layer's
output must match the twin's to ``RTOL`` relative error (max abs difference /
max abs torch value), the tolerance of tests/test_reference.py.
"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: pip install torch==2.13.0")
nn, F = torch.nn, torch.nn.functional

from mpicdc.core import kernels as K  # noqa: E402
from mpicdc.core.models import GraphBuilder, Layer, get_model  # noqa: E402
from mpicdc.sim.engine import nonlinear_work  # noqa: E402
from test_reference import _one_torch_thread, rel_err  # noqa: E402, F401 -- the same fixture and measure

RTOL = 1e-4
RNG = np.random.default_rng(2024)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))[None]


def conv(out, kernel, stride=1, padding=0, groups=1, name="c"):
    nd = len(kernel)
    return Layer(name, "conv", ("input",), {"out": out, "kernel": list(kernel), "stride": [stride] * nd,
                                             "padding": padding, "groups": groups})


# ---------------------------------------------------------------- grouped and depthwise convolutions

GROUPED = [
    # (input shape, out, kernel, stride, padding, groups)
    ((4, 9, 8), 6, (3, 3), 1, 1, 2),
    ((6, 11, 10), 9, (3, 3), 2, 1, 3),
    ((8, 12, 12), 8, (3, 3), 1, 1, 8),            # depthwise
    ((8, 12, 12), 16, (3, 3), 2, 1, 8),           # depthwise, multiplier 2
    ((4, 5, 6, 7), 6, (3, 3, 3), 1, 1, 2),        # 3-D grouped
    ((6, 4, 6, 6), 6, (1, 3, 3), 2, [0, 1, 1], 6),  # 3-D depthwise, strided
]


@pytest.mark.parametrize("shape,out,kernel,stride,padding,groups", GROUPED)
def test_grouped_conv_matches_torch_for_any_row_block(shape, out, kernel, stride, padding, groups):
    """The whole layer, every block of whole groups, a block cutting a group, a zero-padded last block."""
    x, W, b = rand(*shape), rand(out, shape[0] // groups, *kernel), rand(out)
    layer = conv(out, kernel, stride, padding, groups)
    fn = F.conv2d if len(kernel) == 2 else F.conv3d
    want = fn(t(x), torch.from_numpy(W), torch.from_numpy(b), stride=stride,
              padding=padding if isinstance(padding, int) else tuple(padding), groups=groups)[0].numpy()
    Wm = W.reshape(out, -1)
    got = K.linear_forward(layer, Wm, b, x)
    assert got.shape == want.shape
    assert rel_err(got, want) <= RTOL
    lo = K.lowered_layout(layer, x.shape)
    opg = out // groups
    blocks = [(0, opg), (opg, out), (1, out - 1) if out > 2 else (0, out)]
    for start, stop in blocks:
        Y, lo_block = K.lower_gemm(layer, Wm[start:stop], b[start:stop], x, row0=start)
        assert (lo_block.pitch, lo_block.out_spatial) == (lo.pitch, lo.out_spatial)
        assert rel_err(lo.finish(Y), want[start:stop]) <= RTOL, (start, stop)
    # the last block zero-padded past the layer's rows (as encode_rows pads it): zeros there
    pad_W = np.zeros((opg + 2, Wm.shape[1]), np.float32)
    pad_W[:opg] = Wm[out - opg:]
    pad_b = np.zeros(opg + 2, np.float32)
    pad_b[:opg] = b[out - opg:]
    Y, _ = K.lower_gemm(layer, pad_W, pad_b, x, row0=out - opg, relu=True)
    assert rel_err(lo.finish(Y)[:opg], np.maximum(want[out - opg:], 0)) <= RTOL
    assert not lo.finish(Y)[opg:].any()


def test_grouped_conv_rejects_bad_groups_and_blocks():
    model_layer = conv(6, (3, 3), groups=4)
    with pytest.raises(ValueError, match="groups=4 must divide its 8 input and 6 output"):
        K.linear_forward(model_layer, rand(6, 18), None, rand(8, 5, 5))
    layer = conv(6, (3, 3), padding=1, groups=2)
    with pytest.raises(ValueError, match="reads 18 lowered rows"):
        K.lower_gemm(layer, rand(6, 36), None, rand(4, 5, 5))
    with pytest.raises(ValueError, match="row0=6 outside"):
        K.lower_gemm(layer, rand(2, 18), None, rand(4, 5, 5), row0=6)


def test_grouped_weight_shape_and_flops():
    b = GraphBuilder("g", (8, 10, 10))
    b.conv("input", 16, 3, padding=1, groups=4, name="c")
    model = b.build()
    assert model.weight_shapes()["c"] == (16, 2 * 9)
    assert model.flops()["c"] == 2 * 16 * 18 * 100


# ---------------------------------------------------------------- asymmetric pads

@pytest.mark.parametrize("pads", [[[0, 1], [2, 0]], [[1, 2], 1], [[0, 0], [0, 3]]])
def test_asymmetric_conv_padding_matches_torch(pads):
    x, W, b = rand(3, 9, 8), rand(5, 3, 3, 3), rand(5)
    flat = [v for p in reversed(pads) for v in ((p, p) if isinstance(p, int) else p)]
    want = F.conv2d(F.pad(t(x), flat), torch.from_numpy(W), torch.from_numpy(b), stride=2)[0].numpy()
    layer = conv(5, (3, 3), stride=2, padding=pads)
    got = K.linear_forward(layer, W.reshape(5, -1), b, x)
    assert got.shape == want.shape and K.lowered_layout(layer, x.shape).out_spatial == want.shape[1:]
    assert rel_err(got, want) <= RTOL
    unit = conv(5, (3, 3), stride=1, padding=pads)
    want1 = F.conv2d(F.pad(t(x), flat), torch.from_numpy(W), torch.from_numpy(b))[0].numpy()
    assert rel_err(K.linear_forward(unit, W.reshape(5, -1), b, x), want1) <= RTOL


@pytest.mark.parametrize("op", ["maxpool", "avgpool"])
def test_asymmetric_pool_padding_matches_torch(op):
    """TF-style 'SAME' pads (0 before, 1 after); average pools count only the real cells."""
    x = rand(3, 8, 7) - 1.0
    pads = [[0, 1], [1, 1]]
    layer = Layer("p", op, ("input",), {"kernel": [3, 3], "stride": [2, 2], "padding": pads,
                                        "count_include_pad": False})
    padded = F.pad(t(x), [1, 1, 0, 1], value=-math.inf if op == "maxpool" else 0.0)
    if op == "maxpool":
        want = F.max_pool2d(padded, 3, 2)
    else:
        ones = F.pad(torch.ones_like(t(x)[:, :1]), [1, 1, 0, 1])
        want = F.avg_pool2d(padded, 3, 2) / F.avg_pool2d(ones, 3, 2)
    got = K.nonlinear(layer, [x])
    assert got.shape == tuple(want.shape[1:]) == _shape(layer, x.shape)
    assert rel_err(got, want[0].numpy()) <= 1e-6


def _shape(layer, in_shape):
    from mpicdc.core.models import infer_shape
    return infer_shape(layer, [in_shape])


def test_padding_forms_are_checked():
    with pytest.raises(ValueError, match="needs 2 entries"):
        _shape(conv(4, (3, 3), padding=[1, 1, 1]), (2, 5, 5))
    with pytest.raises(ValueError, match="neither an int nor a"):
        _shape(conv(4, (3, 3), padding=[[1, 2, 3], 1]), (2, 5, 5))


# ---------------------------------------------------------------- elementwise and shape ops

def _op(op, **attrs):
    return Layer("l", op, ("input",), attrs)


@pytest.mark.parametrize("op,attrs,ref", [
    ("clip", {"min": 0.0, "max": 6.0}, F.relu6),
    ("clip", {"min": -1.0, "max": 0.5}, lambda h: torch.clamp(h, -1.0, 0.5)),
    ("hardsigmoid", {}, F.hardsigmoid),
    ("hardsigmoid", {"alpha": 0.2, "beta": 0.5}, lambda h: torch.clamp(0.2 * h + 0.5, 0, 1)),  # ONNX
    ("hardswish", {}, F.hardswish),
])
def test_elementwise_ops_match_torch(op, attrs, ref):
    x = rand(4, 6, 5) * 5
    got = K.nonlinear(_op(op, **attrs), [x])
    assert got.dtype == np.float32 and got.shape == x.shape
    assert rel_err(got, ref(t(x))[0].numpy()) <= 1e-6


@pytest.mark.parametrize("keepdims", [False, True])
def test_global_max_pool_matches_torch(keepdims):
    for shape in ((5, 6, 7), (3, 2, 4, 5)):
        x = rand(*shape)
        want = t(x).amax(dim=tuple(range(2, len(shape) + 1)), keepdim=keepdims)[0].numpy()
        layer = _op("gmp", keepdims=keepdims)
        got = K.nonlinear(layer, [x])
        assert got.shape == want.shape == _shape(layer, shape)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("groups", [2, 3])
def test_channel_shuffle_matches_torch(groups):
    x = rand(12, 3, 4)
    layer = _op("channel_shuffle", groups=groups)
    np.testing.assert_array_equal(K.nonlinear(layer, [x]), F.channel_shuffle(t(x), groups)[0].numpy())
    with pytest.raises(ValueError, match="does not divide 12 channels"):
        _shape(_op("channel_shuffle", groups=5), (12, 3, 4))


def test_constant_pad_matches_torch():
    x = rand(3, 4, 5)
    layer = _op("pad", pads=[[0, 1], [2, 0], 1], value=-0.5)
    want = F.pad(t(x), [1, 1, 2, 0, 0, 1], value=-0.5)[0].numpy()
    got = K.nonlinear(layer, [x])
    assert got.shape == want.shape == _shape(layer, x.shape)
    np.testing.assert_array_equal(got, want)


def test_slice_and_n_input_add():
    x = rand(6, 3, 3)
    layer = _op("slice", start=2, stop=5)
    np.testing.assert_array_equal(K.nonlinear(layer, [x]), x[2:5])
    assert _shape(layer, x.shape) == (3, 3, 3)
    with pytest.raises(ValueError, match="outside 0:6"):
        _shape(_op("slice", start=4, stop=7), x.shape)
    ys = [rand(2, 3) for _ in range(4)]
    add = Layer("a", "add", ("a", "b", "c", "d"))
    want = (t(ys[0]) + t(ys[1]) + t(ys[2]) + t(ys[3]))[0].numpy()
    assert rel_err(K.nonlinear(add, ys), want) <= 1e-6
    from mpicdc.core.models import infer_shape
    assert infer_shape(add, [(2, 3)] * 4) == (2, 3)


def test_conv_on_the_1x1_output_of_a_global_pool():
    """Squeeze-and-excitation style: gap(keepdims) -> 1x1 conv -> hard-sigmoid, through the graph."""
    b = GraphBuilder("se", (8, 6, 6))
    g = b.gap("input", keepdims=True, name="gap")
    c = b.conv(g, 4, 1, name="reduce")
    b.hardsigmoid(b.conv(b.relu(c, name="r"), 8, 1, name="expand"), name="gate")
    model = b.build()
    assert model.shapes()["gap"] == (8, 1, 1) and model.shapes()["gate"] == (8, 1, 1)
    x = rand(8, 6, 6)
    W1, b1, W2, b2 = rand(4, 8), rand(4), rand(8, 4), rand(8)
    got = K.forward(model, {"reduce": (W1, b1), "expand": (W2, b2)}, x)
    h = F.conv2d(F.adaptive_avg_pool2d(t(x), 1), torch.from_numpy(W1.reshape(4, 8, 1, 1)), torch.from_numpy(b1))
    h = F.conv2d(F.relu(h), torch.from_numpy(W2.reshape(8, 4, 1, 1)), torch.from_numpy(b2))
    assert rel_err(got, F.hardsigmoid(h)[0].numpy()) <= RTOL


@pytest.mark.parametrize("op,attrs", [("clip", {"min": 0, "max": 6}), ("hardsigmoid", {}), ("hardswish", {}),
                                      ("gmp", {}), ("channel_shuffle", {"groups": 2}),
                                      ("pad", {"pads": [0, 1, 1]}), ("slice", {"start": 0, "stop": 2})])
def test_simulator_costs_every_new_op(op, attrs):
    layer = _op(op, **attrs)
    out = _shape(layer, (4, 6, 6))
    flops, nbytes = nonlinear_work(op, [(4, 6, 6)], out, attrs)
    assert nbytes > 0 and flops >= 0
    if op in ("clip", "hardsigmoid", "hardswish", "gmp"):
        assert flops > 0


# ---------------------------------------------------------------- zoo models against torch.nn twins

class Twin(nn.Module):
    """A torch model that records every activation under the mpicdc layer name it corresponds to."""

    def __init__(self):
        super().__init__()
        self.m = nn.ModuleDict()
        self.acts = {}

    def conv(self, name, cin, cout, k, stride=1, padding=0, groups=1, bn=True):
        if bn:
            self.m[name] = nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False),
                                         nn.BatchNorm2d(cout))
        else:
            self.m[name] = nn.Conv2d(cin, cout, k, stride, padding, groups=groups)

    def dense(self, name, cin, cout):
        self.m[name] = nn.Linear(cin, cout)

    def rec(self, name, value):
        """Record ``value`` as the output of mpicdc layer ``name``; returns it."""
        self.acts[name] = value
        return value

    def run(self, name, x):
        return self.rec(name, self.m[name](x))

    def folded_weights(self) -> dict:
        """``{layer: (W, b)}`` in mpicdc's layout, BatchNorm folded into the conv before it."""
        out = {}
        with torch.no_grad():
            for name, mod in self.m.items():
                if isinstance(mod, nn.Sequential):
                    c, bn = mod
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    W = c.weight * scale.reshape(-1, *([1] * (c.weight.dim() - 1)))
                    b = bn.bias - bn.running_mean * scale
                else:
                    W, b = mod.weight, mod.bias
                out[name] = (W.reshape(W.shape[0], -1).numpy().astype(np.float32).copy(),
                             b.numpy().astype(np.float32).copy())
        return out


def _randomise(twin: Twin, seed: int):
    """Random BatchNorm statistics (else folding is the identity) and eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in twin.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.weight.copy_(0.5 + torch.rand(n, generator=g))
                mod.bias.copy_(0.1 * torch.randn(n, generator=g))
                mod.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return twin.eval()


class ResNetTwin(Twin):
    """torchvision's ResNet written out: basic blocks (two 3x3) or bottlenecks (1x1, 3x3, 1x1 to 4x, v1.5)."""

    def __init__(self, stages, bottleneck: bool):
        super().__init__()
        self.conv("conv1", 3, 64, 7, 2, 3)
        self.plan, cin = [], 64
        for stage, (repeats, width) in enumerate(stages, 1):
            out = 4 * width if bottleneck else width
            for block in range(repeats):
                name, stride = f"layer{stage}_{block}", 2 if stage > 1 and block == 0 else 1
                if bottleneck:
                    self.conv(f"{name}_conv1", cin, width, 1)
                    self.conv(f"{name}_conv2", width, width, 3, stride, 1)
                    self.conv(f"{name}_conv3", width, out, 1)
                else:
                    self.conv(f"{name}_conv1", cin, out, 3, stride, 1)
                    self.conv(f"{name}_conv2", out, out, 3, 1, 1)
                if stride != 1 or cin != out:
                    self.conv(f"{name}_downsample", cin, out, 1, stride)
                self.plan.append(name)
                cin = out
        self.dense("fc", cin, 1000)

    def forward(self, x):
        x = self.rec("conv1_relu", F.relu(self.run("conv1", x)))
        x = self.rec("maxpool", F.max_pool2d(x, 3, 2, 1))
        for name in self.plan:
            y = self.rec(f"{name}_conv1_relu", F.relu(self.run(f"{name}_conv1", x)))
            if f"{name}_conv3" in self.m:
                y = self.rec(f"{name}_conv2_relu", F.relu(self.run(f"{name}_conv2", y)))
                y = self.run(f"{name}_conv3", y)
            else:
                y = self.run(f"{name}_conv2", y)
            skip = self.run(f"{name}_downsample", x) if f"{name}_downsample" in self.m else x
            x = self.rec(f"{name}_relu", F.relu(self.rec(f"{name}_add", y + skip)))
        x = self.rec("avgpool", F.adaptive_avg_pool2d(x, 1).flatten(1))
        return self.rec("prob", F.softmax(self.run("fc", x), dim=1))


def ResNet18():  # noqa: N802 -- a twin class like the others
    return ResNetTwin(((2, 64), (2, 128), (2, 256), (2, 512)), bottleneck=False)


def ResNet50():  # noqa: N802
    return ResNetTwin(((3, 64), (4, 128), (6, 256), (3, 512)), bottleneck=True)


class MobileNetV2(Twin):
    def __init__(self):
        super().__init__()
        self.conv("features0", 3, 32, 3, 2, 1)
        self.blocks, cin, i = [], 32, 1
        for t_, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
            for j in range(n):
                name, stride, hidden = f"features{i}", s if j == 0 else 1, cin * t_
                if t_ != 1:
                    self.conv(f"{name}_expand", cin, hidden, 1)
                self.conv(f"{name}_dw", hidden, hidden, 3, stride, 1, groups=hidden)
                self.conv(f"{name}_project", hidden, c, 1)
                self.blocks.append((name, stride == 1 and cin == c))
                cin, i = c, i + 1
        self.last = f"features{i}"
        self.conv(self.last, 320, 1280, 1)
        self.dense("classifier", 1280, 1000)

    def forward(self, x):
        x = self.rec("features0_relu6", F.relu6(self.run("features0", x)))
        for name, residual in self.blocks:
            y = x
            if f"{name}_expand" in self.m:
                y = self.rec(f"{name}_expand_relu6", F.relu6(self.run(f"{name}_expand", y)))
            y = self.rec(f"{name}_dw_relu6", F.relu6(self.run(f"{name}_dw", y)))
            y = self.run(f"{name}_project", y)
            x = self.rec(f"{name}_add", x + y) if residual else y
        x = self.rec(f"{self.last}_relu6", F.relu6(self.run(self.last, x)))
        x = self.rec("avgpool", x.mean(dim=(2, 3)))
        return self.rec("prob", F.softmax(self.run("classifier", x), dim=1))


class ShuffleNetV2(Twin):
    def __init__(self):
        super().__init__()
        self.conv("conv1", 3, 24, 3, 2, 1)
        self.units, cin = [], 24
        for stage, (repeats, out) in enumerate(((4, 116), (8, 232), (4, 464)), 2):
            half = out // 2
            for i in range(repeats):
                name = f"stage{stage}_{i}"
                if i == 0:
                    self.conv(f"{name}_b1_dw", cin, cin, 3, 2, 1, groups=cin)
                    self.conv(f"{name}_b1_pw", cin, half, 1)
                self.conv(f"{name}_b2_pw1", cin if i == 0 else half, half, 1)
                self.conv(f"{name}_b2_dw", half, half, 3, 2 if i == 0 else 1, 1, groups=half)
                self.conv(f"{name}_b2_pw2", half, half, 1)
                self.units.append((name, i == 0))
                cin = out
        self.conv("conv5", 464, 1024, 1)
        self.dense("fc", 1024, 1000)

    def forward(self, x):
        x = self.rec("conv1_relu", F.relu(self.run("conv1", x)))
        x = self.rec("maxpool", F.max_pool2d(x, 3, 2, 1))
        for name, down in self.units:
            if down:
                left = self.rec(f"{name}_b1_pw_relu", F.relu(self.run(f"{name}_b1_pw", self.run(f"{name}_b1_dw", x))))
                right = x
            else:
                left, right = x.chunk(2, dim=1)
                self.rec(f"{name}_left", left)
                self.rec(f"{name}_right", right)
            right = self.rec(f"{name}_b2_pw1_relu", F.relu(self.run(f"{name}_b2_pw1", right)))
            right = self.run(f"{name}_b2_dw", right)
            right = self.rec(f"{name}_b2_pw2_relu", F.relu(self.run(f"{name}_b2_pw2", right)))
            x = self.rec(f"{name}_shuffle", F.channel_shuffle(self.rec(f"{name}_concat", torch.cat([left, right], 1)), 2))
        x = self.rec("conv5_relu", F.relu(self.run("conv5", x)))
        x = self.rec("avgpool", x.mean(dim=(2, 3)))
        return self.rec("prob", F.softmax(self.run("fc", x), dim=1))


class AlexNet2Tower(Twin):
    """The paper's AlexNet with LRN; no BatchNorm (the paper has none): plain convs with bias."""

    def __init__(self):
        super().__init__()
        for name, cin, cout, k, s, p, g in (("conv1", 3, 96, 11, 4, 2, 1), ("conv2", 96, 256, 5, 1, 2, 2),
                                            ("conv3", 256, 384, 3, 1, 1, 1), ("conv4", 384, 384, 3, 1, 1, 2),
                                            ("conv5", 384, 256, 3, 1, 1, 2)):
            self.conv(name, cin, cout, k, s, p, groups=g, bn=False)
        self.dense("fc6", 256 * 6 * 6, 4096)
        self.dense("fc7", 4096, 4096)
        self.dense("fc8", 4096, 1000)

    def forward(self, x):
        for i, name in enumerate(("conv1", "conv2", "conv3", "conv4", "conv5"), 1):
            x = self.rec(f"{name}_relu", F.relu(self.run(name, x)))
            if i in (1, 2):
                x = self.rec(f"norm{i}", F.local_response_norm(x, 5, 1e-4, 0.75, 2.0))
            if i in (1, 2, 5):
                x = self.rec(f"pool{i}", F.max_pool2d(x, 3, 2))
        x = self.rec("flatten", x.flatten(1))
        for name in ("fc6", "fc7"):
            x = self.rec(f"{name}_relu", F.relu(self.run(name, x)))
        return self.rec("prob", F.softmax(self.run("fc8", x), dim=1))


TWINS = {"resnet18": ResNet18, "resnet50": ResNet50, "mobilenet_v2": MobileNetV2, "shufflenet_v2": ShuffleNetV2,
         "alexnet_2tower": AlexNet2Tower}


@pytest.mark.parametrize("name", sorted(TWINS))
def test_zoo_model_matches_its_torch_twin_layer_by_layer(name):
    torch.manual_seed(7)
    twin = _randomise(TWINS[name](), seed=8)
    model = get_model(name)
    weights = twin.folded_weights()
    assert set(weights) == {layer.name for layer in model.linear_layers}
    for layer, (rows, cols) in model.weight_shapes().items():
        assert weights[layer][0].shape == (rows, cols), layer
    x = K.default_input(model, seed=3)
    with torch.no_grad():
        twin(torch.from_numpy(x)[None])
    ours = K.forward(model, weights, x, return_all=True)
    ref = {k: v[0].numpy() for k, v in twin.acts.items()}
    missing = {layer.name for layer in model.layers} - set(ref)
    assert not missing, f"{name}: twin records no output for {sorted(missing)[:5]}"
    errors = {}
    for layer in model.layers:
        got, want = ours[layer.name], ref[layer.name]
        assert got.shape == want.shape == model.shapes()[layer.name], (layer.name, got.shape, want.shape)
        errors[layer.name] = rel_err(got, want)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{name}: layer {worst} relative error {errors[worst]:.2e}"
    assert np.ptp(ours[model.output]) > 0
    np.testing.assert_array_equal(K.forward(model, weights, x), ours[model.output])  # fused fast path
