"""Modern CNNs imported from ONNX and served over real MPI ranks with a worker killed mid-request (issue 12).

The torch twins of tests/test_modern_cnn.py (resnet18, resnet50, mobilenet_v2, shufflenet_v2 and the
two-tower AlexNet, BatchNorm with random statistics) are exported with ``torch.onnx.export``
at a small input size (64x64; AlexNet 99x99 with narrow fully connected layers, so its file
is 12 MB instead of 244 MB), prepared with ``python -m mpicdc.prepare``'s ``main`` (4 data
workers + 1 sum parity: grouped layers protected by 2MR, depthwise ones on the master), and
run with ``python -m mpicdc.launch -np 6 MODEL --weights DIR --input photo.npy --check
--inject crash:RANK@1:LAYER``: the rank holding the first data block of a layer in the middle
of the network (for AlexNet: of the grouped ``conv2``, protected by 2MR) SIGKILLs itself in
request 1.  Every request must be served; its output is compared with onnxruntime on the
same photo and, by the job itself (``--check``), with the serial forward of the same shards.

Tolerance: ``RTOL = 1e-4`` relative (max abs difference / max abs reference), as
tests/test_runtime.py for the sum code: the decode is a subtraction, the rest float32
rounding of the same products in another order.  A 2MR replica computes the same product
as the block it copies, so with only AlexNet's grouped layers distributed the output with
the data worker killed equals the fault-free output bit for bit.

The committed tf2onnx fixture of a Keras MobileNet-style model (tests/fixtures/tf2onnx_mobile.onnx,
written by TensorFlow: strided 'same' convs, depthwise convs, ReLU6, hard swish, inverted residual
adds) is served the same way and compared with TensorFlow's own stored output.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi_helpers import requires_mpi, run_job

torch = pytest.importorskip("torch", reason="torch writes the ONNX files: pip install torch")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is the reference")
pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo exporter) needs onnxscript")
nn = torch.nn

from test_importers import FIXTURES, _export  # noqa: E402
from test_modern_cnn import TWINS, _randomise  # noqa: E402
from test_onnx_modern import photo, run_ort  # noqa: E402
from test_reference import rel_err  # noqa: E402

from mpicdc import store  # noqa: E402
from mpicdc.store.importers import load_onnx  # noqa: E402
from mpicdc.store.prepare_cli import main as prepare_main  # noqa: E402

pytestmark = [requires_mpi, pytest.mark.mpi, pytest.mark.slow]

RTOL = 1e-4
SIZE = {"resnet18": 64, "resnet50": 64, "mobilenet_v2": 64, "shufflenet_v2": 64, "alexnet_2tower": 99}


def small_alexnet_2tower():
    """The two-tower AlexNet twin on 99x99 inputs (pool5 is 256x2x2) with fully connected layers of 512."""
    twin = TWINS["alexnet_2tower"]()
    for name, cin, cout in (("fc6", 256 * 2 * 2, 512), ("fc7", 512, 512), ("fc8", 512, 100)):
        twin.dense(name, cin, cout)
    return twin


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{name: (onnx path, photo .npy path, photo)}`` for every twin, exported once."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for i, name in enumerate(sorted(SIZE)):
        torch.manual_seed(20 + i)
        twin = small_alexnet_2tower() if name == "alexnet_2tower" else TWINS[name]()
        x = photo(SIZE[name], SIZE[name])
        path = _export(torch, _randomise(twin, seed=30 + i), torch.from_numpy(x)[None], root / f"tw_{name}.onnx")
        np.save(root / f"{name}.npy", x)
        out[name] = (path, root / f"{name}.npy", x)
    return out


def _prepare(path, folder, *extra) -> store.Manifest:
    assert prepare_main(["--source", path, "--workers", "4", "--code", "sum", "--dir", str(folder), "-q", *extra]) == 0
    assert store.verify(folder) == []
    return store.open_manifest(folder)


def _serve(manifest, folder, x_path, tmp_path, rank, layer, requests=2):
    job = run_job(6, [manifest.model.name, "--weights", str(folder), "--input", str(x_path), "--repeat",
                      str(requests), "--check", "--quiet", "--inject", f"crash:{rank}@1:{layer}"], tmp_path,
                  timeout=180)
    assert job.returncode == 0, job.explain()
    assert job.results is not None and len(job.results["requests"]) == requests, job.explain()
    for r in job.results["requests"]:
        assert r["ok"], f"request {r['request']} failed: {r['error']}\n{job.explain()}"
        assert r["check_rel_err"] is not None and r["check_rel_err"] <= RTOL, job.explain()
    assert job.results["dead_ranks"] == [rank], job.explain()
    crashed = job.results["requests"][1]["layers"]
    record = next(rec for rec in crashed if rec["layer"] == layer)
    assert 0 in record["decoded_blocks"] and rank not in record["used"], job.explain()
    return job


@pytest.mark.parametrize("name", sorted(SIZE))
def test_imported_model_served_with_a_worker_killed(exported, tmp_path, name):
    path, x_path, x = exported[name]
    folder = tmp_path / "shards"
    manifest = _prepare(path, folder)
    plan, model = manifest.plan, manifest.model
    if name == "alexnet_2tower":  # the grouped conv2, protected by 2MR: its data worker dies
        lp = next(lp for lp in plan.layers if lp.code == "replication")
        assert [lp.code for lp in plan.layers].count("replication") == 3
    else:
        lp = plan.layers[len(plan.layers) // 2]
    job = _serve(manifest, folder, x_path, tmp_path, lp.ranks[0], lp.layer)
    want = run_ort(path, x).reshape(-1)
    for r in job.results["requests"]:
        got = np.asarray(r["output"], np.float32)
        assert got.shape == want.shape and rel_err(got, want) <= RTOL, (name, r["request"], rel_err(got, want))
    depthwise = [layer.name for layer in model.linear_layers
                 if layer.attrs.get("groups", 1) == model.shapes()[layer.inputs[0]][0] > 1]
    assert all(plan.for_layer(d) is None for d in depthwise)


def test_2mr_replica_of_a_killed_worker_is_exact(exported, tmp_path):
    """Only AlexNet's grouped layers distributed (2MR): the killed worker's blocks come from its
    replica, so request 1 (worker killed at conv2) equals request 0 (all alive) bit for bit."""
    path, x_path, _ = exported["alexnet_2tower"]
    model, _ = load_onnx(path)
    grouped = [layer.name for layer in model.linear_layers if layer.attrs.get("groups", 1) > 1]
    others = [layer.name for layer in model.linear_layers if layer.name not in grouped]
    folder = tmp_path / "shards"
    manifest = _prepare(path, folder, "--keep-on-master", ",".join(others))
    assert [lp.layer for lp in manifest.plan.layers] == grouped and len(grouped) == 3
    assert all(lp.code == "replication" for lp in manifest.plan.layers)
    lp = manifest.plan.layers[0]
    job = _serve(manifest, folder, x_path, tmp_path, lp.ranks[0], lp.layer)
    first, second = (np.asarray(r["output"], np.float32) for r in job.results["requests"])
    assert np.array_equal(first, second)
    assert all(0 in rec["decoded_blocks"] for rec in job.results["requests"][1]["layers"])


def _keras_mobile(path, x):
    """The Keras mobile-layers graph of tests/test_importers.py (DepthwiseConv2D, SeparableConv2D,
    ZeroPadding2D, grouped Conv2D, Add) saved as HDF5; returns Keras's own output on ``x`` (CHW)."""
    keras = pytest.importorskip("keras", reason="keras (3, torch backend) writes the Keras file")
    from test_importers import _predict, _randomize_keras
    L = keras.layers
    inp = keras.Input(x.shape[1:] + x.shape[:1])
    h = L.ZeroPadding2D(((0, 1), (2, 1)))(inp)
    h = L.DepthwiseConv2D(3, strides=2, depth_multiplier=2, padding="same", activation="relu", name="dw")(h)
    h = L.Add()([L.SeparableConv2D(8, 3, padding="same", name="sep")(h),
                 L.Conv2D(8, 2, padding="same", groups=2, name="grouped")(h)])
    h = L.Conv2D(12, 3, name="after_pad")(L.ZeroPadding2D(1)(h))
    out = L.Softmax()(L.Dense(10)(L.Flatten()(L.MaxPooling2D(2)(h))))
    model = keras.Model(inp, out)
    _randomize_keras(model, 9)
    model.save(path)
    return _predict(model, x.transpose(1, 2, 0)[None])


