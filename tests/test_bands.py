"""Spatial (band) split of conv layers: geometry, encode and decode against the serial forward."""
from __future__ import annotations

import numpy as np
import pytest

from mpicdc.core import bands
from mpicdc.core.kernels import forward
from mpicdc.core.models import GraphBuilder, get_model
from mpicdc.core.plan import LayerPlan, Plan, make_plan
from mpicdc.core.random_weights import init_weights

RTOL = 1e-5  # relative to the layer output's largest value: float32 sums in another order


def _conv_model(in_shape, out, kernel, stride, padding, groups=1):
    b = GraphBuilder("band_case", in_shape)
    b.conv("input", out, kernel, stride, padding, name="conv", groups=groups)
    return b.build()


CASES = {  # (input shape, out channels, kernel, stride, padding, groups)
    "alexnet_conv1": ((3, 227, 227), 16, 11, 4, 0, 1),
    "alexnet_conv1_pad2": ((3, 224, 224), 8, 11, 4, 2, 1),
    "3x3_pad1": ((8, 30, 21), 12, 3, 1, 1, 1),
    "1x1": ((16, 13, 13), 24, 1, 1, 0, 1),
    "5x5_stride2_asym": ((4, 17, 19), 6, 5, 2, [[2, 1], [0, 3]], 1),
    "grouped": ((8, 27, 27), 16, 5, 1, 2, 2),
    "depthwise": ((8, 14, 14), 8, 3, 2, 1, 8),
}


def _layer_output(model, weights, x):
    return forward(model, weights, x, return_all=True)["conv"]


def _products(geo, model, weights, x, code):
    W, _ = weights["conv"]
    return [bands.band_conv(geo, W, xi) for xi in geo.inputs(x, code)]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [1, 3, 4])
def test_assembled_bands_equal_the_layer_output(case, n):
    model = _conv_model(*CASES[case])
    weights = init_weights(model, seed=1)
    x = np.random.default_rng(2).standard_normal(model.input_shape).astype(np.float32)
    ref = _layer_output(model, weights, x)
    height = model.shapes()["conv"][1]
    if height < n:
        pytest.skip(f"{height} output rows cannot make {n} bands")
    plan = make_plan(model, n, code="sum", bands=["conv"])
    lp = plan.for_layer("conv")
    geo = bands.geometry(model, "conv", lp.rows)
    products = _products(geo, model, weights, x, lp.code_obj)
    assert all(p.shape == geo.block_shape for p in products)
    out = geo.assemble(products[:n], weights["conv"][1])
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= RTOL * scale
    # every data band decoded from the others and the sum parity gives the same output
    for lost in range(n):
        replies = {b: p for b, p in enumerate(products) if b != lost}
        decoded = geo.assemble(lp.code_obj.decode(replies), weights["conv"][1])
        assert np.abs(decoded - ref).max() <= RTOL * scale * n


@pytest.mark.parametrize("case", ["alexnet_conv1", "3x3_pad1", "grouped"])
def test_mds_r2_decodes_two_lost_bands(case):
    model = _conv_model(*CASES[case])
    weights = init_weights(model, seed=3)
    x = np.random.default_rng(4).standard_normal(model.input_shape).astype(np.float32)
    ref = _layer_output(model, weights, x)
    plan = make_plan(model, 4, 2, "mds", bands=["conv"])
    lp = plan.for_layer("conv")
    geo = bands.geometry(model, "conv", lp.rows)
    products = _products(geo, model, weights, x, lp.code_obj)
    replies = {b: p for b, p in enumerate(products) if b not in (0, 2)}
    out = geo.assemble(lp.code_obj.decode(replies), weights["conv"][1])
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_band_inputs_carry_the_halo_and_zero_padding():
    model = _conv_model((2, 10, 5), 3, 3, 1, 1)
    geo = bands.geometry(model, "conv", [(0, 4), (4, 7), (7, 10)])
    assert (geo.height, geo.in_height) == (4, 6)
    assert [geo.input_rows(i) for i in range(3)] == [(-1, 5), (3, 9), (6, 12)]
    x = np.arange(100, dtype=np.float32).reshape(2, 10, 5)
    first, last = geo.band_input(x, 0), geo.band_input(x, 2)
    assert first.shape == last.shape == (2, 6, 5)
    assert not first[:, 0].any() and np.array_equal(first[:, 1:], x[:, :5])
    assert np.array_equal(last[:, :4], x[:, 6:]) and not last[:, 4:].any()


def test_bands_traffic_is_about_one_input_not_n_plus_r():
    model = get_model("alexnet")
    plan = make_plan(model, 4, code="sum", bands=["conv2"])
    geo = bands.geometry(model, "conv2", plan.for_layer("conv2").rows)
    whole = np.prod(model.shapes()[model.layer("conv2").inputs[0]])
    sent = bands.traffic(geo, 1)["send"]
    assert sent == 5 * 96 * (7 + 4) * 27  # 5 blocks of 7 output rows reading 11 of 27 input rows (5x5 halo)
    assert sent < 0.45 * 5 * whole        # output splitting sends the whole input to all 5


def test_bad_bands_and_layers_are_refused():
    model = get_model("alexnet")
    with pytest.raises(ValueError, match="tile its 55 output rows"):
        bands.geometry(model, "conv1", [(0, 20), (21, 55)])
    with pytest.raises(ValueError, match="only conv layers"):
        make_plan(model, 4, code="sum", bands=["fc6"])
    with pytest.raises(ValueError, match="not a 2-D conv"):
        make_plan(get_model("c3d"), 4, code="sum", bands=["conv1a"])
    with pytest.raises(ValueError, match="split 'cols'"):
        LayerPlan("conv1", "sum", (1, 2, 3), ((0, 30), (30, 55)), "cols").validate(model)


def test_plan_round_trip_and_old_plans_load():
    model = get_model("alexnet")
    plan = make_plan(model, 4, code="sum", bands=["conv1", "conv2"])
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.for_layer("conv1").banded and not back.for_layer("fc6").banded
    old = plan.to_json().replace(', "split": "bands"', "")
    assert '"split"' not in old
    assert not Plan.from_json(old).for_layer("conv1").banded
    with pytest.raises(ValueError, match="output rows"):  # bands over output channels of a row split
        Plan.from_json(plan.to_json().replace('"rows": [[0, 14], [14, 28], [28, 42], [42, 55]], "split": "bands"',
                                              '"rows": [[0, 14], [14, 28], [28, 42], [42, 96]], "split": "bands"'))\
            .validate(model)
