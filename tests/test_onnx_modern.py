"""ONNX import of modern CNNs (issue 12): torch exports checked against onnxruntime on a real photo.

The zoo twins of tests/test_modern_cnn.py (resnet18, resnet50 (marked slow), mobilenet_v2,
shufflenet_v2, alexnet_2tower; convs followed by BatchNorm with random statistics) are exported with
``torch.onnx.export`` (the default dynamo exporter), imported with :func:`load_onnx` and run
with the serial reference; so are a DenseNet-style block with a 1x1-conv classifier on the
global pool and an Inception-style block whose pools pad asymmetrically (begin 0, end 1),
and hand-written graphs for the op variants torch does not emit.

Input: a real photo (scikit-image's astronaut if installed, else matplotlib's Grace Hopper
sample), resized to the model input and normalised with the ImageNet mean and std.
Tolerance: ``max|ours - onnxruntime| / max|onnxruntime| <= TOL`` (1e-4, the project
standard); measured on torch 2.13: 1.8e-7 (mobilenet_v2) to 3.1e-7 (resnet18) for the
zoo twins, 8e-8 and 2e-7 for the DenseNet and Inception blocks, 0 to 6e-8 for the hand-written graphs.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
torch = pytest.importorskip("torch", reason="torch writes the ONNX files: pip install torch")
onnx = pytest.importorskip("onnx", reason="onnx is needed to read ONNX files")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is the reference")
pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo exporter) needs onnxscript")
nn, F = torch.nn, torch.nn.functional

from mpicdc.core.kernels import forward  # noqa: E402
from mpicdc.core.models import get_model  # noqa: E402
from mpicdc.store.importers import UnsupportedOpError, load_onnx, load_source  # noqa: E402
from mpicdc.store.importers.onnx import SUPPORTED_OPS  # noqa: E402
from test_importers import _export, _tiny_onnx  # noqa: E402
from test_modern_cnn import TWINS, _randomise  # noqa: E402
from test_reference import _one_torch_thread, rel_err  # noqa: E402, F401 -- the same fixture and measure

TOL = 1e-4
HERE = os.path.dirname(os.path.abspath(__file__))


def photo(height: int, width: int) -> np.ndarray:
    """A real RGB photo as a normalised (3, height, width) float32 array."""
    from PIL import Image
    try:
        from skimage import data
        img = Image.fromarray(data.astronaut())
    except ImportError:
        from matplotlib import cbook
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            img = Image.open(f).convert("RGB")
            img.load()
    x = np.asarray(img.resize((width, height), Image.BILINEAR), np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def run_ort(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x[None].astype(np.float32)})[0][0]


def check(path, x: np.ndarray):
    """Import ``path``, run it on ``x`` and compare with onnxruntime; returns (model, weights, error)."""
    model, weights = load_onnx(path)
    got, want = forward(model, weights, x), run_ort(path, x)
    assert got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOL, f"{path}: relative error {err:.2e} > {TOL}"
    assert np.ptp(got) > 0
    return model, weights, err


def ops(model) -> list:
    return [layer.op for layer in model.layers]


# ---------------------------------------------------------------- the zoo twins

@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "resnet50" else n
                                  for n in sorted(TWINS)])   # resnet50: a 100 MB file, 25 s
def test_zoo_twin_exported_to_onnx_matches_onnxruntime(name, tmp_path):
    torch.manual_seed(7)
    twin = _randomise(TWINS[name](), seed=8)
    zoo = get_model(name)
    x = photo(*zoo.input_shape[1:])
    path = _export(torch, twin, torch.from_numpy(x)[None], tmp_path / f"{name}.onnx")
    model, weights, _ = check(path, x)
    # every BatchNorm folded, grouped convs kept grouped, shuffles and splits recognised: the
    # imported graph is the zoo's, so the weights bind onto it (layers matched in order)
    assert "batchnorm" not in ops(model)
    bound, bound_w = load_source(path, name)
    assert bound == zoo
    assert rel_err(forward(bound, bound_w, x), run_ort(path, x)) <= TOL


# ---------------------------------------------------------------- DenseNet and Inception style blocks

class DenseBlock(nn.Module):
    """Two densely connected conv-BN-ReLU layers, a transition, and DenseNet's 1x1-conv classifier."""

    def __init__(self, classes=7):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.l1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, bias=False))
        self.l2 = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 4, 3, padding=1, bias=False))
        self.trans = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.classifier = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        x = F.avg_pool2d(F.relu(self.trans(x)), 2)
        x = self.classifier(F.adaptive_avg_pool2d(x, 1))   # conv on the 1x1 output of the global pool
        return torch.softmax(torch.flatten(x, 1), 1)


