"""The master sends a worker only the input it reads: nothing for layers it has no block of, and for a
grouped convolution split by whole groups only its groups' input channels.

Checked by counting the jobs on the in-process fake network (real loops, real shards) and on real
ranks (AlexNet's two towers), with every output compared with the serial float32 forward.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi_helpers import requires_mpi, run_job
from test_protocol import cluster  # noqa: F401 - cluster is a fixture

from mpicdc import store
from mpicdc.core.models import GraphBuilder, get_model
from mpicdc.core.plan import make_plan
from mpicdc.runtime import wire
from mpicdc.runtime.slices import job_shape, needed_channels


def grouped_model():
    """Small, with two grouped convs: groups=4 (two groups per worker of 2) and groups=2 (one each)."""
    b = GraphBuilder("grouped_small", (8, 12, 12), "test model: grouped convolutions")
    x = b.conv_relu("input", 16, 3, padding=1, name="conv1")
    x = b.conv_relu(x, 16, 3, padding=1, name="conv2", groups=4)
    x = b.conv_relu(x, 8, 3, padding=1, name="conv3", groups=2)
    x = b.flatten(x, name="flatten")
    b.dense(x, 10, name="fc")
    return b.build()


def test_needed_channels_of_whole_group_blocks():
    model = grouped_model()
    plan = make_plan(model, 2, code="none")
    lp2, lp3, lp1 = plan.for_layer("conv2"), plan.for_layer("conv3"), plan.for_layer("conv1")
    assert [needed_channels(model, lp2, b) for b in range(2)] == [(0, 8), (8, 16)]
    assert [needed_channels(model, lp3, b) for b in range(2)] == [(0, 8), (8, 16)]
    assert [needed_channels(model, lp1, b) for b in range(2)] == [None, None]
    assert job_shape(model, lp2, 1) == (8, 12, 12)   # 8 of conv2's 16 input channels
    assert job_shape(model, lp1, 0) == (8, 12, 12)   # the whole model input


def _counting(log):
    def rule(source, dest, tag, message):
        if source == 0 and tag == wire.TAG_JOB:
            head = wire.Header.unpack(message)
            if head.kind == wire.JOB:
                log.append((dest, head.layer, tuple(head.shape), message.nbytes))
        return [(0.0, message)]
    return rule


def test_grouped_blocks_get_only_their_channels_and_compute_the_same(tmp_path, cluster):  # noqa: F811
    model = grouped_model()
    plan = make_plan(model, 2, code="none")
    folder = store.ensure_prepared(model, plan, tmp_path)
    jobs = []
    c = cluster(folder, _counting(jobs))
    r = c.infer()  # compared with the serial float32 forward inside (relative 1e-4)
    assert r.ok, r.error
    index = {layer.name: i for i, layer in enumerate(model.linear_layers)}
    shapes = {(dest, li): shape for dest, li, shape, _ in jobs}
    assert shapes[1, index["conv2"]] == shapes[2, index["conv2"]] == (8, 12, 12)   # 2 of 4 groups: half
    assert shapes[1, index["conv3"]] == shapes[2, index["conv3"]] == (8, 12, 12)   # 1 of 2 groups: half
    assert shapes[1, index["conv1"]] == (8, 12, 12)                                # not grouped: all
    conv2 = next(rec for rec in r.layers if rec.layer == "conv2")
    assert conv2.sent_bytes == 2 * (wire.HEADER_BYTES + 4 * 8 * 12 * 12)
    assert not [a for a in c.master.arrivals if a.status != "reply"]
    c.close()


def test_a_rank_without_a_block_of_a_layer_gets_no_job_for_it(tmp_path, cluster):  # noqa: F811
    model = get_model("tiny")
    plan = make_plan(model, 4, code="sum", layer_workers={"fc1": [1, 2]})
    folder = store.ensure_prepared(model, plan, tmp_path)
    jobs = []
    c = cluster(folder, _counting(jobs))
    assert c.infer().ok
    fc1 = [layer.name for layer in model.linear_layers].index("fc1")
    assert sorted(dest for dest, li, _, _ in jobs if li == fc1) == [1, 2, 5]  # data ranks 1, 2 and the parity rank
    c.close()


@requires_mpi
@pytest.mark.mpi
def test_two_tower_alexnet_on_real_ranks_sends_half_the_grouped_inputs(tmp_path):
    model = get_model("alexnet_2tower")
    plan = make_plan(model, 2, code="none")
    folder = store.ensure_prepared(model, plan, tmp_path / "shards")
    job = run_job(3, ["alexnet_2tower", "--weights", str(folder), "--repeat", "2", "--check"], tmp_path, timeout=300)
    assert job.returncode == 0, job.explain()
    assert "MATCHED" in job.stdout
    assert all(r["ok"] and r["check_rel_err"] <= 1e-4 for r in job.results["requests"])
    shapes = model.shapes()
    for rec in job.results["requests"][0]["layers"]:
        channels, *rest = shapes[model.layer(rec["layer"]).inputs[0]]
        whole = wire.HEADER_BYTES + 4 * int(np.prod([channels, *rest]))
        grouped = rec["layer"] in ("conv2", "conv4", "conv5")
        half = wire.HEADER_BYTES + 4 * int(np.prod([channels // 2, *rest]))
        assert rec["sent_bytes"] == 2 * (half if grouped else whole), rec
    assert not [a for a in job.results["arrivals"] if a["status"] not in ("reply", "skipped")]


def test_a_replica_gets_its_data_block_channels_and_a_sum_parity_the_whole_input():
    model = grouped_model()
    twomr = make_plan(model, 4, 1, "sum").for_layer("conv2")    # 2MR: blocks 0, 1 copied on ranks 5, 3
    assert twomr.code == "replication"
    assert [needed_channels(model, twomr, b) for b in range(4)] == [(0, 8), (8, 16), (0, 8), (8, 16)]
    coded = make_plan(model, 2, 1, "sum").for_layer("conv2")    # one parity slab per data block: all groups
    assert coded.code == "sum"
    assert [needed_channels(model, coded, b) for b in range(3)] == [(0, 8), (8, 16), None]


def test_a_replica_fed_its_groups_only_stands_for_its_killed_data_worker(tmp_path, cluster):  # noqa: F811
    model = grouped_model()
    plan = make_plan(model, 4, 1, "sum")
    folder = store.ensure_prepared(model, plan, tmp_path)
    jobs = []
    c = cluster(folder, _counting(jobs))
    c.kill(1)  # data worker of conv2's block 0, whose replica is on rank 5
    r = c.infer()  # compared with the serial float32 forward inside (relative 1e-4)
    assert r.ok, r.error
    conv2 = [layer.name for layer in model.linear_layers].index("conv2")
    assert {dest: shape for dest, li, shape, _ in jobs if li == conv2}[5] == (8, 12, 12)
    record = next(rec for rec in r.layers if rec.layer == "conv2")
    assert 0 in record.decoded_blocks or 1 in record.missing_ranks, record
    c.close()
