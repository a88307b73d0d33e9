"""Importers checked against the framework that wrote each file.

Every numeric test runs the imported graph through the serial reference
(:func:`mpicdc.core.kernels.forward`) and compares it with the writing framework's own output
(torch, onnxruntime, Keras, or TensorFlow's stored output for the committed fixtures).
Tolerance: ``max|ours - theirs| / max|theirs| <= 1e-4`` in float32 (the project standard).
Frameworks that are not installed skip their tests with a reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")

from mpicdc.core.kernels import forward  # noqa: E402
from mpicdc.core.models import get_model  # noqa: E402
from mpicdc.core.random_weights import init_weights  # noqa: E402
from mpicdc.store.importers import (  # noqa: E402
    ModelImportError,
    UnsupportedOpError,
    WeightMismatchError,
    load_keras_h5,
    load_keras_weights,
    load_npz,
    load_onnx,
    load_source,
    load_torch_state,
    save_npz,
)

# Keras 3 on numpy 2 warns about __array__(copy=...) on every weight access: not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
TOL = 1e-4


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_close(got, ref, tol=TOL):
    err = rel_err(got, ref)
    assert err <= tol, f"max relative error {err:.3g} > {tol}"


def ops(model):
    return [layer.op for layer in model.layers]


# ---------------------------------------------------------------- torch models used by several tests

def _torch():
    return pytest.importorskip("torch", reason="torch is needed to write the ONNX / state_dict test files")


def _randomize_bn(torch, module, seed=0):
    """Non-trivial running statistics and affine parameters so that folding errors show."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return module.eval()


def torch_net2d(torch):
    nn, F = torch.nn, torch.nn.functional

    class Net2d(nn.Module):
        """conv+BN, LRN, max pool, branches (concat), residual (add), avg pool, BN alone, fc+BN1d, dropout."""

        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.lrn = nn.LocalResponseNorm(3, alpha=1e-2, beta=0.75, k=2.0)
            self.a, self.b = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 3, padding=1)
            self.proj, self.bn2 = nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12)
            self.fc1, self.bn3, self.drop = nn.Linear(108, 16), nn.BatchNorm1d(16), nn.Dropout(0.5)
            self.fc2 = nn.Linear(16, 10)

        def forward(self, x):
            x = F.max_pool2d(self.lrn(F.relu(self.bn1(self.conv1(x)))), 2)
            x = F.relu(torch.cat([self.a(x), self.b(x)], 1))
            x = self.bn2(F.avg_pool2d(x + self.proj(x), 2))
            x = self.drop(F.relu(self.bn3(self.fc1(torch.flatten(x, 1)))))
            return torch.softmax(self.fc2(x), 1)

    torch.manual_seed(0)
    return _randomize_bn(torch, Net2d()), torch.rand(1, 3, 12, 12)


def torch_net3d(torch):
    nn, F = torch.nn, torch.nn.functional

    class Net3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv3d(3, 4, 3, padding=1), nn.Conv3d(4, 6, 3, padding=1)
            self.bn, self.fc = nn.BatchNorm3d(6), nn.Linear(6 * 2 * 2 * 2, 5)

        def forward(self, x):
            x = F.max_pool3d(F.relu(self.c1(x)), (1, 2, 2))
            x = F.avg_pool3d(F.relu(self.bn(self.c2(x))), 2)
            return torch.softmax(self.fc(x.flatten(1)), 1)

    torch.manual_seed(1)
    return _randomize_bn(torch, Net3d()), torch.rand(1, 3, 4, 8, 8)