class InceptionBlock(nn.Module):
    """Branches with TF-style 'SAME' pools (pad 0 before, 1 after), hard-swish, a grouped conv and ReLU6."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2), nn.BatchNorm2d(12))
        self.b1 = nn.Conv2d(12, 8, 1)
        self.b3 = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.BatchNorm2d(12))
        self.bp = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(8 + 12 + 6, 5)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-math.inf), 3, stride=2)   # begin [0,0], end [1,1]
        b1 = F.relu6(self.b1(x))
        b3 = F.hardsigmoid(self.b3(x)) * 2.0
        bp = self.bp(F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, stride=1))          # counts the padded zeros
        x = torch.cat([b1, b3, bp], 1)
        return self.fc(F.adaptive_max_pool2d(x, 1).flatten(1))


def test_densenet_block_with_a_1x1_conv_classifier(tmp_path):
    torch.manual_seed(11)
    net, x = _randomise(DenseBlock(), 12), photo(32, 32)
    model, _, _ = check(_export(torch, net, torch.from_numpy(x)[None], tmp_path / "dense.onnx"), x)
    gap = [layer for layer in model.layers if layer.op == "gap"]
    assert len(gap) == 1 and gap[0].attrs.get("keepdims") is True
    assert model.layer(model.layers[-1].inputs[0]).op == "flatten"


def test_inception_block_with_asymmetric_pool_padding(tmp_path):
    torch.manual_seed(13)
    net, x = _randomise(InceptionBlock(), 14), photo(29, 31)
    model, _, _ = check(_export(torch, net, torch.from_numpy(x)[None], tmp_path / "inception.onnx"), x)
    pools = {layer.op: layer.attrs for layer in model.layers if layer.op in ("maxpool", "avgpool")}
    assert pools["maxpool"]["padding"] == [[0, 1], [0, 1]]          # the Pad nodes are folded
    assert pools["avgpool"]["padding"] == [[0, 1], [0, 1]] and pools["avgpool"]["count_include_pad"]
    assert "pad" not in ops(model)
    assert {"hardswish", "hardsigmoid", "clip", "gmp", "concat"} <= set(ops(model))
    assert any(layer.attrs.get("groups") == 3 for layer in model.layers if layer.op == "conv")


# ---------------------------------------------------------------- hand-written graphs

def _graph(tmp_path, name, nodes, inits, in_shape, opset=13):
    return _tiny_onnx(tmp_path, name, nodes, inits, in_shape, None, opset=opset)


def _ints(*v):
    return np.asarray(v, np.int64)


def test_handwritten_window_and_activation_variants(tmp_path):
    """auto_pad SAME_LOWER, explicit asymmetric pads, ceil_mode, 3-D depthwise conv, Clip with attributes
    (opset 10) and with inputs, HardSigmoid's ONNX defaults, Sum of three tensors."""
    from onnx import helper
    rng = np.random.default_rng(5)
    h = helper.make_node
    for opset in (10, 13):
        clip = (h("Clip", ["a"], ["c"], min=-0.5, max=1.5) if opset < 11 else
                h("Clip", ["a", "lo", "hi"], ["c"]))
        nodes = [
            h("Conv", ["x", "W1"], ["a"], kernel_shape=[3, 3, 3], group=4, auto_pad="SAME_LOWER", strides=[1, 2, 2]),
            clip,
            h("MaxPool", ["c"], ["m"], kernel_shape=[1, 3, 3], strides=[1, 2, 2], pads=[0, 0, 0, 0, 1, 1],
              ceil_mode=1),
            h("AveragePool", ["c"], ["p"], kernel_shape=[1, 3, 3], strides=[1, 2, 2], pads=[0, 1, 0, 0, 1, 1]),
            h("HardSigmoid", ["p"], ["s"]),
            h("Conv", ["m", "W2"], ["d"], kernel_shape=[1, 1, 1]),
            h("Sum", ["s", "d", "m"], ["y0"]),
            h("GlobalMaxPool", ["y0"], ["y1"]),
            h("Flatten", ["y1"], ["y"]),
        ]
        inits = {"W1": 0.1 * rng.standard_normal((8, 1, 3, 3, 3)), "W2": rng.standard_normal((8, 8, 1, 1, 1))}
        if opset >= 11:
            inits.update(lo=np.float32(-0.5), hi=np.float32(1.5))
        path = _graph(tmp_path, f"variants{opset}", nodes, inits, [1, 4, 3, 9, 8], opset=opset)
        x = rng.standard_normal((4, 3, 9, 8)).astype(np.float32)
        model, _, _ = check(path, x)
        conv = model.layers[0]
        assert conv.attrs["groups"] == 4 and conv.attrs["padding"] == [1, 1, [1, 0]]  # SAME_LOWER: extra pad first
        attrs = {layer.op: layer.attrs for layer in model.layers}
        assert attrs["clip"] == {"min": -0.5, "max": 1.5}
        assert attrs["hardsigmoid"] == {"alpha": 0.2, "beta": 0.5}


