"""Distribution of grouped and depthwise convolutions (issue 12, item 3).

``make_plan`` keeps depthwise layers on the master, splits other grouped layers
by whole groups when the code has no parity blocks (a parity block would sum
blocks that read different input channels) and there are enough groups, and
keeps them on the master otherwise; ``format_plan_table`` (``prepare --show``)
says which and why.  Then the real master and worker loops run such plans in
one process over the fake network (tests/test_protocol.py's ``Cluster``), with
and without a dead worker, against the serial reference forward.
"""
from __future__ import annotations

import pytest
from test_protocol import Cluster

from mpicdc import store
from mpicdc.core.models import GraphBuilder, get_model
from mpicdc.core.plan import LayerPlan, format_plan_table, make_plan


def small_grouped_model():
    """Grouped (4 groups, asymmetric pads), depthwise, ReLU6, hard-swish, shuffle, a 3-input add,
    and a 1x1 conv on the 1x1 output of a global pool."""
    b = GraphBuilder("grouped_small", (4, 12, 12))
    x = b.conv_relu("input", 8, 3, padding=1, name="conv1")
    x = b.relu6(b.conv(x, 12, 3, padding=[[0, 1], [1, 2]], groups=4, name="grouped"), name="grouped_relu6")
    x = b.hardswish(b.conv(x, 12, 3, stride=2, padding=1, groups=12, name="dw"), name="dw_hswish")
    x = b.channel_shuffle(x, 3, name="shuffle")
    y = b.add([b.conv(x, 6, 1, name=f"pw{i}") for i in range(3)], name="add3")
    g = b.conv(b.gap(x, keepdims=True, name="gap"), 6, 1, name="squeeze")
    x = b.concat([b.flatten(y, name="flat_y"), b.flatten(g, name="flat_g")], name="cat")
    b.dense(x, 10, name="fc")
    return b.build()


def test_depthwise_stays_on_the_master_and_grouped_splits_by_whole_groups():
    model = small_grouped_model()
    plan = make_plan(model, 3, None, "none")
    assert plan.for_layer("dw") is None
    grouped = plan.for_layer("grouped")
    assert grouped.rows == ((0, 6), (6, 9), (9, 12))          # 4 groups of 3 rows over 3 workers
    assert all(a % 3 == 0 and b % 3 == 0 for a, b in grouped.rows)
    assert plan.for_layer("conv1").rows == ((0, 3), (3, 6), (6, 8))
    table = format_plan_table(plan, model)
    assert "master (depthwise)" in table and "3+0 (4 groups)" in table


def test_grouped_layers_stay_on_the_master_with_parity_or_too_few_groups():
    model = small_grouped_model()
    coded = make_plan(model, 3, 1, "sum")
    assert coded.for_layer("grouped") is None and coded.for_layer("conv1").r == 1
    assert "master (grouped, coded)" in format_plan_table(coded, model)
    many = make_plan(model, 5, None, "none")
    assert many.for_layer("grouped") is None
    assert "master (4 groups < 5 workers)" in format_plan_table(many, model)
    assert make_plan(model, 2, None, "none", speeds=[3, 1]).for_layer("grouped").rows == ((0, 9), (9, 12))


def test_a_plan_giving_a_grouped_layer_parity_is_refused():
    model = small_grouped_model()
    plan = make_plan(model, 3, None, "none")
    bad = LayerPlan("grouped", "sum", (1, 2, 3, 4), plan.for_layer("grouped").rows)
    with pytest.raises(ValueError, match="grouped convolution .* cannot have parity blocks"):
        bad.validate(model)


@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet_v2", "alexnet_2tower", "resnet18"])
def test_zoo_plans(name):
    model = get_model(name)
    for workers, parity, code in ((4, 1, "sum"), (2, None, "none")):
        plan = make_plan(model, workers, parity, code)
        shapes = model.shapes()
        for layer in model.linear_layers:
            groups = layer.attrs.get("groups", 1)
            lp = plan.for_layer(layer.name)
            if groups == shapes[layer.inputs[0]][0] and groups > 1:
                assert lp is None, layer.name                         # depthwise
            elif groups > 1:
                assert (lp is None) == (plan.parity > 0 or groups < workers), layer.name
            else:
                assert lp is not None, layer.name


def test_grouped_conv_blocks_computed_by_workers_in_process(tmp_path):
    """No parity: the grouped layer runs on the workers (uneven blocks of whole groups, padded)."""
    model = small_grouped_model()
    folder = tmp_path / "none"
    store.prepare(model, make_plan(model, 3, None, "none"), folder)
    c = Cluster(folder)
    try:
        for _ in range(2):
            assert c.infer().ok      # Cluster.infer compares with the serial forward (1e-4 relative)
    finally:
        c.close()
    assert not c.errors


def test_coded_plan_survives_a_dead_worker_in_process(tmp_path):
    """Sum code: grouped and depthwise layers on the master, the rest decoded around a dead rank."""
    model = small_grouped_model()
    folder = tmp_path / "sum"
    store.prepare(model, make_plan(model, 3, 1, "sum"), folder)
    c = Cluster(folder)
    try:
        assert c.infer().ok
        c.kill(2)
        for _ in range(2):
            assert c.infer().ok
    finally:
        c.close()
    assert set(c.errors) <= {2}    # only the killed rank's loop ends (it lost the master)