def torch_tiny(torch):
    """The zoo's ``tiny`` architecture in torch, with the zoo's layer names."""
    nn, F = torch.nn, torch.nn.functional

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.lrn1 = nn.LocalResponseNorm(3, alpha=1e-4, beta=0.75, k=2.0)
            self.branch_a, self.branch_b = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 3, padding=1)
            self.proj, self.conv2 = nn.Conv2d(12, 12, 1), nn.Conv2d(12, 12, 3, padding=1)
            self.fc1, self.fc2 = nn.Linear(12 * 4 * 4, 32), nn.Linear(32, 10)

        def forward(self, x):
            x = self.lrn1(F.relu(self.conv1(x)))
            x = F.max_pool2d(F.relu(torch.cat([self.branch_a(x), self.branch_b(x)], 1)), 2)
            skip = self.proj(x)
            x = F.avg_pool2d(F.relu(skip + F.relu(self.conv2(F.relu(skip)))), 2)
            return torch.softmax(self.fc2(F.relu(self.fc1(x.flatten(1)))), 1)

    torch.manual_seed(2)
    return Tiny().eval(), torch.rand(1, 3, 16, 16)


def torch_lenet(torch, fc1_out=120):
    """The zoo's ``lenet`` as an nn.Sequential (keys 0.weight, 3.weight, ...: matched in order)."""
    nn = torch.nn
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(400, fc1_out), nn.ReLU(), nn.Linear(fc1_out, 84), nn.ReLU(),
                        nn.Linear(84, 10), nn.Softmax(1))
    return net.eval(), torch.rand(1, 1, 28, 28)


def _run_torch(torch, net, x):
    with torch.no_grad():
        return net(x).numpy()[0]


def _export(torch, net, x, path, **kw):
    pytest.importorskip("onnx", reason="onnx is needed to read ONNX files")
    if kw.get("dynamo", True):
        pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo exporter) needs onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), **kw)
    return str(path)


def _ort(path, x):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run hand-written ONNX graphs")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.asarray(x, np.float32)})[0][0]


def _ort_if_available(path, x):
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    return _ort(path, x)


# ---------------------------------------------------------------- ONNX from torch.onnx.export

def test_onnx_torch_2d_all_ops(tmp_path):
    torch = _torch()
    net, x = torch_net2d(torch)
    path = _export(torch, net, x, tmp_path / "net2d.onnx")
    model, weights = load_onnx(path)
    assert {"conv", "lrn", "maxpool", "concat", "add", "avgpool", "batchnorm", "flatten", "dense", "softmax",
            "relu"} <= set(ops(model))
    assert ops(model).count("batchnorm") == 1  # BN after avg pool stays; conv/fc batch norms are folded
    got = forward(model, weights, x.numpy()[0])
    assert_close(got, _run_torch(torch, net, x))
    ort = _ort_if_available(path, x.numpy())
    if ort is not None:
        assert_close(got, ort)


def test_onnx_torch_3d_conv(tmp_path):
    torch = _torch()
    net, x = torch_net3d(torch)
    model, weights = load_onnx(_export(torch, net, x, tmp_path / "net3d.onnx"))
    assert model.input_shape == (3, 4, 8, 8)
    assert model.layer("c1").attrs["kernel"] == [3, 3, 3]
    assert_close(forward(model, weights, x.numpy()[0]), _run_torch(torch, net, x))