def _onnx_block(name, path, x):
    """A DenseNet or Inception style block of tests/test_onnx_modern.py exported to ONNX; onnxruntime's output."""
    from test_modern_cnn import _randomise as randomise
    from test_onnx_modern import DenseBlock, InceptionBlock
    torch.manual_seed(11)
    net = randomise(DenseBlock() if name == "densenet_block" else InceptionBlock(), 12)
    _export(torch, net, torch.from_numpy(x)[None], path)
    return run_ort(path, x)


@pytest.mark.parametrize("name, size, suffix", [("densenet_block", 32, "onnx"), ("inception_block", 31, "onnx"),
                                                ("keras_mobile", 27, "h5")])
def test_other_imported_graphs_served_with_a_worker_killed(tmp_path, name, size, suffix):
    """DenseNet's concatenations and 1x1-conv classifier, Inception's asymmetric pools and grouped conv,
    and Keras's depthwise/separable/grouped layers: distributed, a worker killed, the framework's output."""
    x = photo(size, size)
    if suffix == "h5":
        x = x[:, :size, :size - 2]
    path = tmp_path / f"{name}.{suffix}"
    want = (_keras_mobile if suffix == "h5" else lambda p, v: _onnx_block(name, p, v))(path, x)
    np.save(tmp_path / "x.npy", x)
    folder = tmp_path / "shards"
    manifest = _prepare(str(path), folder)
    lp = manifest.plan.layers[len(manifest.plan.layers) // 2]
    job = _serve(manifest, folder, tmp_path / "x.npy", tmp_path, lp.ranks[0], lp.layer)
    for r in job.results["requests"]:
        got = np.asarray(r["output"], np.float32)
        assert got.shape == want.reshape(-1).shape and rel_err(got, want.reshape(-1)) <= RTOL, (name, r["request"])


def test_tf2onnx_mobilenet_served_with_a_worker_killed(tmp_path):
    """The Keras MobileNet-style model exported by tf2onnx (committed fixture): 4 workers + sum parity,
    the worker holding the first block of a mid-network layer killed in request 1; every request
    equals TensorFlow's stored output within RTOL (and the serial forward, by --check)."""
    import os
    path = os.path.join(FIXTURES, "tf2onnx_mobile.onnx")
    data = np.load(os.path.join(FIXTURES, "tf2onnx_mobile.npz"))
    np.save(tmp_path / "x.npy", data["x"][0].transpose(2, 0, 1))  # TF takes NHWC, mpicdc CHW
    want = data["y"][0]
    folder = tmp_path / "shards"
    manifest = _prepare(path, folder)
    plan, model = manifest.plan, manifest.model
    assert model.name == "tf2onnx_mobile"
    assert all(lp.code == "sum" for lp in plan.layers) and len(plan.layers) == 9  # 8 pointwise/stem convs + dense
    depthwise = [layer.name for layer in model.linear_layers
                 if layer.attrs.get("groups", 1) == model.shapes()[layer.inputs[0]][0] > 1]
    assert len(depthwise) == 3 and all(plan.for_layer(d) is None for d in depthwise)
    lp = plan.layers[len(plan.layers) // 2]
    job = _serve(manifest, folder, tmp_path / "x.npy", tmp_path, lp.ranks[0], lp.layer)
    for r in job.results["requests"]:
        got = np.asarray(r["output"], np.float32)
        assert got.shape == want.shape and rel_err(got, want) <= RTOL, (r["request"], rel_err(got, want))
