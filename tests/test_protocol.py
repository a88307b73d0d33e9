"""The master and worker loops in one process over a fake network: drops, reordering, late,
duplicate, altered and malformed messages, dead and stalled ranks, stale jobs.

Real loops, real shards (HDF5 files of the ``tiny`` model), real decoding; only the transport is
in memory (:mod:`fake_channel`), so each case runs in milliseconds.  Every output is compared with
the serial fault-free reference forward.  What needs real processes (signals, ULFM, mpirun) stays
in test_runtime.py and test_faults.py.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from fake_channel import FakeNetwork

from mpicdc import store
from mpicdc.core.kernels import default_input, forward
from mpicdc.runtime import wire
from mpicdc.runtime.master import Coordinator
from mpicdc.runtime.worker import WorkerState, start_watchdog, worker_loop
from mpicdc.store import reference_weights

RTOL = 1e-4  # sum parity decodes by one subtraction: float32 error ~1e-7, far below this


@pytest.fixture(scope="module")
def tiny_sum(tmp_path_factory):
    return store.prepare_zoo(tmp_path_factory.mktemp("shards"), "tiny", 4, 1, "sum")


@pytest.fixture(scope="module")
def tiny_mds(tmp_path_factory):
    return store.prepare_zoo(tmp_path_factory.mktemp("shards"), "tiny", 3, 2, "mds")


class Cluster:
    """A master :class:`Coordinator` and one thread per worker running the real worker loop."""

    def __init__(self, directory, rule=None, tag_ub=(1 << 31) - 1, injections=None, **coordinator_options):
        self.manifest = manifest = store.open_manifest(directory)
        size = manifest.plan.world_size
        self.data, self.ctrl = FakeNetwork(size, rule, tag_ub), FakeNetwork(size)
        self.ctrl.dead = self.data.dead  # one set of dead ranks for both communicators
        self.errors, self.threads, self.stops = {}, {}, {}
        for rank in range(1, size):
            state = WorkerState(rank, manifest.model, manifest.plan, store.load_rank(directory, rank, manifest),
                                injections=injections, poll_s=1e-4)
            stop = self.stops[rank] = threading.Event()
            start_watchdog(self.ctrl.endpoint(rank), stop, hard_exit=False, on_master_lost=stop.set)
            self.threads[rank] = threading.Thread(target=self._work, args=(rank, state, stop), daemon=True)
            self.threads[rank].start()
        options = {"layer_timeout_s": 10.0, **coordinator_options}
        self.master = Coordinator(self.data.endpoint(0), self.ctrl.endpoint(0), manifest.model, manifest.plan,
                                  store.load_rank(directory, 0, manifest), **options)
        self.x = default_input(manifest.model)
        self.reference = forward(manifest.model, reference_weights(manifest), self.x)

    def _work(self, rank, state, stop):
        try:
            worker_loop(self.data.endpoint(rank), state, stop)
        except Exception as exc:  # noqa: BLE001 - recorded for the test to inspect
            self.errors[rank] = exc

    def kill(self, rank):
        self.data.kill(rank)

    def infer(self):
        result = self.master.infer(self.x)
        if result.ok:
            err = np.max(np.abs(result.output - self.reference)) / np.max(np.abs(self.reference))
            assert err <= RTOL, f"request {result.request}: relative error {err:.2e}"
        return result

    def close(self):
        """Stop the workers through the real shutdown handshake; every live worker thread must end."""
        unacknowledged = self.master.stop_workers(timeout_s=5.0)
        for rank, thread in self.threads.items():
            thread.join(5.0)
            assert not thread.is_alive(), f"worker {rank} did not stop"
        return unacknowledged


@pytest.fixture
def cluster(request):
    made = []

    def make(directory, rule=None, **options):
        made.append(Cluster(directory, rule, **options))
        return made[-1]

    yield make
    for c in made:  # a test that failed half-way must not leave worker threads spinning
        for stop in c.stops.values():
            stop.set()


def replies_from(rank, action):
    """A network rule applying ``action(message) -> [(delay, bytes)]`` to ``rank``'s replies only."""
    def rule(source, dest, tag, message):
        if source == rank and dest == 0 and tag >= 16:
            return action(message)
        return [(0.0, message)]
    return rule


def test_fault_free_requests_match_and_use_every_rank(tiny_sum, cluster):
    c = cluster(tiny_sum)
    for _ in range(3):
        r = c.infer()
        assert r.ok, r.error
    assert not c.master.dead and not c.master.silent
    assert c.close() == []


def test_dropped_replies_are_decoded_around(tiny_sum, cluster):
    c = cluster(tiny_sum, replies_from(2, lambda m: []))
    for _ in range(3):
        r = c.infer()
        assert r.ok, r.error
        assert all(2 not in rec.used for rec in r.layers)
        assert all(rec.decoded_blocks == [1] for rec in r.layers)  # rank 2 holds data block 1
    c.close()


def test_a_dead_rank_is_decoded_around_and_not_sent_work(tiny_sum, cluster):
    c = cluster(tiny_sum)
    assert c.infer().ok
    c.kill(3)
    for _ in range(3):
        assert c.infer().ok
    assert c.master.dead == {3}
    jobs_after = [m for m in c.data.log if m[1] == 3 and m[2] == wire.TAG_JOB]
    c.infer()
    assert [m for m in c.data.log if m[1] == 3 and m[2] == wire.TAG_JOB] == jobs_after
    c.close()