def test_onnx_torch_unfolded_batchnorm_gap_matmul(tmp_path):
    """Exporter optimisations off: Conv -> BatchNormalization is folded by the importer; Identity,
    GlobalAveragePool, Flatten, MatMul + Add (bias folded), padded avg pool counting the padding."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)
            self.c2 = nn.Conv2d(4, 6, 3)
            self.w, self.bias = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))

        def forward(self, x):
            x = F.avg_pool2d(F.relu(self.bn(self.c1(x))), 3, stride=1, padding=1)
            x = F.adaptive_avg_pool2d(self.c2(x), 1).flatten(1)
            return torch.matmul(x, self.w) + self.bias

    torch.manual_seed(4)
    net, x = _randomize_bn(torch, Net()), torch.rand(1, 3, 12, 12)
    ref = _run_torch(torch, net, x)
    path = _export(torch, net, x, tmp_path / "legacy.onnx", dynamo=False, do_constant_folding=False)
    import onnx
    assert "BatchNormalization" in [n.op_type for n in onnx.load(path).graph.node]
    model, weights = load_onnx(path)
    assert ops(model) == ["conv", "relu", "avgpool", "conv", "gap", "dense"]
    assert model.layers[2].attrs["count_include_pad"] is True
    assert_close(forward(model, weights, x.numpy()[0]), ref)


def test_onnx_onto_zoo_architecture(tmp_path):
    """An exported zoo-shaped network binds to the zoo graph (zoo layer names, shapes checked)."""
    torch = _torch()
    net, x = torch_tiny(torch)
    path = _export(torch, net, x, tmp_path / "tiny.onnx")
    model, weights = load_source(path, "tiny")
    assert model == get_model("tiny")
    assert_close(forward(model, weights, x.numpy()[0]), _run_torch(torch, net, x))
    with pytest.raises(WeightMismatchError, match="lenet"):
        load_source(path, "lenet")


def test_onnx_handwritten_nhwc_graph():
    """NHWC input with a Transpose pair, SAME padding, native LRN, Identity/Dropout, BN alone,
    flatten in NHWC order (dense columns permuted), MatMul + Add, Softmax; checked against onnxruntime."""
    onnx = pytest.importorskip("onnx", reason="onnx is needed to write and read ONNX files")
    pytest.importorskip("onnxruntime", reason="onnxruntime runs the hand-written graph")
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(5)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    C, H = 4, 6
    inits = [init("W", rng.standard_normal((C, 3, 3, 3)) * 0.3), init("B", rng.standard_normal(C)),
             init("s", rng.standard_normal(C)), init("t", rng.standard_normal(C)), init("m", rng.standard_normal(C)),
             init("v", rng.uniform(0.5, 1.5, C)), init("s2", rng.standard_normal(C)), init("t2", rng.standard_normal(C)),
             init("M", rng.standard_normal((H * H * C, 5)) * 0.1), init("b", rng.standard_normal(5)),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["x_nchw", "W", "B"], ["c"], kernel_shape=[3, 3], auto_pad="SAME_UPPER", name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["bn"], epsilon=1e-3, name="bn_folded"),
        helper.make_node("LRN", ["bn"], ["lrn"], size=3, alpha=1e-2, beta=0.6, bias=1.5, name="lrn"),
        helper.make_node("Identity", ["lrn"], ["idn"], name="idn"),
        helper.make_node("Relu", ["idn"], ["r"], name="relu"),
        helper.make_node("BatchNormalization", ["r", "s2", "t2", "m", "v"], ["bn2"], name="bn_alone"),
        helper.make_node("Transpose", ["bn2"], ["nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
        helper.make_node("Reshape", ["nhwc", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "M"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "b"], ["fcb"], name="fc_bias"),
        helper.make_node("Dropout", ["fcb"], ["d"], name="drop"),
        helper.make_node("Softmax", ["d"], ["y"], axis=-1, name="prob"),
    ]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, H, H, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "nhwc.onnx")
        onnx.save(proto, path)
        x = rng.random((1, H, H, 3), dtype=np.float32)
        model, weights = load_onnx(path)
        ref = _ort(path, x)
    assert model.input_shape == (3, H, H)
    assert ops(model) == ["conv", "lrn", "relu", "batchnorm", "flatten", "dense", "softmax"]
    assert_close(forward(model, weights, x[0].transpose(2, 0, 1)), ref)


def test_tf2onnx_fixture():
    """tf2onnx export of an NHWC Keras CNN (committed fixture) against TensorFlow's stored output."""
    pytest.importorskip("onnx", reason="onnx is needed to read ONNX files")
    path = os.path.join(FIXTURES, "tf2onnx_cnn.onnx")
    data = np.load(os.path.join(FIXTURES, "tf2onnx_cnn.npz"))
    model, weights = load_source(path)
    assert model.input_shape == (3, 16, 16)
    assert "transpose" in model.description
    got = forward(model, weights, data["x"][0].transpose(2, 0, 1))
    assert_close(got, data["y"][0])
    ort = _ort_if_available(path, data["x"])
    if ort is not None:
        assert_close(got, ort)


