"""Healing with spare ranks: a lost rank's blocks move to a spare and the code's tolerance comes back.

In-process cases run the real master, worker and spare loops over the fake network (the
``Cluster`` of test_protocol.py, with spare threads) on real ``tiny`` shards; every output is
compared with the serial fault-free reference (``Cluster.infer``).  A second loss after healing
must cost no request: that is what "full tolerance" means.  The real mpiexec jobs are at the end.
"""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from mpi_helpers import requires_mpi, run_job
from test_protocol import cluster  # noqa: F401 - a fixture

from mpicdc import store
from mpicdc.core.faults import parse_injections
from mpicdc.core.models import get_model
from mpicdc.core.plan import make_plan
from mpicdc.runtime.healing import ShardMissing, load_shard, plan_ranks, reassign

DEADLINE_S = 30.0  # how long a test serves requests while waiting for a takeover (tiny: milliseconds each)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    made = {}

    def get(code, n, r):
        if (code, n, r) not in made:
            made[code, n, r] = store.prepare_zoo(tmp_path_factory.mktemp("shards"), "tiny", n, r, code)
        return made[code, n, r]
    return get


def serve_until(c, done) -> int:
    """Serve requests (each must succeed and match the reference) until ``done()``; returns how many."""
    end, count = time.monotonic() + DEADLINE_S, 0
    while time.monotonic() < end:
        r = c.infer()
        assert r.ok, r.error
        count += 1
        if done():
            return count
    pytest.fail(f"not done within {DEADLINE_S} s; takeovers: {[t.to_dict() for t in c.master.healer.takeovers]}")


def serve(c, count: int) -> None:
    """Serve ``count`` requests; each must succeed and match the reference."""
    for _ in range(count):
        r = c.infer()
        assert r.ok, r.error


def held_loader(directory):
    """A spare's shard loader that blocks until released: ``(load, loading, release)`` events."""
    loading, release = threading.Event(), threading.Event()

    def load(rank):
        loading.set()
        assert release.wait(30), "the test never released the spare"
        return store.load_rank(directory, rank)
    return load, loading, release


def first_outcome(c):
    """Whether the first takeover has ended (healed or given up)."""
    return lambda: c.master.healer.takeovers and c.master.healer.takeovers[0].outcome != "pending"


def healed(c, count=1):
    return lambda: sum(t.outcome == "healed" for t in c.master.healer.takeovers) >= count


def test_reassign_moves_every_block_of_a_rank_and_refuses_a_rank_already_in_the_plan():
    plan = make_plan(get_model("tiny"), 4, 1, "sum")
    moved = reassign(plan, 2, 6)
    assert plan_ranks(moved) == {1, 3, 4, 5, 6}
    for before, after in zip(plan.layers, moved.layers):
        assert after.ranks == tuple(6 if r == 2 else r for r in before.ranks) and after.rows == before.rows
    assert moved.rank_blocks(6) == [(lp, b) for lp, b in moved.rank_blocks(6)]
    assert [b for _, b in moved.rank_blocks(6)] == [b for _, b in plan.rank_blocks(2)]
    with pytest.raises(ValueError, match="rank 3 already computes blocks"):
        reassign(plan, 2, 3)


def test_the_world_size_check_sets_the_spares_aside(shards):
    manifest = store.open_manifest(shards("sum", 4, 1))
    store.check_world(manifest, 8, spares=2)
    with pytest.raises(store.ShardError, match=r"has 6 \(5 besides the 1 spare\(s\)\): launch with mpiexec -np 7 "
                                               r"\(6 \+ 1 spare\(s\)\), or prepare shards for 5 ranks: .*--workers 3"):
        store.check_world(manifest, 6, spares=1)


def test_a_dead_rank_is_replaced_and_a_second_loss_costs_no_request(shards, cluster):  # noqa: F811
    c = cluster(shards("sum", 4, 1), spares=1)
    assert c.infer().ok
    c.kill(2)
    serve_until(c, healed(c))
    t = c.master.healer.takeovers[0]
    assert (t.logical, t.replaced, t.spare, t.reason) == (2, 2, 6, "dead")
    assert 6 in plan_ranks(c.master.plan) and 2 not in plan_ranks(c.master.plan)
    assert c.master.can_serve()
    serve_until(c, lambda: any(a.rank == 6 and a.status == "reply" for a in c.master.arrivals))
    c.kill(3)  # sum parity tolerates one loss: with the spare in, this one too
    serve(c, 3)
    assert c.master.healer.pool == []
    c.close()