def test_handwritten_shape_ops(tmp_path):
    """Pad (constant, opset 11 inputs) kept as a layer, channel Slice and Split, Concat, Gemm with
    transA (after Transpose) and transB, Flatten at axis 0, Clip(min=0) as ReLU, HardSwish."""
    from onnx import helper
    rng = np.random.default_rng(6)
    h = helper.make_node
    nodes = [
        h("Pad", ["x", "pads", "val"], ["p"], mode="constant"),
        h("Split", ["p", "split"], ["s0", "s1"], axis=1),
        h("Slice", ["p", "st", "en", "ax"], ["s2"]),
        h("HardSwish", ["s0"], ["hs"]),
        h("Clip", ["s1", "zero"], ["r"]),
        h("Concat", ["hs", "r", "s2"], ["c"], axis=1),
        h("GlobalAveragePool", ["c"], ["g"]),
        h("Flatten", ["g"], ["f"], axis=0),
        h("Transpose", ["f"], ["ft"], perm=[1, 0]),
        h("Gemm", ["ft", "B"], ["y"], transA=1, transB=1, alpha=0.5),
    ]
    inits = {"pads": _ints(0, 0, 1, 0, 0, 0, 2, 1), "val": np.float32(0.25), "split": _ints(2, 4),
             "st": _ints(1), "en": _ints(4), "ax": _ints(1), "zero": np.float32(0.0),
             "B": rng.standard_normal((3, 9))}
    path = _tiny_onnx(tmp_path, "shapes", nodes, inits, [1, 6, 5, 4], None, opset=14)
    x = rng.standard_normal((6, 5, 4)).astype(np.float32)
    # numpy's default-dtype arrays for the int64 inputs: _tiny_onnx stores float32, so rewrite them
    proto = onnx.load(path)
    for init in proto.graph.initializer:
        if init.name in ("pads", "split", "st", "en", "ax"):
            init.CopyFrom(onnx.numpy_helper.from_array(inits[init.name], init.name))
    onnx.save(proto, path)
    model, _, _ = check(path, x)
    assert "pad" in ops(model)
    assert ops(model).count("slice") == 3 and "relu" in ops(model) and "hardswish" in ops(model)


