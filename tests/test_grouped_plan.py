"""Distribution and protection of grouped and depthwise convolutions (issue 12, item 3).

``make_plan`` keeps depthwise layers on the master and, with parity workers, protects
each other grouped layer the cheapest way (``mpicdc.core.grouped``): a code whose
parity blocks are block-diagonal embeddings, 2MR replicas, or the master; without
parity it splits them by whole groups when there are enough.  ``format_plan_table``
(``prepare --show``) says which, why and at what cost.  The store writes and verifies
embedded parity; then the real master and worker loops run such plans in one process
over the fake network (tests/test_protocol.py's ``Cluster``), with and without a dead
worker, against the serial reference forward.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_protocol import Cluster

from mpicdc import store
from mpicdc.core import grouped
from mpicdc.core.models import GraphBuilder, get_model
from mpicdc.core.plan import format_plan_table, make_plan


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


def test_grouped_layers_without_parity_stay_on_the_master_with_too_few_groups():
    model = small_grouped_model()
    many = make_plan(model, 5, None, "none")
    assert many.for_layer("grouped") is None
    assert "master (4 groups < 5 workers)" in format_plan_table(many, model)
    assert make_plan(model, 2, None, "none", speeds=[3, 1]).for_layer("grouped").rows == ((0, 9), (9, 12))


@pytest.mark.parametrize("workers, parity, code, kind, ranks, rows", [
    # sum parity would embed 3 blocks (3x a block of 6 padded rows); 2 blocks each copied are cheaper
    (3, 1, "sum", "replication", (1, 2, 4, 3), ((0, 6), (6, 12))),
    # one sum per data block: the code waits for 1/4 of the layer after a loss, as 2MR over
    # 4 + 4 ranks would: the tie goes to the code
    (4, 4, "groups:4", "groups:4", tuple(range(1, 9)), ((0, 3), (3, 6), (6, 9), (9, 12))),
    # MDS r = 2 survives two losses, 2MR one, so 2MR is not offered; the embedded parity waits
    # for the whole layer after a loss, as the master would, but for 1/4 of it with none
    (4, 2, "mds", "mds", tuple(range(1, 7)), ((0, 3), (3, 6), (6, 9), (9, 12))),
])
def test_grouped_protection_is_picked_by_cost(workers, parity, code, kind, ranks, rows):
    model = small_grouped_model()
    lp = make_plan(model, workers, parity, code).for_layer("grouped")
    assert (lp.code, lp.ranks, lp.rows) == (kind, ranks, rows)
    assert lp.code_obj.tolerance >= 1


def test_options_and_their_costs():
    """Costs by hand: the layer's FLOPs, blocks of whole groups padded to the largest one."""
    model = small_grouped_model()
    flops = grouped.layer_flops(model, "grouped")
    rows, cols = model.weight_shapes()["grouped"]
    assert flops == 2.0 * rows * cols * math.prod(model.shapes()["grouped"][1:])
    opts = {o.kind: o for o in grouped.options(model, "grouped", (1, 2, 3), (4,), "sum")}
    assert opts["code"].block == flops / 2            # blocks of 2, 1, 1 groups, padded to 6 of 12 rows
    assert opts["code"].parity == opts["code"].loss == 3 * flops / 2   # the sum embeds all 3 blocks
    assert opts["2mr"].parity == opts["2mr"].loss == flops / 2
    assert opts["master"].loss == flops
    assert grouped.choose(list(opts.values())).kind == "2mr"
    assert [o.kind for o in grouped.options(model, "grouped", (1, 2, 3), (4, 5), "mds")] == ["code", "master"]


def test_show_prints_each_grouped_layers_choice_and_cost():
    model = get_model("alexnet_2tower")
    table = format_plan_table(make_plan(model, 4, 1, "sum"), model)
    assert "conv2   256x1200  2+2 (2 groups)  1-2 | 3,5  replication" in table
    assert "conv2 (2 groups, 0.448 GFLOP): 2mr 2+2: block 0.224, replica 0.224 GFLOP (1.0x)" in table
    assert "master 0.448 GFLOP -> 2mr" in table
    small = small_grouped_model()
    table = format_plan_table(make_plan(small, 3, 1, "sum"), small)
    assert "code sum 3+1" in table and "(3.0x)" in table and "-> 2mr" in table
    assert "dw (12 groups" in table and "depthwise, on the master" in table


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
                assert (lp is None) == (not plan.parity and groups < workers), layer.name
                assert lp is None or not plan.parity or lp.code_obj.tolerance >= 1, layer.name
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
    """Sum code: depthwise layers on the master, the grouped one 2MR, the rest decoded around a dead rank."""
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