def test_requests_during_the_takeover_are_decoded_without_waiting_for_the_spare(shards, cluster):  # noqa: F811
    """The spare's load blocks until released: requests in between must be served (decoded), not wait."""
    load, loading, release = held_loader(shards("sum", 4, 1))
    c = cluster(shards("sum", 4, 1), spares=1, load=load)
    c.kill(1)
    serve_until(c, loading.is_set)
    for _ in range(5):  # the spare is stuck loading: these are decoded around rank 1
        r = c.infer()
        assert r.ok, r.error
        assert all(1 in rec.missing_ranks for rec in r.layers)
    assert c.master.healer.takeovers[0].outcome == "pending"
    release.set()
    serve_until(c, healed(c))
    c.kill(4)  # the parity rank: still within tolerance once the spare is in
    assert c.infer().ok
    c.close()


def test_a_brief_stall_does_not_spend_a_spare(shards, cluster):  # noqa: F811
    c = cluster(shards("sum", 4, 1), spares=1, max_outstanding=4)
    c.master.healer.silent_grace_s = 60.0  # far longer than the stall below
    c.data.hold(3)
    serve_until(c, lambda: 3 in c.master.silent)
    c.data.release(3)
    serve_until(c, lambda: 3 not in c.master.silent)
    assert c.master.healer.takeovers == [] and c.master.healer.pool == [6]
    c.close()


def test_a_silent_rank_is_replaced_after_its_grace(shards, cluster):  # noqa: F811
    c = cluster(shards("sum", 4, 1), spares=1, max_outstanding=4)
    c.master.healer.silent_grace_s = 0.2
    c.data.hold(3)  # rank 3 stalls: nothing reaches it
    serve_until(c, lambda: 3 in c.master.silent)
    serve_until(c, healed(c))
    assert c.master.healer.takeovers[0].reason == "silent"
    c.kill(1)  # a second loss while rank 3 is still stalled
    serve(c, 3)
    c.data.release(3)
    c.close()


def test_mds_two_spares_replace_two_losses_then_two_more_cost_nothing(shards, cluster):  # noqa: F811
    c = cluster(shards("mds", 3, 2), spares=2)
    c.kill(1)
    c.kill(4)
    serve_until(c, healed(c, 2))
    assert sorted((t.logical, t.spare) for t in c.master.healer.takeovers) in ([(1, 6), (4, 7)], [(1, 7), (4, 6)])
    c.kill(2)
    c.kill(5)
    serve(c, 3)
    c.close()


def test_a_quarantined_rank_is_replaced(shards, cluster):  # noqa: F811
    c = cluster(shards("mds", 3, 2), spares=1, integrity="strict",
                injections=parse_injections(["corrupt:2@1=scale"]))
    serve_until(c, healed(c))
    t = c.master.healer.takeovers[0]
    assert (t.logical, t.reason) == (2, "quarantined") and 2 in c.master.quarantined
    c.kill(1)  # with rank 2 quarantined this would be the code's last loss; the spare makes it two
    c.kill(3)
    serve(c, 3)
    c.close()


def test_a_spare_that_took_over_and_dies_is_replaced_by_the_next_spare(shards, cluster):  # noqa: F811
    c = cluster(shards("sum", 4, 1), spares=2)
    c.kill(2)
    serve_until(c, healed(c))
    first = c.master.healer.takeovers[0].spare
    c.kill(first)
    serve_until(c, healed(c, 2))
    second = c.master.healer.takeovers[1]
    assert (second.logical, second.replaced, second.reason) == (2, first, "dead") and second.spare != first
    c.kill(4)
    assert c.infer().ok
    c.close()