def test_tf2onnx_mobilenet_fixture():
    """tf2onnx export of a Keras MobileNet-style model (committed fixture, see make_tf2onnx_fixture.py):
    strided 'same' convs (TensorFlow pads (0, 1)), depthwise convs, batch norm as Mul + Add, ReLU6 as Clip,
    hard swish as x * Clip(x + 3, 0, 6) * (1/6), inverted residual adds, global pool, Gemm, softmax.
    Compared with TensorFlow's stored output and with onnxruntime."""
    pytest.importorskip("onnx", reason="onnx is needed to read ONNX files")
    path = os.path.join(FIXTURES, "tf2onnx_mobile.onnx")
    data = np.load(os.path.join(FIXTURES, "tf2onnx_mobile.npz"))
    model, weights = load_source(path)
    assert model.input_shape == (3, 32, 32)
    assert "transpose" in model.description
    counts = {op: ops(model).count(op) for op in set(ops(model))}
    # every batch norm folded into its conv; the hard-swish chains fused; the two stride-1 blocks keep their add
    assert counts == {"conv": 11, "clip": 3, "hardswish": 5, "add": 2, "gap": 1, "dense": 1, "softmax": 1}, counts
    convs = [layer for layer in model.layers if layer.op == "conv"]
    depthwise = [c for c in convs if c.attrs.get("groups", 1) == c.attrs["out"] > 1]
    assert [c.attrs["out"] for c in depthwise] == [24, 32, 48]
    strided = [c for c in convs if c.attrs["stride"] == [2, 2]]
    assert len(strided) == 2 and all(c.attrs["padding"] == [[0, 1], [0, 1]] for c in strided)
    got = forward(model, weights, data["x"][0].transpose(2, 0, 1))
    assert_close(got, data["y"][0])
    assert np.ptp(data["y"]) > 0.1  # a softmax that is not saturated: every logit matters
    ort = _ort_if_available(path, data["x"])
    if ort is not None:
        assert_close(got, ort)


def _tiny_onnx(tmp_path, name, nodes, inits, in_shape, out_shape, opset=13):
    onnx = pytest.importorskip("onnx", reason="onnx is needed to write and read ONNX files")
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = str(tmp_path / f"{name}.onnx")
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("case, attrs, message", [
    ("dilated", dict(dilations=[2, 2]), "dilations"),
])
def test_onnx_unsupported_conv_variants(tmp_path, case, attrs, message):
    from onnx import helper
    cin = 4
    W = np.zeros((4, cin // attrs.get("group", 1), 3, 3))
    node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3], name=f"conv_{case}", **attrs)
    path = _tiny_onnx(tmp_path, case, [node], {"W": W}, [1, cin, 8, 8], [1, 4, None, None])
    with pytest.raises(UnsupportedOpError, match=message) as info:
        load_onnx(path)
    assert f"conv_{case}" in str(info.value) and path in str(info.value)


def test_onnx_unsupported_op_names_op_and_node(tmp_path):
    from onnx import helper
    nodes = [helper.make_node("Sigmoid", ["x"], ["y"], name="gate")]
    path = _tiny_onnx(tmp_path, "sigmoid", nodes, {}, [1, 3, 4, 4], [1, 3, 4, 4])
    with pytest.raises(UnsupportedOpError) as info:
        load_source(path)
    msg = str(info.value)
    assert "'Sigmoid'" in msg and "'gate'" in msg and path in msg
    assert isinstance(info.value, ValueError)


def test_onnx_torchscript_lrn_is_a_clear_error(tmp_path):
    torch = _torch()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LocalResponseNorm(3)).eval()
    path = _export(torch, net, torch.rand(1, 3, 8, 8), tmp_path / "lrn_ts.onnx", dynamo=False)
    with pytest.raises(UnsupportedOpError, match="dynamo"):
        load_onnx(path)


def test_onnx_missing_package_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08\x07")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install mpicdc\[onnx\]"):
        load_onnx(path)


def test_onnx_not_an_onnx_file(tmp_path):
    pytest.importorskip("onnx", reason="onnx is needed to read ONNX files")
    path = tmp_path / "fake.onnx"
    path.write_text("this is not a protobuf, just text pretending\n" * 3)
    with pytest.raises(ModelImportError, match="fake.onnx"):
        load_source(path)


