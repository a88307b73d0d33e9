"""The master computing a band of a band layer itself: geometry, plan, simulator, auto plan, runtime."""
from __future__ import annotations

import numpy as np
import pytest
from test_bands import CASES, RTOL, _conv_model, _layer_output
from test_protocol import cluster  # noqa: F401 - cluster is a fixture

from mpicdc import store
from mpicdc.core import bands
from mpicdc.core.models import get_model
from mpicdc.core.plan import LayerPlan, Plan, make_plan, single_device_plan
from mpicdc.core.random_weights import init_weights
from mpicdc.sim import autoplan
from mpicdc.sim.engine import simulate


def _products(geo, weights, x, code):
    W, _ = weights["conv"]
    return [bands.band_conv(geo, W, xi) for xi in geo.inputs(x, code)]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n,master_rows", [(1, 1), (3, 2), (4, 5)])
def test_bands_plus_the_master_band_equal_the_layer_output(case, n, master_rows):
    model = _conv_model(*CASES[case])
    height = model.shapes()["conv"][1]
    if height - master_rows < n:
        pytest.skip(f"{height} output rows cannot make {n} bands and a master band of {master_rows}")
    weights = init_weights(model, seed=1)
    x = np.random.default_rng(2).standard_normal(model.input_shape).astype(np.float32)
    ref = _layer_output(model, weights, x)
    lp = make_plan(model, n, code="sum", bands=["conv"], master_rows={"conv": master_rows}).for_layer("conv")
    assert lp.master_rows == master_rows and lp.rows[-1][1] == height - master_rows
    geo = bands.layer_geometry(model, lp)
    assert geo.master == (height - master_rows, height)
    products = _products(geo, weights, x, lp.code_obj)
    own = bands.master_conv(geo, weights["conv"][0], x)
    scale = np.abs(ref).max()
    out = geo.assemble(products[:n], weights["conv"][1], own)
    assert np.abs(out - ref).max() <= RTOL * scale
    for lost in range(n):  # a lost worker band decoded from the others and the sum parity, the master's band present
        replies = {b: p for b, p in enumerate(products) if b != lost}
        decoded = geo.assemble(lp.code_obj.decode(replies), weights["conv"][1], own)
        assert np.abs(decoded - ref).max() <= RTOL * scale * n


def test_mds_r2_with_a_master_band_decodes_two_lost_worker_bands():
    model = _conv_model(*CASES["alexnet_conv1"])
    weights = init_weights(model, seed=3)
    x = np.random.default_rng(4).standard_normal(model.input_shape).astype(np.float32)
    ref = _layer_output(model, weights, x)
    lp = make_plan(model, 4, 2, "mds", bands=["conv"], master_rows={"conv": 11}).for_layer("conv")
    geo = bands.layer_geometry(model, lp)
    products = _products(geo, weights, x, lp.code_obj)
    replies = {b: p for b, p in enumerate(products) if b not in (0, 3)}
    out = geo.assemble(lp.code_obj.decode(replies), weights["conv"][1], bands.master_conv(geo, weights["conv"][0], x))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_assemble_insists_on_the_master_band_the_plan_gives():
    model = _conv_model(*CASES["3x3_pad1"])
    geo = bands.geometry(model, "conv", [(0, 10), (10, 20)], master_rows=10)
    blocks = [np.zeros(geo.block_shape, np.float32)] * 2
    with pytest.raises(ValueError, match="not given"):
        geo.assemble(blocks)
    with pytest.raises(ValueError, match="expected"):
        geo.assemble(blocks, master_out=np.zeros((12, 9, 21), np.float32))
    with pytest.raises(ValueError, match="no band"):
        bands.geometry(model, "conv", [(0, 30)]).master_input(np.zeros((8, 30, 21), np.float32))


def test_plan_round_trip_and_validation_of_master_rows():
    model = get_model("alexnet")
    plan = make_plan(model, 4, code="sum", bands=["conv2"], master_rows={"conv2": 7})
    lp = plan.for_layer("conv2")
    assert lp.master_rows == 7 and lp.rows[-1][1] == 20
    again = Plan.from_json(plan.to_json())
    assert again == plan
    d = lp.to_dict()
    assert d["master_rows"] == 7
    del d["master_rows"]  # an old plan file: no master band, then its bands must tile all 27 rows
    with pytest.raises(ValueError, match="27 output rows"):
        LayerPlan.from_dict(d).validate(model, plan.world_size)
    assert "master_rows" not in make_plan(model, 4, code="sum", bands=["conv2"]).for_layer("conv2").to_dict()
    bad = LayerPlan("fc6", "sum", (1, 2, 3, 4, 5), plan.for_layer("fc6").rows, "rows", 3)
    with pytest.raises(ValueError, match="needs a band split"):
        bad.validate(model, plan.world_size)
    with pytest.raises(ValueError, match="master_rows"):
        LayerPlan("conv2", "sum", lp.ranks, lp.rows, "bands", 27).validate(model)
    with pytest.raises(ValueError, match="not split into bands"):
        make_plan(model, 4, code="sum", bands=["conv2"], master_rows={"conv3": 2})