def test_an_idle_spare_that_dies_leaves_the_pool(shards, cluster):  # noqa: F811
    c = cluster(shards("sum", 4, 1), spares=2)
    c.kill(6)
    assert c.infer().ok
    assert c.master.healer.pool == [7]
    c.kill(1)
    serve_until(c, healed(c))
    assert [(t.spare, t.outcome) for t in c.master.healer.takeovers] == [(7, "healed")]
    c.close()


def test_a_spare_lost_while_loading_gives_way_to_the_next(shards, cluster):  # noqa: F811
    load, loading, release = held_loader(shards("sum", 4, 1))
    c = cluster(shards("sum", 4, 1), spares=2, load=load)
    c.kill(3)
    serve_until(c, loading.is_set)
    c.kill(c.master.healer.takeovers[0].spare)
    release.set()
    serve_until(c, healed(c))
    assert [t.outcome for t in c.master.healer.takeovers] == ["spare lost", "healed"]
    c.close()


def test_a_spare_that_cannot_load_refuses_and_the_rank_stays_decoded_around(shards, cluster):  # noqa: F811
    def load(rank):
        raise store.ShardError(f"rank-{rank:03d}.h5: no such file on this device")

    c = cluster(shards("sum", 4, 1), spares=1, load=load)
    c.kill(2)
    serve_until(c, first_outcome(c))
    assert c.master.healer.takeovers[0].outcome == "refused" and c.master.healer.pool == []
    serve(c, 2)
    assert c.close() == []  # the refusing spare still stops when asked


def _device_without_shards(directory, tmp_path):
    """A spare's own weights folder holding only the manifest (a device given no shard file)."""
    device = tmp_path / "spare-device" / directory.name
    device.mkdir(parents=True)
    shutil.copy(directory / store.MANIFEST_NAME, device)
    return device


def test_a_spare_that_cannot_see_the_shard_is_sent_the_masters_copy(shards, cluster, tmp_path):  # noqa: F811
    directory = shards("sum", 4, 1)
    device = _device_without_shards(directory, tmp_path)
    c = cluster(directory, spares=1, load=lambda rank: load_shard(store.open_manifest(device), rank))
    c.kill(2)
    serve_until(c, healed(c))
    assert c.master.healer.takeovers[0].streamed
    assert (device / "rank-002.h5").read_bytes() == (directory / "rank-002.h5").read_bytes()
    assert sorted(p.name for p in device.iterdir()) == [store.MANIFEST_NAME, "rank-002.h5"]  # no partial file
    c.kill(3)
    serve(c, 3)
    c.close()


def test_a_shard_that_does_not_match_the_manifest_or_cannot_be_sent_is_refused(shards, cluster, tmp_path):  # noqa: F811
    directory = shards("sum", 4, 1)
    device = _device_without_shards(directory, tmp_path)

    def load(rank):  # the spare expects other bytes than the master's file holds
        raise ShardMissing(device / f"rank-{rank:03d}.h5", "0" * 64)

    c = cluster(directory, spares=1, load=load)
    c.kill(2)
    serve_until(c, first_outcome(c))
    assert c.master.healer.takeovers[0].outcome == "refused" and c.master.healer.takeovers[0].streamed
    assert not (device / "rank-002.h5").exists()
    serve(c, 2)
    assert c.close() == []

    c = cluster(directory, spares=1, load=lambda rank: load_shard(store.open_manifest(device), rank))
    c.master.healer.manifest = None  # a master without the weights folder cannot send it
    c.kill(2)
    serve_until(c, first_outcome(c))
    assert c.master.healer.takeovers[0].outcome == "refused" and not c.master.healer.takeovers[0].streamed
    assert not (device / "rank-002.h5").exists()
    serve(c, 2)
    assert c.close() == []


# ---------------------------------------------------------------- real mpiexec jobs

# Every reply of the plan's ranks waits 5 ms, so a tiny request takes at least 35 ms (7 layers) on any
# machine: the requests between a loss and the next one planned always leave the spare seconds to
# take over, however fast the machine serves them.
PACE = ["--inject", "delay:1-5:const:0.005"]


def _takeovers(job) -> list:
    return [(t["logical"], t["spare"], t["outcome"]) for t in job.results["healing"]]