# ---------------------------------------------------------------- Keras HDF5

def _keras():
    return pytest.importorskip("keras", reason="keras (3, torch backend) writes the Keras test files")


def _randomize_keras(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if ws:
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") if "variance" in v.path else
                               (rng.standard_normal(w.shape) / np.sqrt(max(1, np.prod(w.shape[:-1])))
                                if w.ndim > 1 else rng.standard_normal(w.shape) * 0.3).astype("float32")
                               for w, v in zip(ws, layer.weights)])
    return rng


def _predict(model, x):
    return np.asarray(model.predict(x, verbose=0))[0]


def keras_lenet(keras, names=None):
    """The zoo's ``lenet`` in Keras (NHWC); ``names`` gives the five weight layers explicit names."""
    n = names or [None] * 5
    L = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(6, 5, padding="same", activation="relu", name=n[0]), L.MaxPooling2D(2),
        L.Conv2D(16, 5, activation="relu", name=n[1]), L.MaxPooling2D(2), L.Flatten(),
        L.Dense(120, activation="relu", name=n[2]), L.Dense(84, activation="relu", name=n[3]),
        L.Dense(10, activation="softmax", name=n[4])])
    rng = _randomize_keras(model, 7)
    return model, rng.random((1, 28, 28, 1), dtype=np.float32)


def test_keras3_full_model_functional(tmp_path):
    keras = _keras()
    L = keras.layers
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = L.BatchNormalization(name="bn_folded")(x)
    x = L.ReLU()(x)
    a = L.Conv2D(3, 1)(x)
    b = L.Conv2D(3, 3, padding="same", activation="relu")(x)
    x = L.Concatenate()([a, b])
    x = L.Add()([x, L.Conv2D(6, 1)(x)])
    x = L.MaxPooling2D(2)(x)
    x = L.BatchNormalization(name="bn_alone")(x)
    x = L.AveragePooling2D(3, strides=1, padding="same")(x)
    x = L.Dropout(0.3)(L.Flatten()(x))
    out = L.Softmax()(L.Dense(5)(x))
    model = keras.Model(inp, out)
    rng = _randomize_keras(model, 8)
    x = rng.random((1, 8, 8, 3), dtype=np.float32)
    model.save(tmp_path / "f.h5")
    imported, weights = load_source(tmp_path / "f.h5")
    assert imported.input_shape == (3, 8, 8)
    assert ops(imported).count("batchnorm") == 1 and "bn_alone" in [layer.name for layer in imported.layers]
    assert_close(forward(imported, weights, x[0].transpose(2, 0, 1)), _predict(model, x))


def test_keras3_full_model_sequential_conv3d(tmp_path):
    keras = _keras()
    L = keras.layers
    model = keras.Sequential([keras.Input((4, 8, 8, 2)), L.Conv3D(4, 3, padding="same", activation="relu"),
                              L.MaxPooling3D((1, 2, 2)), L.Conv3D(6, 3), L.BatchNormalization(),
                              L.GlobalAveragePooling3D(), L.Dense(5), L.Activation("softmax")])
    rng = _randomize_keras(model, 9)
    x = rng.random((1, 4, 8, 8, 2), dtype=np.float32)
    model.save(tmp_path / "s3d.h5")
    imported, weights = load_keras_h5(tmp_path / "s3d.h5")
    assert imported.input_shape == (2, 4, 8, 8)
    assert ops(imported) == ["conv", "relu", "maxpool", "conv", "gap", "dense", "softmax"]
    assert_close(forward(imported, weights, x[0].transpose(3, 0, 1, 2)), _predict(model, x))