def test_duplicated_and_reordered_replies_change_nothing(tiny_sum, cluster):
    rng = np.random.default_rng(0)

    def rule(source, dest, tag, message):
        if dest == 0 and tag >= 16:  # every reply twice, in random order
            return [(float(rng.uniform(0, 0.002)), message), (float(rng.uniform(0, 0.002)), message)]
        return [(0.0, message)]

    c = cluster(tiny_sum, rule)
    for _ in range(5):
        assert c.infer().ok
    assert not c.master.dead
    c.close()


def test_two_losses_under_one_parity_fail_the_request_in_bounded_time(tiny_sum, cluster):
    c = cluster(tiny_sum, lambda s, d, t, m: [] if s in (1, 2) and d == 0 and t >= 16 else [(0.0, m)],
                layer_timeout_s=0.3)
    r = c.infer()
    assert not r.ok and "no decodable set of replies within 0.3 s" in r.error
    assert "1" in r.error and "2" in r.error
    c.close()


def test_mds_two_dead_ranks(tiny_mds, cluster):
    c = cluster(tiny_mds)
    c.kill(1)
    c.kill(4)
    for _ in range(2):
        r = c.infer()
        assert r.ok, r.error
    c.close()


def _short(message):
    return [(0.0, message[:-4])]


def _nan(message):
    altered = message.copy()
    altered[wire.HEADER_BYTES:].view(np.float32)[:] = np.nan
    return [(0.0, altered)]


@pytest.mark.parametrize("alteration", [_short, _nan], ids=["short-reply", "non-finite-reply"])
def test_bad_replies_are_refused_and_decoded_around_without_killing_the_rank(tiny_sum, cluster, alteration):
    c = cluster(tiny_sum, replies_from(4, alteration))
    for _ in range(2):
        r = c.infer()
        assert r.ok, r.error
        assert all(4 not in rec.used for rec in r.layers)
        assert any(4 in rec.failed for rec in r.layers)
    assert 4 not in c.master.dead  # a bad reply is not a dead rank
    assert {a.status for a in c.master.arrivals if a.rank == 4 and not a.late} == {"bad"}
    c.close()


def test_a_malformed_job_is_refused_by_the_worker(tiny_sum, cluster):
    def rule(source, dest, tag, message):
        if source == 0 and dest == 1 and tag == wire.TAG_JOB:
            head = wire.Header.unpack(message)
            if head.kind == wire.JOB:  # claim a different input shape
                wrong = message.copy()
                wire.Header(wire.JOB, head.request, head.layer, -1, (1,) + tuple(head.shape[1:])).pack_into(wrong)
                return [(0.0, wrong)]
        return [(0.0, message)]

    c = cluster(tiny_sum, rule)
    r = c.infer()
    assert r.ok, r.error
    assert all(1 not in rec.used for rec in r.layers)
    assert "bad" in {a.status for a in c.master.arrivals if a.rank == 1}
    assert 1 not in c.master.dead and 1 not in c.errors
    c.close()


def test_a_stalled_rank_goes_silent_then_is_readmitted_and_tolerance_restored(tiny_sum, cluster):
    c = cluster(tiny_sum, max_outstanding=8)
    c.data.hold(2)  # rank 2 stalls: nothing reaches it
    for _ in range(20):
        assert c.infer().ok
        if 2 in c.master.silent:
            break
    assert 2 in c.master.silent
    c.data.release(2)  # the stall ends: rank 2 works through its backlog, skipping stale jobs
    for _ in range(200):
        assert c.infer().ok
        if 2 not in c.master.silent:
            break
    assert 2 not in c.master.silent, "a rank that answers again must be re-admitted"
    assert "skipped" in {a.status for a in c.master.arrivals if a.rank == 2 and a.late}
    c.kill(4)  # with rank 2 back, one more loss is within the code's tolerance
    for _ in range(2):
        r = c.infer()
        assert r.ok, r.error
    c.close()


def test_reply_tags_fit_a_small_tag_upper_bound(tiny_sum, cluster):
    c = cluster(tiny_sum, tag_ub=16 + 2 * 7 - 1)  # a window of two requests of tiny's 7 distributed layers
    assert c.master.tags.window == 2
    for _ in range(4):
        assert c.infer().ok
    assert max(tag for _, _, tag, _ in c.data.log) <= c.data.tag_ub
    c.close()


def test_reply_tags_refuse_a_tag_bound_with_no_room():
    with pytest.raises(ValueError, match="largest tag"):
        wire.ReplyTags(100, 32767 // 1000)


def test_a_loss_while_another_rank_is_silent_waits_for_it_instead_of_failing(tiny_sum, cluster):
    """One rank stalled (silent) and another dies: the layer asks the silent rank too and waits for
    it (bounded by the layer timeout) instead of failing a request the code can still serve."""
    c = cluster(tiny_sum, max_outstanding=8)
    c.data.hold(2)
    for _ in range(20):
        assert c.infer().ok
        if 2 in c.master.silent:
            break
    assert 2 in c.master.silent
    c.kill(3)
    threading.Timer(0.3, c.data.release, (2,)).start()  # the stall ends while the request waits
    r = c.infer()
    assert r.ok, r.error
    assert any(2 in rec.used for rec in r.layers)
    c.close()