def _all_served_and_matched(job, count):
    assert job.returncode == 0, job.explain()
    reqs = job.results["requests"]
    assert len(reqs) == count and all(r["ok"] for r in reqs), job.explain()
    assert "check: MATCHED" in job.stdout, job.explain()


@requires_mpi
@pytest.mark.mpi
@pytest.mark.slow
def test_job_sum_parity_one_spare_two_losses_in_sequence(tmp_path):
    shards = store.prepare_zoo(tmp_path, "tiny", 4, 1, "sum")
    job = run_job(7, ["tiny", *PACE, "--weights", str(shards), "--spares", "1", "--repeat", "60", "--check",
                      "--inject", "crash:2@1", "--inject", "crash:3@40"], tmp_path)
    _all_served_and_matched(job, 60)
    assert _takeovers(job) == [(2, 6, "healed")], job.explain()
    assert job.results["healing"][0]["healed_request"] < 40, job.explain()
    assert sorted(job.results["dead_ranks"]) == [2, 3]
    assert "healing: rank 2 -> spare 6" in job.stdout


@requires_mpi
@pytest.mark.mpi
@pytest.mark.slow
def test_job_a_hung_worker_is_replaced_once_silent(tmp_path):
    """A hung worker stays alive (its heartbeats flow), so it is never reported dead: it goes silent,
    and after the grace a spare takes its place; a later crash then costs nothing."""
    shards = store.prepare_zoo(tmp_path, "tiny", 4, 1, "sum")
    job = run_job(7, ["tiny", *PACE, "--weights", str(shards), "--spares", "1", "--repeat", "110", "--check",
                      "--inject", "hang:2@1", "--inject", "crash:3@100"], tmp_path)
    _all_served_and_matched(job, 110)
    assert _takeovers(job) == [(2, 6, "healed")] and job.results["healing"][0]["reason"] == "silent", job.explain()
    assert job.results["healing"][0]["healed_request"] < 100, job.explain()


@requires_mpi
@pytest.mark.mpi
@pytest.mark.slow
def test_job_mds_two_spares_four_losses(tmp_path):
    shards = store.prepare_zoo(tmp_path, "tiny", 3, 2, "mds")
    job = run_job(8, ["tiny", *PACE, "--weights", str(shards), "--spares", "2", "--repeat", "60", "--check",
                      "--inject", "crash:1@1", "--inject", "crash:4@2",
                      "--inject", "crash:2@40", "--inject", "crash:5@45"], tmp_path)
    _all_served_and_matched(job, 60)
    assert sorted((lg, out) for lg, _, out in _takeovers(job)) == [(1, "healed"), (4, "healed")], job.explain()


@requires_mpi
@pytest.mark.mpi
@pytest.mark.slow
def test_job_quarantined_rank_replaced_under_strict_integrity(tmp_path):
    shards = store.prepare_zoo(tmp_path, "tiny", 3, 2, "mds")
    job = run_job(7, ["tiny", *PACE, "--weights", str(shards), "--spares", "1", "--repeat", "60", "--check",
                      "--integrity", "strict", "--inject", "corrupt:2@1",
                      "--inject", "crash:1@40", "--inject", "crash:3@45"], tmp_path)
    _all_served_and_matched(job, 60)
    assert _takeovers(job) == [(2, 6, "healed")], job.explain()
    assert job.results["healing"][0]["reason"] == "quarantined"


@requires_mpi
@pytest.mark.mpi
@pytest.mark.slow
def test_job_a_spare_killed_after_its_takeover_is_replaced(tmp_path):
    shards = store.prepare_zoo(tmp_path, "tiny", 4, 1, "sum")
    job = run_job(8, ["tiny", *PACE, "--weights", str(shards), "--spares", "2", "--repeat", "70", "--check",
                      "--inject", "crash:2@1", "--inject", "crash:6@30", "--inject", "crash:3@55"], tmp_path)
    _all_served_and_matched(job, 70)
    assert _takeovers(job) == [(2, 6, "healed"), (2, 7, "healed")], job.explain()
    assert sorted(job.results["dead_ranks"]) == [2, 3, 6]