def test_keras3_mobile_layers(tmp_path):
    """DepthwiseConv2D (multiplier 2, strided 'same' = asymmetric), SeparableConv2D, ZeroPadding2D
    (folded into the next convs, kept before a max pool), grouped Conv2D, even-kernel 'same' padding, Add."""
    keras = _keras()
    L = keras.layers
    inp = keras.Input((11, 10, 4))
    x = L.ZeroPadding2D(((0, 1), (2, 1)))(inp)
    x = L.DepthwiseConv2D(3, strides=2, depth_multiplier=2, padding="same", activation="relu", name="dw")(x)
    y = L.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    z = L.Conv2D(8, 2, padding="same", groups=4, name="grouped")(x)
    x = L.Add()([y, z])
    x = L.ZeroPadding2D(1)(x)
    x = L.Conv2D(6, 3, name="after_pad")(x)
    x = L.MaxPooling2D(2)(L.ZeroPadding2D(((1, 0), (0, 1)), name="kept_pad")(x))   # zeros can win: kept
    out = L.Softmax()(L.Dense(5)(L.Flatten()(x)))
    model = keras.Model(inp, out)
    rng = _randomize_keras(model, 9)
    x = rng.random((1, 11, 10, 4), dtype=np.float32)
    model.save(tmp_path / "mobile.h5")
    imported, weights = load_source(tmp_path / "mobile.h5")
    by_name = {layer.name: layer for layer in imported.layers}
    assert by_name["dw"].attrs["groups"] == 4 and by_name["dw"].attrs["out"] == 8
    assert by_name["sep_depthwise"].attrs["groups"] == 8 and by_name["grouped"].attrs["groups"] == 4
    assert by_name["after_pad"].attrs["padding"] == [1, 1] and by_name["dw"].attrs["padding"] == [[0, 2], [3, 2]]
    assert [layer.name for layer in imported.layers if layer.op == "pad"] == ["kept_pad"]
    assert_close(forward(imported, weights, x[0].transpose(2, 0, 1)), _predict(model, x))


def test_keras3_weights_h5_onto_zoo_lenet_in_order(tmp_path):
    """Keras 3 ``.weights.h5`` with Keras's own layer names: matched in order; flatten columns permuted."""
    keras = _keras()
    model, x = keras_lenet(keras)
    model.save_weights(tmp_path / "lenet.weights.h5")
    imported, weights = load_source(tmp_path / "lenet.weights.h5", "lenet")
    assert imported == get_model("lenet")
    assert_close(forward(imported, weights, x[0].transpose(2, 0, 1)), _predict(model, x))
    # the full-model file of the same network binds to the zoo graph too
    model.save(tmp_path / "lenet.h5")
    imported, weights = load_source(tmp_path / "lenet.h5", "lenet")
    assert_close(forward(imported, weights, x[0].transpose(2, 0, 1)), _predict(model, x))


def _write_keras2_weights(model, path):
    """Keras 2 weights-only layout: Keras 3's legacy writer when present, else the documented layout by hand."""
    import h5py
    with h5py.File(path, "w") as f:
        try:
            from keras.src.legacy.saving import legacy_h5_format
        except ImportError:  # pragma: no cover - depends on the Keras version
            f.attrs["layer_names"] = np.array([layer.name.encode() for layer in model.layers])
            f.attrs["backend"], f.attrs["keras_version"] = b"torch", b"2.x-layout"
            for layer in model.layers:
                g = f.create_group(layer.name)
                names = [f"{layer.name}/{v.name}".encode() for v in layer.weights]
                g.attrs["weight_names"] = np.array(names)
                for n, w in zip(names, layer.get_weights()):
                    g.create_dataset(n.decode(), data=w)
            return "h5py"
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
        return "keras legacy_h5_format"


def test_keras2_weights_layout_onto_zoo_lenet_by_name(tmp_path):
    keras = _keras()
    model, x = keras_lenet(keras, names=["conv1", "conv2", "fc1", "fc2", "fc3"])
    _write_keras2_weights(model, tmp_path / "lenet_k2.h5")
    imported, weights = load_source(tmp_path / "lenet_k2.h5", "lenet")
    assert_close(forward(imported, weights, x[0].transpose(2, 0, 1)), _predict(model, x))
    imported, weights = load_keras_weights(tmp_path / "lenet_k2.h5", get_model("lenet"))
    assert_close(forward(imported, weights, x[0].transpose(2, 0, 1)), _predict(model, x))