def test_the_simulator_overlaps_the_master_band_with_the_workers():
    model = get_model("alexnet")
    without = make_plan(model, 4, code="sum", bands=["conv2"])
    with_band = make_plan(model, 4, code="sum", bands=["conv2"], master_rows={"conv2": 7})
    t0 = autoplan.layer_costs(model, without, "rpi3", "100mbit")["conv2"]
    t1 = autoplan.layer_costs(model, with_band, "rpi3", "100mbit")["conv2"]
    alone = autoplan.layer_costs(model, single_device_plan(model), "rpi3", "100mbit")["conv2"]
    assert t1 < t0 < alone
    # the master's band is not covered by parity: losing a worker still decodes, and nothing is lost twice
    r = simulate(model, with_band, requests=3, device="rpi3", failures=[2])
    assert r.ok.all()


@pytest.mark.parametrize("model_name,link", [("alexnet", "100mbit"), ("alexnet", 25e6), ("vgg16", "100mbit"),
                                             ("vgg16", "20mbit")])
def test_auto_plan_with_master_bands_never_models_worse(model_name, link):
    from mpicdc.bench.speedup import wire_link
    model = get_model(model_name)
    rate = wire_link(link, "float16") if isinstance(link, str) else link
    plan = autoplan.auto_plan(model, 4, "sum", "rpi3", rate)
    t = autoplan.modeled_latency(model, plan, "rpi3", rate)
    for other in (make_plan(model, 4, code="sum"), single_device_plan(model)):
        assert t <= autoplan.modeled_latency(model, other, "rpi3", rate) * (1 + 1e-9)
    plan.validate(model)
    for lp in plan.layers:  # every master band the plan picks is one the geometry takes
        if lp.master_rows:
            assert bands.layer_geometry(model, lp).master[1] == model.shapes()[lp.layer][1]


def test_auto_plan_master_bands_respect_memory_limits():
    from mpicdc.core.plan import rank_bytes
    model = get_model("alexnet")
    rate = 25e6  # 100 Mbit/s carrying float16
    free = autoplan.auto_plan(model, 4, "sum", "rpi3", rate)
    assert all(lp.master_rows for lp in free.layers if lp.banded) and len([lp for lp in free.layers if lp.banded]) == 4
    rows_only = autoplan.auto_plan(model, 4, "sum", "rpi3", rate, bands=False)
    limit = 1.05 * max(rank_bytes(rows_only, model).values())  # no room for four whole kernels on every worker
    tight = autoplan.auto_plan(model, 4, "sum", "rpi3", rate, memory_limit=limit)
    assert max(rank_bytes(tight, model).values()) <= limit
    banded = [lp for lp in tight.layers if lp.banded]
    assert 0 < len(banded) < 4 and all(lp.master_rows for lp in banded)  # a master band costs no memory
    t_tight = autoplan.modeled_latency(model, tight, "rpi3", rate)
    assert t_tight <= autoplan.modeled_latency(model, rows_only, "rpi3", rate)


def test_master_choices_cover_each_worker_height_once():
    model = get_model("alexnet")  # conv2: 27 output rows over 4 workers
    assert autoplan.master_band_choices(model, "conv2", 4) == [0, 3, 7]  # up to 2 x 27 / 5 rows
    vgg = get_model("vgg16")  # conv1_2: 224 rows over 1 worker: many sizes, 8 kept, the largest among them
    sizes = autoplan.master_band_choices(vgg, "conv1_2", 1)
    assert len(sizes) == 1 + autoplan.MAX_MASTER_CHOICES and sizes == sorted(set(sizes)) and sizes[-1] == 223


# ------------------------------------------------------------------ runtime over the fake network

@pytest.fixture(scope="module")
def tiny_master_bands(tmp_path_factory):
    model = get_model("tiny")
    plan = make_plan(model, 4, code="sum", bands=["conv1", "conv2"], master_rows={"conv1": 4, "conv2": 1})
    return store.prepare(model, plan, tmp_path_factory.mktemp("mb") / "sum").directory


def test_runtime_with_master_bands_matches_the_reference_and_decodes_a_lost_rank(
        tiny_master_bands, cluster):  # noqa: F811
    c = cluster(tiny_master_bands, integrity="strict")
    assert store.verify(tiny_master_bands) == []
    first = c.infer()  # checked against the serial forward within RTOL by the fixture
    assert first.ok, first.error
    conv1 = next(rec for rec in first.layers if rec.layer == "conv1")
    assert conv1.master_s > 0 and conv1.checks and not first.flagged
    # 4 + 1 blocks of 3 output rows (12 = 16 - 4 rows) reading 5 input rows of 16
    from mpicdc.runtime import wire
    assert conv1.sent_bytes == 5 * (wire.HEADER_BYTES + 4 * 3 * 5 * 16)
    c.kill(2)
    for _ in range(2):
        r = c.infer()
        assert r.ok, r.error
        assert any(rec.decoded_blocks == [1] for rec in r.layers if rec.layer == "conv1")
    assert c.close() == []