def test_embedded_parity_is_stored_and_verified(tmp_path):
    """MDS r = 2 over 4 blocks of one group: each parity block holds 4 slabs P[j, i] W_i side by side."""
    from test_integrity import _alter_parity
    model = small_grouped_model()
    plan = make_plan(model, 4, 2, "mds")
    lp = plan.for_layer("grouped")
    folder = tmp_path / "mds"
    store.prepare(model, plan, folder)
    assert store.verify(folder) == []
    W_full, _ = store.reference_weights(store.open_manifest(folder))["grouped"]
    cols = W_full.shape[1]
    for j in range(lp.r):
        W, _ = store.load_rank(folder, lp.ranks[lp.n + j])["grouped"]
        assert W.shape == (lp.block_rows, lp.n * cols)
        for i, (start, stop) in enumerate(lp.rows):
            want = lp.code_obj.parity[j, i] * W_full[start:stop].astype(np.float64)
            np.testing.assert_allclose(W[:, i * cols:(i + 1) * cols], want, rtol=2.0 ** -23, atol=0)
    _alter_parity(folder, lp.ranks[lp.n], "grouped")
    problems = store.verify(folder)
    assert len(problems) == 1 and "layer 'grouped': parity block 4 does not encode the data" in problems[0]


@pytest.mark.parametrize("workers, parity, code, kind", [(3, 1, "sum", "replication"), (4, 2, "mds", "mds")])
def test_grouped_layer_decoded_around_its_dead_data_worker_in_process(tmp_path, workers, parity, code, kind):
    """The rank holding the grouped layer's block 0 dies: the master rebuilds it from its replica
    (2MR) or the embedded parity (MDS); Cluster.infer compares with the serial forward (1e-4)."""
    model = small_grouped_model()
    plan = make_plan(model, workers, parity, code)
    lp = plan.for_layer("grouped")
    assert lp.code == kind
    folder = tmp_path / kind
    store.prepare(model, plan, folder)
    c = Cluster(folder)
    try:
        assert c.infer().ok
        c.kill(lp.ranks[0])
        for _ in range(2):
            result = c.infer()
            assert result.ok, result.error
            record = next(x for x in result.layers if x.layer == "grouped")
            assert 0 in record.decoded_blocks and lp.ranks[0] not in record.used
    finally:
        c.close()
    assert set(c.errors) <= {lp.ranks[0]}


def test_a_2mr_replica_gives_the_lost_block_exactly(tmp_path):
    """Only the grouped layer distributed: with its data worker dead the output is bit for bit
    the output with every worker alive (the replica computes the same product)."""
    model = small_grouped_model()
    others = [layer.name for layer in model.linear_layers if layer.name != "grouped"]
    plan = make_plan(model, 3, 1, "sum", keep_on_master=others)
    lp = plan.for_layer("grouped")
    assert [p.layer for p in plan.layers] == ["grouped"] and lp.code == "replication"
    store.prepare(model, plan, tmp_path / "2mr")
    c = Cluster(tmp_path / "2mr")
    try:
        before = c.infer().output
        c.kill(lp.ranks[0])
        after = c.infer()
        # block 0 can only come from its replica; block 1 too when its replica's reply is first in (a race)
        assert 0 in after.layers[0].decoded_blocks and lp.ranks[0] not in after.layers[0].used
        assert np.array_equal(before, after.output)
    finally:
        c.close()


def test_strict_integrity_checks_embedded_parity_and_corrects_a_wrong_grouped_block(tmp_path):
    """MDS r = 2 with the grouped layer coded: strict checks raise no false alarm on the embedded
    parity (its accumulation is 4 slabs of cols), and a wrong reply of the grouped layer is
    located, decoded around and its rank quarantined."""
    from mpicdc.core.faults import parse_injections
    model = small_grouped_model()
    plan = make_plan(model, 4, 2, "mds")
    assert plan.for_layer("grouped").code == "mds"
    store.prepare(model, plan, tmp_path / "mds")
    c = Cluster(tmp_path / "mds", injections=parse_injections(["corrupt:2@1:grouped=scale"]), integrity="strict")
    try:
        clean = c.infer()
        assert clean.ok and not clean.flagged
        assert all(rec.checks >= 1 for rec in clean.layers if rec.layer == "grouped")
        hit = c.infer()    # compared with the serial forward inside
        assert hit.ok and [(f.layer, f.rank, f.corrected) for f in hit.integrity] == [("grouped", 2, True)]
        assert c.master.quarantined == {2}
    finally:
        c.close()