@pytest.mark.parametrize("name", ["keras2_functional", "keras2_sequential"])
def test_keras2_full_model_fixtures(name):
    """Full-model .h5 written by Keras 2 (tf_keras; committed fixture) against its stored predict()."""
    data = np.load(os.path.join(FIXTURES, f"{name}.npz"))
    model, weights = load_source(os.path.join(FIXTURES, f"{name}.h5"))
    assert "Keras 2." in model.description
    assert_close(forward(model, weights, data["x"][0].transpose(2, 0, 1)), data["y"][0])


def test_keras_errors(tmp_path):
    keras = _keras()
    L = keras.layers
    leaky = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(2, 3, name="c"), L.LeakyReLU(name="leaky")])
    leaky.save(tmp_path / "leaky.h5")
    with pytest.raises(UnsupportedOpError, match="'leaky'.*LeakyReLU"):
        load_source(tmp_path / "leaky.h5")
    dilated = keras.Sequential([keras.Input((7, 7, 1)), L.Conv2D(2, 3, dilation_rate=2, name="dilated")])
    dilated.save(tmp_path / "dilated.h5")
    with pytest.raises(UnsupportedOpError, match="dilated.*dilation_rate"):
        load_source(tmp_path / "dilated.h5")
    model, _ = keras_lenet(keras)
    model.save_weights(tmp_path / "lenet.weights.h5")
    with pytest.raises(ModelImportError, match="model_name"):
        load_source(tmp_path / "lenet.weights.h5")
    wide = keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(6, 5, padding="same"), L.MaxPooling2D(2),
                             L.Conv2D(16, 5), L.MaxPooling2D(2), L.Flatten(), L.Dense(100), L.Dense(84),
                             L.Dense(10)])
    wide.save_weights(tmp_path / "wide.weights.h5")
    with pytest.raises(WeightMismatchError, match=r"'fc1'.*\(120, 400\).*\(100, 400\)"):
        load_source(tmp_path / "wide.weights.h5", "lenet")


# ---------------------------------------------------------------- PyTorch state_dict

def test_torch_state_dict_lenet_in_order(tmp_path):
    torch = _torch()
    net, x = torch_lenet(torch)
    torch.save(net.state_dict(), tmp_path / "lenet.pt")
    model, weights = load_source(tmp_path / "lenet.pt", "lenet")
    assert_close(forward(model, weights, x.numpy()[0]), _run_torch(torch, net, x))


def test_torch_state_dict_tiny_by_name_in_checkpoint(tmp_path):
    torch = _torch()
    net, x = torch_tiny(torch)
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, tmp_path / "tiny.pth")
    model, weights = load_torch_state(tmp_path / "tiny.pth", "tiny")
    assert_close(forward(model, weights, x.numpy()[0]), _run_torch(torch, net, x))


def test_torch_state_dict_errors(tmp_path):
    torch = _torch()
    net, _ = torch_lenet(torch, fc1_out=100)
    torch.save(net.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(WeightMismatchError, match=r"'fc1'.*\(120, 400\).*\(100, 400\)"):
        load_source(tmp_path / "wide.pt", "lenet")
    net, _ = torch_lenet(torch)
    sd = net.state_dict()
    del sd["11.weight"], sd["11.bias"]
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(WeightMismatchError, match="3 dense layers.*2 dense weights"):
        load_source(tmp_path / "short.pt", "lenet")
    torch.save(net, tmp_path / "module.pt")  # a pickled module, not a state_dict: never unpickled
    with pytest.raises(ModelImportError, match="weights_only=True"):
        load_source(tmp_path / "module.pt", "lenet")
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 5), torch.nn.BatchNorm2d(6))
    torch.save(bn.state_dict(), tmp_path / "bn.pt")
    with pytest.raises(UnsupportedOpError, match="batch-norm"):
        load_source(tmp_path / "bn.pt", "lenet")
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ModelImportError, match="text.pt"):
        load_source(tmp_path / "text.pt", "lenet")
    with pytest.raises(ModelImportError, match="model_name"):
        load_source(tmp_path / "wide.pt")