def _hard_swish_graph(tmp_path, name, gate_nodes, extra_inits=None, opset=13, x_of_mul="a"):
    """Conv -> ``Mul(x_of_mul, gate)`` with ``gate`` computed by ``gate_nodes`` from ``a`` -> GlobalAveragePool
    -> Flatten (``r`` = Relu of ``a`` is the other tensor a near miss may multiply)."""
    from onnx import helper
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             *gate_nodes,
             helper.make_node("Mul", [x_of_mul, "gate"], ["m"], name="hswish_mul"),
             helper.make_node("GlobalAveragePool", ["m"], ["g"]),
             helper.make_node("Flatten", ["g"], ["y"])]
    inits = {"W": 2.0 * rng.standard_normal((6, 3, 3, 3)), **(extra_inits or {})}
    return _graph(tmp_path, name, nodes, inits, [1, 3, 7, 7], opset=opset)


def test_hard_swish_written_with_elementwise_ops_is_fused(tmp_path):
    """tf2onnx writes Keras's hard swish ``x * relu6(x + 3) / 6`` as Add, Clip, Mul by 1/6 and a Mul of
    two activations: fused into ``hardswish`` (so is the constant on either side, Div by 6, Clip with
    attributes at opset 10, and ``x * HardSigmoid(x)`` with torch's alpha 1/6); near misses are refused."""
    from onnx import helper
    h = helper.make_node
    x = np.random.default_rng(8).standard_normal((3, 7, 7)).astype(np.float32)

    def gate(shift=3.0, high=6.0, scale=("Mul", 1 / 6), constants_first=False, opset=13):
        """``gate = scale(Clip(Add(a, shift), 0, high))`` and its constants."""
        add_in, mul_in = (["k", "a"], ["q", "c"]) if constants_first else (["a", "k"], ["c", "q"])
        clip = (h("Clip", ["s"], ["c"], min=0.0, max=high) if opset < 11 else h("Clip", ["s", "lo", "hi"], ["c"]))
        inits = {"k": np.float32(shift), "q": np.float32(scale[1])}
        if opset >= 11:
            inits.update(lo=np.float32(0.0), hi=np.float32(high))
        return [h("Add", add_in, ["s"]), clip, h(scale[0], mul_in, ["gate"])], inits

    variants = {
        "tf2onnx": (gate(), 13),
        "constants_first": (gate(constants_first=True), 13),
        "div": (gate(scale=("Div", 6.0)), 13),
        "opset10": (gate(opset=10), 10),
        "hardsigmoid": (([h("HardSigmoid", ["a"], ["gate"], alpha=1 / 6, beta=0.5)], {}), 13),
    }
    for name, ((nodes, inits), opset) in variants.items():
        model, _, err = check(_hard_swish_graph(tmp_path, name, nodes, inits, opset=opset), x)
        assert ops(model) == ["conv", "hardswish", "gap"], (name, ops(model))
        assert err <= 1e-6, (name, err)
    near_misses = {
        "shift_2": (gate(shift=2.0), "a"),
        "max_5": (gate(high=5.0), "a"),
        "scale_0.2": (gate(scale=("Mul", 0.2)), "a"),
        "other_tensor": (gate(), "r"),
        "hardsigmoid_onnx_default": (([h("HardSigmoid", ["a"], ["gate"])], {}), "a"),
    }
    for name, ((nodes, inits), x_of_mul) in near_misses.items():
        path = _hard_swish_graph(tmp_path, name, nodes, inits, x_of_mul=x_of_mul)
        with pytest.raises(UnsupportedOpError, match="Mul of two activations") as info:
            load_onnx(path)
        assert "hswish_mul" in str(info.value), name


