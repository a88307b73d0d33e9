"""Tests of the one graph walk (:mod:`mpicdc.core.graph`) and of the shapes a Model caches.

The walk is checked with executors that record what they are asked to do
(order, fusion, live values), and :func:`kernels.forward` -- the walk with a
:class:`LocalExecutor` -- against a naive per-layer reference that never fuses
and never drops anything.
"""
import numpy as np
import pytest

from mpicdc.core import kernels as K
from mpicdc.core import models as M
from mpicdc.core.graph import LayerExecutor, fused_relu, walk
from mpicdc.core.models import GraphBuilder, get_model
from mpicdc.core.random_weights import init_weights


class Recorder(LayerExecutor):
    """Values are layer names; records every call and its ``relu`` flag."""

    def __init__(self, fuses_relu=False):
        self.fuses_relu = fuses_relu
        self.calls = []

    def linear(self, layer, x, *, relu):
        self.calls.append((layer.name, relu))
        return layer.name

    def nonlinear(self, layer, inputs):
        self.calls.append((layer.name, None))
        return layer.name


class Token:
    """A value that counts how many of its kind are alive."""

    live = 0
    peak = 0

    def __init__(self):
        Token.live += 1
        Token.peak = max(Token.peak, Token.live)

    def __del__(self):
        Token.live -= 1


class Counter(LayerExecutor):
    """Values are :class:`Token` objects, so the peak number of live activations can be read."""

    fuses_relu = True

    def linear(self, layer, x, *, relu):
        return Token()

    def nonlinear(self, layer, inputs):
        return Token()


def _fused_names(model):
    return {fused_relu(model, layer).name for layer in model.linear_layers if fused_relu(model, layer)}


@pytest.mark.parametrize("name", ["tiny", "inception_v3"])
def test_walk_visits_every_layer_once_in_order(name):
    model = get_model(name)
    rec = Recorder()
    assert walk(model, "input", rec) == model.output
    assert [c[0] for c in rec.calls] == [layer.name for layer in model.layers]
    assert all(relu is not True for _, relu in rec.calls)          # not declared: never fused


@pytest.mark.parametrize("name", ["tiny", "inception_v3"])
def test_fusing_walk_skips_only_the_fused_relus(name):
    model = get_model(name)
    rec = Recorder(fuses_relu=True)
    out = walk(model, "input", rec)
    fused = _fused_names(model)
    assert fused                                                    # both models have some
    assert [c[0] for c in rec.calls] == [layer.name for layer in model.layers if layer.name not in fused]
    relu_flags = {n: relu for n, relu in rec.calls if relu is not None}
    assert {n for n, relu in relu_flags.items() if relu} == {
        layer.name for layer in model.linear_layers if fused_relu(model, layer)}
    assert out == model.output


def test_keep_all_never_fuses_and_keeps_everything():
    model = get_model("tiny")
    rec = Recorder(fuses_relu=True)
    values = walk(model, "input", rec, keep_all=True)
    assert [c[0] for c in rec.calls] == [layer.name for layer in model.layers]
    assert not any(relu for _, relu in rec.calls)
    assert set(values) == {"input"} | {layer.name for layer in model.layers}


def _conv_relu_model(extra_reader: bool, relu_last: bool = True):
    b = GraphBuilder("t", (2, 5, 5))
    c = b.conv("input", 3, 3, padding=1, name="conv")
    r = b.relu(c, name="relu")
    if extra_reader:
        r = b.add([c, r], name="add")
    if not relu_last:
        b.maxpool(r, 2, name="pool")
    return b.build()


def test_fusion_only_when_the_relu_is_the_only_reader():
    model = _conv_relu_model(extra_reader=False)
    assert fused_relu(model, model.layer("conv")).name == "relu"    # also legal when the ReLU is the output
    assert fused_relu(model, model.layer("relu")) is None           # not linear
    model = _conv_relu_model(extra_reader=True)
    assert fused_relu(model, model.layer("conv")) is None           # "add" reads the pre-ReLU value
    rec = Recorder(fuses_relu=True)
    walk(model, "input", rec)
    assert rec.calls == [("conv", False), ("relu", None), ("add", None)]