@requires_mpi
@pytest.mark.mpi
def test_job_wrong_world_size_with_spares_names_the_right_np(tmp_path):
    shards = store.prepare_zoo(tmp_path, "tiny", 4, 1, "sum")
    job = run_job(6, ["tiny", "--weights", str(shards), "--spares", "1"], tmp_path, output=False)
    assert job.returncode == 2, job.explain()
    assert "launch with mpiexec -np 7 (6 + 1 spare(s))" in job.stderr, job.explain()


# ---------------------------------------------------------------- the network-namespace cluster (root)

@requires_mpi
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.cluster
def test_cluster_power_off_is_healed_by_a_spare_on_another_device(tmp_path):
    """Head + 6 devices: master on the head, 4+1 sum-parity workers on devices 0-4, the spare on device 5.
    Device 2 (rank 3) is powered off; once the detector reports it, the spare takes its place and
    the job serves every request (matched) on the spare."""
    from test_cluster import UNAVAILABLE, _gone, _prefix

    from mpicdc.cluster import Cluster

    if UNAVAILABLE:
        pytest.skip(f"no network namespaces here: {UNAVAILABLE}")
    shards = store.prepare_zoo(tmp_path, "tiny", 4, 1, "sum")
    prefix = _prefix("h")  # at most 10 characters
    with Cluster(6, prefix=prefix) as c:
        out = c.state / "run.json"
        job = c.launch(7, ["tiny", "--weights", str(shards), "--spares", "1", "--repeat", "400", "--check", "-q",
                           "--output", str(out)], timeout=120)
        job.wait_for("on 6 ranks")
        time.sleep(1.0)
        c.power_off(2)
        done = job.finish()
        results = json.loads(out.read_text()) if out.exists() else None
    _gone(prefix)
    assert not done.timed_out, done.explain()
    assert done.returncode == 0 and results and all(r["ok"] for r in results["requests"]), done.explain()
    assert "MATCHED" in done.output, done.explain()
    assert results["dead_ranks"] == [3], done.explain()
    assert [(t["logical"], t["spare"], t["outcome"]) for t in results["healing"]] == [(3, 6, "healed")], \
        done.explain()
    assert any(a["rank"] == 6 and a["status"] == "reply" for a in results["arrivals"]), done.explain()


@requires_mpi
@pytest.mark.mpi
@pytest.mark.slow
def test_job_a_spare_that_cannot_see_the_shard_is_sent_it_by_the_master(tmp_path):
    """Two working directories (MPMD app contexts): the plan's ranks see every shard, the spare's
    folder holds only the manifest; the master streams rank 2's file to the spare when rank 2 dies."""
    import sys

    from mpi_helpers import run_bounded

    from mpicdc.runtime.launch import mpirun_command

    shards = store.prepare_zoo(tmp_path / "head", "tiny", 4, 1, "sum")
    device = _device_without_shards(shards, tmp_path / "device")
    out = tmp_path / "result.json"
    args = ["tiny", *PACE, "--weights", shards.name, "--spares", "1", "--repeat", "60", "--check",
            "--inject", "crash:2@1", "--inject", "crash:3@40", "--output", str(out)]
    cmd = mpirun_command(7, args)
    np_at, python = cmd.index("-np"), cmd.index(sys.executable)
    app = cmd[python:]
    cmd = cmd[:np_at] + cmd[np_at + 2:python] + ["-np", "6", "--wdir", str(shards.parent), *app, ":",
                                                 "-np", "1", "--wdir", str(device.parent), *app]
    job = run_bounded(cmd, tmp_path, 120, marker=str(out))
    assert out.exists(), job.explain()
    results = json.loads(out.read_text())
    assert all(r["ok"] for r in results["requests"]) and len(results["requests"]) == 60, job.explain()
    assert "check: MATCHED" in job.stdout, job.explain()
    assert [(t["logical"], t["spare"], t["outcome"], t["streamed"]) for t in results["healing"]] == \
        [(2, 6, "healed", True)], job.explain()
    assert (device / "rank-002.h5").read_bytes() == (shards / "rank-002.h5").read_bytes()
