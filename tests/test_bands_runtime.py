"""Band-split layers through prepare and the real master/worker loops over the fake network."""
from __future__ import annotations

import numpy as np
import pytest
from test_protocol import RTOL, cluster  # noqa: F401 - cluster is a fixture

from mpicdc import store
from mpicdc.core.models import get_model
from mpicdc.core.plan import format_plan_table, make_plan
from mpicdc.core.wirefmt import check_tolerance
from mpicdc.runtime import wire

BANDED = ["conv1", "branch_b", "proj", "conv2"]  # tiny's convs: 3x3 pad 1, 1x1


@pytest.fixture(scope="module")
def tiny_bands_sum(tmp_path_factory):
    model = get_model("tiny")
    plan = make_plan(model, 4, code="sum", bands=BANDED)
    return store.prepare(model, plan, tmp_path_factory.mktemp("bands") / "sum").directory


@pytest.fixture(scope="module")
def tiny_bands_mds(tmp_path_factory):
    model = get_model("tiny")
    plan = make_plan(model, 3, 2, "mds", bands=BANDED)
    return store.prepare(model, plan, tmp_path_factory.mktemp("bands") / "mds").directory


def test_prepare_gives_every_rank_of_a_band_layer_the_whole_kernel(tiny_bands_sum):
    manifest = store.open_manifest(tiny_bands_sum)
    model, plan = manifest.model, manifest.plan
    assert {lp.layer for lp in plan.layers if lp.banded} == set(BANDED)
    weights = store.reference_weights(manifest)
    for rank in range(plan.world_size):
        blocks = store.load_rank(tiny_bands_sum, rank, manifest)
        for name in BANDED:
            W, b = blocks[name]
            assert np.array_equal(W, weights[name][0]) and np.array_equal(b, weights[name][1])
    assert store.verify(tiny_bands_sum) == []
    table = format_plan_table(plan, model)
    assert "4+1 bands" in table and "out rows" in table


def test_verify_finds_a_band_block_that_differs(tmp_path):
    import h5py
    model = get_model("tiny")
    folder = store.prepare(model, make_plan(model, 2, code="sum", bands=["conv2"]), tmp_path / "w").directory
    manifest = store.open_manifest(folder)
    path = manifest.path(2)
    with h5py.File(path, "r+") as f:
        group = next(f"conv2/{k}" for k in f["conv2"] if k.startswith("band-block"))
        f[group]["W"][0, 0] += 1.0
    problems = store.verify(folder, ranks=[2])
    assert problems and any("corrupted" in p or "differs" in p for p in problems)


def test_bands_fault_free_and_with_a_lost_rank_match_the_reference(tiny_bands_sum, cluster):  # noqa: F811
    c = cluster(tiny_bands_sum, integrity="strict")
    first = c.infer()
    assert first.ok, first.error
    conv1 = next(rec for rec in first.layers if rec.layer == "conv1")
    # 5 blocks of 4 output rows reading 6 input rows of 16 each, not 5 whole 16-row inputs
    assert conv1.sent_bytes == 5 * (wire.HEADER_BYTES + 4 * 3 * 6 * 16)
    assert all(rec.checks for rec in first.layers)  # strict: every layer checked; the parity relation held
    assert not first.flagged
    c.kill(2)
    for _ in range(2):
        r = c.infer()
        assert r.ok, r.error
        assert any(rec.decoded_blocks == [1] for rec in r.layers if rec.layer in BANDED)
    assert c.close() == []


def test_bands_mds_two_dead_ranks(tiny_bands_mds, cluster):  # noqa: F811
    c = cluster(tiny_bands_mds)
    assert c.infer().ok
    c.kill(1)
    c.kill(3)
    for _ in range(2):
        r = c.infer()
        assert r.ok, r.error
        assert any(rec.decoded_blocks == [0, 2] for rec in r.layers if rec.layer == "conv2")
    c.close()


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_bands_on_a_half_wire_stay_within_the_check_tolerance_and_are_not_flagged(tiny_bands_mds, cluster, name):  # noqa: F811
    c = cluster(tiny_bands_mds, wire_format=name, integrity="strict")
    tol = 1e-3 + check_tolerance(c.manifest.plan, name)
    for kill in (None, 2):
        if kill:
            c.kill(kill)
        r = c.master.infer(c.x)
        assert r.ok, r.error
        assert not r.flagged, [f.to_dict() for f in r.integrity]
        err = np.max(np.abs(r.output - c.reference)) / np.max(np.abs(c.reference))
        assert err <= tol
    c.close()


def test_a_wrong_band_reply_is_located_and_decoded_around(tiny_bands_mds, cluster):  # noqa: F811
    from mpicdc.core.faults import parse_injections
    c = cluster(tiny_bands_mds, injections=parse_injections(["corrupt:2@0:conv2=noise"]), integrity="strict")
    r = c.infer()
    assert r.ok, r.error
    assert r.flagged and r.integrity[0].layer == "conv2" and r.integrity[0].rank == 2 and r.integrity[0].corrected
    assert 2 in c.master.quarantined
    c.close()


def test_a_spare_takes_over_a_lost_band_rank(tiny_bands_sum, cluster):  # noqa: F811
    from test_healing import healed, serve_until

    c = cluster(tiny_bands_sum, spares=1)
    assert c.infer().ok
    c.kill(2)
    serve_until(c, healed(c))
    assert c.master.healer.takeovers[0].spare == 6
    serve_until(c, lambda: any(a.rank == 6 and a.status == "reply" and a.layer in BANDED
                               for a in c.master.arrivals))
    c.kill(3)  # the sum parity covers this one too, with the spare computing band 1
    r = c.infer()
    assert r.ok, r.error
    assert any(rec.decoded_blocks == [2] for rec in r.layers if rec.layer in BANDED)
    c.close()