def test_no_fusion_for_the_output_layer():
    b = GraphBuilder("t", (4,))
    b.dense(b.relu("input", name="r"), 3, name="fc")
    model = b.build()
    assert model.output == "fc" and fused_relu(model, model.layer("fc")) is None
    # a linear output also read by nobody: its value is returned unfused
    weights = init_weights(model)
    x = np.array([-1.0, 2.0, -3.0, 4.0], np.float32)
    W, bias = weights["fc"]
    np.testing.assert_allclose(K.forward(model, weights, x), W @ np.maximum(x, 0) + bias, rtol=1e-6)


@pytest.mark.parametrize("relu_last", [True, False])
@pytest.mark.parametrize("extra_reader", [True, False])
def test_forward_fused_equals_unfused_on_small_graphs(extra_reader, relu_last):
    model = _conv_relu_model(extra_reader, relu_last)
    weights = init_weights(model, 3)
    x = K.default_input(model, 4) - 0.5
    ref = K.forward(model, weights, x, return_all=True)[model.output]   # keep_all: no fusion
    np.testing.assert_array_equal(K.forward(model, weights, x), ref)


@pytest.mark.parametrize("name", ["tiny", "inception_v3"])
def test_activations_are_released_after_their_last_reader(name):
    model = get_model(name)
    Token.live = Token.peak = 0
    x = Token()
    out = walk(model, x, Counter())
    del x
    peak = Token.peak
    assert Token.live == 1                                          # only the output is left
    del out
    assert peak < len(model.layers)
    # the widest cut of inception_v3 is a handful of branches, far below its 300-odd layers
    assert peak <= 8
    Token.live = Token.peak = 0
    values = walk(model, Token(), Counter(), keep_all=True)
    assert Token.peak == Token.live == len(values) == len(model.layers) + 1
    del values


def test_timings_give_a_fused_relu_zero():
    model = _conv_relu_model(extra_reader=False, relu_last=False)
    timings = {}
    K.forward(model, init_weights(model), K.default_input(model), timings=timings)
    assert list(timings) == ["conv", "relu", "pool"]                # layer order
    assert timings["relu"] == 0.0 and timings["conv"] > 0 and timings["pool"] > 0


def _naive_forward(model, weights, x):
    """Per-layer reference: plain lower + GEMM + finish for linear layers, no fusion, nothing dropped."""
    acts = {"input": K.check_input(model, x)}
    for layer in model.layers:
        ins = [acts[i] for i in layer.inputs]
        if layer.is_linear:
            W, b = weights[layer.name]
            lo = K.lower(layer, ins[0])
            acts[layer.name] = lo.finish(K.gemm(W, b, lo.X))
        else:
            acts[layer.name] = K.nonlinear(layer, ins)
    return acts


@pytest.mark.parametrize("name", ["tiny", "alexnet"])
def test_forward_equals_naive_unfused_reference(name):
    model = get_model(name)
    weights = init_weights(model, 1)
    x = K.default_input(model, 2)
    ref = _naive_forward(model, weights, x)
    got = K.forward(model, weights, x)
    np.testing.assert_allclose(got, ref[model.output], rtol=1e-6, atol=1e-9)
    if name == "tiny":
        every = K.forward(model, weights, x, return_all=True)
        assert set(every) == set(ref)
        for layer in model.layers:
            np.testing.assert_allclose(every[layer.name], ref[layer.name], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- Model caches its derived data

def test_model_computes_shapes_once_and_hands_out_copies(monkeypatch):
    model = get_model("tiny")
    calls = []
    real = M.infer_shape
    monkeypatch.setattr(M, "infer_shape", lambda layer, ins: calls.append(layer.name) or real(layer, ins))
    shapes = model.shapes()
    assert model.shapes() == shapes and model.shapes() is not shapes
    model.weight_shapes(), model.flops()
    assert len(calls) == len(model.layers)                          # once, for every caller
    shapes["conv1"] = (0,)
    shapes.clear()
    ws = model.weight_shapes()
    ws.clear()
    assert model.shapes()["conv1"] == (8, 16, 16)
    assert model.weight_shapes()["conv1"] == (8, 27)


def test_model_cache_is_per_model_and_invisible_to_equality():
    a, b = get_model("tiny"), get_model("tiny")
    a.shapes()
    assert a == b and hash(a) == hash(b)
    assert M.Model.from_json(a.to_json()) == a


def test_readers_are_read_only_and_ordered():
    model = get_model("tiny")
    readers = model.readers()
    assert [layer.name for layer in readers["lrn1"]] == ["branch_a", "branch_b"]
    assert model.output not in readers
    with pytest.raises(TypeError):
        readers["lrn1"] = ()
    assert model.readers() is readers