@pytest.mark.parametrize("node_kw,message", [
    (dict(op_type="Pad", inputs=["x", "pads"], mode="reflect"), "mode 'reflect'"),
    (dict(op_type="Slice", inputs=["x", "st", "en", "ax"]), "is not the channel axis"),
    (dict(op_type="Gemm", inputs=["x", "B"], transA=1), "transA=1 is supported only"),
])
def test_unsupported_variants_name_op_and_node(tmp_path, node_kw, message):
    from onnx import helper
    kw = dict(node_kw)
    op, inputs = kw.pop("op_type"), kw.pop("inputs")
    node = helper.make_node(op, inputs, ["y"], name=f"bad_{op}", **kw)
    inits = {"pads": np.zeros(8, np.int64), "st": np.array([1], np.int64), "en": np.array([3], np.int64),
             "ax": np.array([2], np.int64), "B": np.ones((4, 3), np.float32)}
    inits = {k: v for k, v in inits.items() if k in inputs}
    path = _tiny_onnx(tmp_path, f"bad_{op}", [node], {}, [1, 4, 5, 5] if op != "Gemm" else [1, 4], None)
    proto = onnx.load(path)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(proto, path)
    with pytest.raises(UnsupportedOpError, match=re.escape(message)) as info:
        load_onnx(path)
    assert f"bad_{op}" in str(info.value) and path in str(info.value)


# ---------------------------------------------------------------- the op list in the docs

def test_docs_list_every_supported_onnx_op_and_keras_layer():
    from mpicdc.store.importers.keras import SUPPORTED_LAYERS
    with open(os.path.join(HERE, os.pardir, "docs", "importers.md"), encoding="utf-8") as f:
        text = f.read()
    for op in SUPPORTED_OPS:
        assert f"`{op}`" in text, f"docs/importers.md does not list ONNX op {op}"
    for cls in SUPPORTED_LAYERS:
        assert f"`{cls}`" in text, f"docs/importers.md does not list Keras layer {cls}"


# ---------------------------------------------------------------- command-line comfort for non-zoo models

def test_fix_commands_printed_for_an_imported_model_work_as_printed(tmp_path, monkeypatch, capsys):
    """Issue 12 item 6: prepare an ONNX file that is not a zoo model, ask for another world size,
    and run the prepare command the error prints (prepare only, no MPI)."""
    import shlex

    from mpicdc import store
    from mpicdc.store.prepare_cli import build_parser, main
    torch.manual_seed(11)
    net, x = _randomise(DenseBlock(), 12), photo(32, 32)
    path = _export(torch, net, torch.from_numpy(x)[None], tmp_path / "tumor_net.onnx")
    monkeypatch.chdir(tmp_path)
    assert main(["--workers", "2", "--source", path, "-q"]) == 0
    def folders():
        return [d for d in (tmp_path / "weights").iterdir() if d.is_dir()]

    (first,) = folders()
    m = store.open_manifest(first)
    assert m.model.name == "tumor_net" and first.name.startswith("tumor_net-")
    for world, what in ((5, "prepare shards for 5 ranks: "), (2, "prepare uncoded shards for 2 ranks: ")):
        with pytest.raises(store.ShardError) as info:
            store.check_world(m, world)
        cmd = str(info.value).split(what, 1)[1]
        argv = shlex.split(cmd)
        assert argv[:3] == ["python", "-m", "mpicdc.prepare"] and "tumor_net" in argv, cmd
        assert main(argv[3:] + ["-q"]) == 0, capsys.readouterr().err
        made = [d for d in folders() if d != first and store.open_manifest(d).world_size == world]
        assert len(made) == 1
        again = store.open_manifest(made[0])
        assert again.model == m.model and store.verify(made[0]) == []
    # MODEL names the imported model; a weights-only file still needs a zoo architecture
    assert main(["brain_net", "--workers", "2", "--source", path, "--dir", "named", "-q"]) == 0
    assert store.open_manifest(tmp_path / "named").model.name == "brain_net"
    np.savez(tmp_path / "w.npz", **{"conv1.weight": np.zeros((6, 1, 5, 5), np.float32)})
    assert main(["brain_net", "--workers", "2", "--source", "w.npz", "--dir", "bad", "-q"]) == 2
    assert "not a zoo model" in capsys.readouterr().err
    assert "named after the file" in " ".join(build_parser().format_help().split())