# ---------------------------------------------------------------- npz

def test_npz_torch_layout_against_torch(tmp_path):
    torch = _torch()
    net, x = torch_lenet(torch)
    names = dict(zip(["0", "3", "7", "9", "11"], ["conv1", "conv2", "fc1", "fc2", "fc3"]))
    arrays = {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v.numpy() for k, v in net.state_dict().items()}
    np.savez(tmp_path / "lenet.npz", **arrays)
    model, weights = load_source(tmp_path / "lenet.npz", "lenet")
    assert_close(forward(model, weights, x.numpy()[0]), _run_torch(torch, net, x))


def test_npz_roundtrip_embedded_model_and_errors(tmp_path):
    model = get_model("tiny")
    weights = init_weights(model, seed=1)
    save_npz(tmp_path / "tiny.npz", model, weights)
    loaded, got = load_source(tmp_path / "tiny.npz")  # graph embedded: no model_name needed
    assert loaded == model
    for name, (W, b) in weights.items():
        assert np.array_equal(got[name][0], W) and np.array_equal(got[name][1], b)
    arrays = {f"{n}.weight": W for n, (W, b) in weights.items()}
    np.savez(tmp_path / "typo.npz", **arrays, **{"fc9.bias": np.zeros(10, np.float32)})
    with pytest.raises(WeightMismatchError, match="fc9.bias"):
        load_npz(tmp_path / "typo.npz", "tiny")
    del arrays["fc2.weight"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(WeightMismatchError, match="fc2"):
        load_npz(tmp_path / "missing.npz", "tiny")
    arrays["fc2.weight"] = np.zeros((10, 31), np.float32)
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(WeightMismatchError, match=r"'fc2'.*\(10, 32\).*\(10, 31\)"):
        load_npz(tmp_path / "shape.npz", "tiny")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(ModelImportError, match="bad.npz"):
        load_source(tmp_path / "bad.npz", "tiny")


# ---------------------------------------------------------------- dispatch and bad files

def test_load_source_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_source(tmp_path / "absent.onnx")
    (tmp_path / "m.caffemodel").write_bytes(b"\0")
    with pytest.raises(ModelImportError, match="unknown model file type"):
        load_source(tmp_path / "m.caffemodel")
    (tmp_path / "m.h5").write_text("plain text, not HDF5")
    with pytest.raises(ModelImportError, match="m.h5.*not an HDF5 file"):
        load_source(tmp_path / "m.h5", "lenet")
    import h5py
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ModelImportError, match="not a Keras model or weights file"):
        load_source(tmp_path / "other.h5")
    (tmp_path / "m.keras").write_bytes(b"PK")
    with pytest.raises(ModelImportError, match=r"\.keras archives"):
        load_source(tmp_path / "m.keras")


def test_files_that_are_not_what_their_suffix_claims(tmp_path):
    """A real file of one format under another format's suffix: a clear error naming the file."""
    torch = _torch()
    pytest.importorskip("onnx", reason="onnx is needed to read ONNX files")
    import shutil
    net, _ = torch_lenet(torch)
    torch.save(net.state_dict(), tmp_path / "real.pt")
    save_npz(tmp_path / "real.npz", get_model("tiny"), init_weights(get_model("tiny")))
    cases = [("real.pt", "claims_npz.npz"), ("real.npz", "claims_pt.pt"),
             (os.path.join(FIXTURES, "keras2_sequential.h5"), "claims_onnx.onnx"),
             (os.path.join(FIXTURES, "tf2onnx_cnn.onnx"), "claims_h5.h5")]
    for src, dst in cases:
        shutil.copy(tmp_path / src, tmp_path / dst)
        with pytest.raises(ModelImportError, match=dst):
            load_source(tmp_path / dst, "lenet")


def test_import_is_quiet_and_lazy():
    code = ("import sys, mpicdc.store.importers; "
            "print(sorted(m for m in ('onnx', 'torch', 'keras', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(HERE), env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]" and out.stderr == ""
