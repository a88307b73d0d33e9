"""A cluster on one machine (network namespaces, shaped links) and the faults of real devices.

Each job runs from the cluster's head namespace across 5 device namespaces (master on the head,
tiny with sum parity 4+1) and is bounded: on timeout every process in the cluster is killed and
the test fails.  Outcomes asserted are the ones measured (docs/cluster.md).
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mpi_helpers import CLUSTER_UNAVAILABLE, requires_cluster, requires_mpi

import mpicdc
from mpicdc.cluster import Cluster
from mpicdc.cluster.faults import rank_pids
from mpicdc.cluster.netns import list_links, list_netns
from mpicdc.store import prepare_zoo

pytestmark = [requires_mpi, pytest.mark.mpi, pytest.mark.cluster, requires_cluster]
UNAVAILABLE = CLUSTER_UNAVAILABLE  # test_healing reads it


def _prefix(tag: str) -> str:
    return f"t{tag}{random.randrange(10 ** 6)}"


def _gone(prefix: str, pids=()) -> None:
    """Nothing of the cluster is left: namespace, link or process."""
    assert not [ns for ns in list_netns() if ns.startswith(prefix + "-")]
    assert not [link for link in list_links() if link.startswith(prefix)]
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "processes outlived the cluster"


def test_bring_up_three_devices_shaped_isolated_and_torn_down_without_trace():
    prefix = _prefix("up")
    with Cluster(3, rate="100mbit", prefix=prefix) as c:
        # the agent mpirun calls starts a command in the device's namespace with the device's hostname
        names = {}
        for node in c.devices:
            out = c.state / f"name-{node.name}"
            assert subprocess.run([c.agent, node.address, f"hostname > {out}"], check=False).returncode == 0
            end = time.monotonic() + 10
            while not (out.exists() and out.read_text().strip()) and time.monotonic() < end:
                time.sleep(0.05)
            names[node.name] = out.read_text().strip()
        assert len(set(names.values()) | {c.head.hostname}) == 4, names
        # addresses reachable between namespaces (python sockets), no route out
        server = subprocess.Popen(["ip", "netns", "exec", c.devices[0].netns, sys.executable, "-c",
                                   (f"import socket; s = socket.create_server(('{c.devices[0].address}', 5555)); "
                                    "print('up', flush=True); a, _ = s.accept(); a.sendall(b'hello')")],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "up"
        client = f"import socket; print(socket.create_connection(('{c.devices[0].address}', 5555), timeout=5).recv(5).decode())"
        got = c.exec(1, [sys.executable, "-c", client], capture_output=True, text=True,
                     timeout=20)
        assert got.stdout.strip() == "hello", got.stderr
        server.wait(timeout=10)
        probe = ("import socket\ntry:\n socket.create_connection(('192.0.2.1', 53), timeout=2)\n"
                 "except OSError as e: print(e.errno)")
        out = c.exec("head", [sys.executable, "-c", probe], capture_output=True, text=True, timeout=20)
        assert out.stdout.strip() == "101", out  # ENETUNREACH: no default route
        assert "default" not in c.exec(2, ["ip", "route"], capture_output=True, text=True).stdout
        # tbf on both ends of every link
        for node in c.nodes:
            assert "tbf" in subprocess.run(["tc", "qdisc", "show", "dev", node.veth], capture_output=True,
                                           text=True, check=False).stdout
            assert "tbf" in c.exec(node.name, ["tc", "qdisc", "show", "dev", "eth0"], capture_output=True,
                                   text=True).stdout
        # something left running inside: teardown must kill it
        sleeper = subprocess.Popen(["ip", "netns", "exec", c.devices[2].netns, "sleep", "600"])
        time.sleep(0.2)
        inside = [pid for pids in c.leftovers().values() for pid in pids]
        assert inside
    sleeper.wait(timeout=10)
    _gone(prefix, inside)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(prepare_zoo(tmp_path_factory.mktemp("shards"), "tiny", 4, 1, "sum"))


def _run(tiny, fault, repeat=250, timeout=60, after=1.0, then=None):
    """tiny on head + 5 devices, ``fault`` done to device 2 (rank 3) ``after`` s after the start line.
    Returns (result, results json or None, seconds from fault to "rank 3 failed" or None, leftovers)."""
    prefix = _prefix("f")
    with Cluster(5, prefix=prefix) as c:
        out = c.state / "run.json"
        job = c.launch(6, ["tiny", "--weights", tiny, "--repeat", str(repeat), "--check", "-q", "--output", str(out)],
                       timeout=timeout)
        job.wait_for("on 6 ranks")
        time.sleep(after)
        at = getattr(c, fault)(2)
        if then:
            then(c)
        done = job.finish()
        results = json.loads(out.read_text()) if out.exists() else None
        seen = done.first("rank 3 failed")
        cut_off = fault == "link_cut"  # a cut device's processes live on, cut off, until teardown
        left = _leftovers_after(c, lambda left: all(ns.endswith("-d2") for ns in left) if cut_off else not left)
    _gone(prefix)
    assert not done.timed_out, done.explain()
    return done, results, None if seen is None else seen - at, left


def _leftovers_after(c, settled, within_s: float = 15.0) -> dict:
    """The cluster's processes left once ``settled(left)`` holds, or ``within_s`` after the job ended (polled:
    remote daemons end their ranks and themselves once the head's runtime is gone, which takes a moment)."""
    end = time.monotonic() + within_s
    while not settled(left := c.leftovers()) and time.monotonic() < end:
        time.sleep(0.25)
    return left


def _all_ok(done, results):
    assert done.returncode == 0, done.explain()
    assert results and all(r["ok"] for r in results["requests"]), done.explain()
    assert "MATCHED" in done.output, done.explain()


def test_crash_of_a_worker_at_a_random_moment_is_survived_and_matched(tiny):
    done, results, _seen, left = _run(tiny, "crash", repeat=20, after=random.uniform(0.0, 0.3))
    _all_ok(done, results)
    assert len(results["requests"]) == 20
    assert results["dead_ranks"] in ([], [3]), done.explain()  # [] when the crash came after the last request
    assert not left, left


def test_loud_death_of_a_device_ends_the_whole_job(tiny):
    """Every process of the device killed, link up: PRRTE ends the job at once; the master never reports."""
    done, _results, _seen, left = _run(tiny, "loud_death")
    assert done.returncode == 1, done.explain()
    assert "PRTE has lost communication with a remote daemon" in done.output, done.explain()
    assert done.seconds < 60 and not left, (done.explain(), left)


@pytest.mark.parametrize("fault", ["power_off", "link_cut"])
def test_silent_loss_is_detected_in_about_two_seconds_and_survived(tiny, fault):
    """Power-off or link cut: the detector reports rank 3 after ~2 s, every request is served and
    matched; the runtime then ends the job when it next talks to the lost daemon (at job end)."""
    done, results, seen, left = _run(tiny, fault)
    _all_ok(done, results)
    assert results["dead_ranks"] == [3], done.explain()
    assert seen is not None and 1.0 < seen < 15.0, (seen, done.explain())  # the 2 s detector, with slack for a loaded machine
    # a cut device's processes live on, cut off, until teardown (asserted gone by _run)
    assert (all(ns.endswith("-d2") for ns in left) if fault == "link_cut" else not left), left


def test_freeze_past_the_detector_then_thaw_is_survived(tiny):
    """Resumed, the frozen rank leaves before its next MPI call (it knows it overslept the detector's
    timeout), so its own detector never accuses the rank it watches: one loss, not two."""
    done, results, seen, left = _run(tiny, "freeze", then=lambda c: (time.sleep(4), c.thaw(2)))
    _all_ok(done, results)
    assert results["dead_ranks"] == [3], done.explain()
    assert "rank 3 was stopped for" in done.output, done.explain()
    assert seen is not None and 1.0 < seen < 15.0, (seen, done.explain())  # the 2 s detector, with slack for a loaded machine
    assert not left, left


def test_link_cut_on_a_20mbit_link_is_survived(tiny):
    """A shaped link cut while sends to the device are in flight: the failed sends must never be
    freed by the master (Open MPI 5.0 aborts the job when it reports on a freed send)."""
    prefix = _prefix("cut")
    with Cluster(5, rate="20mbit", prefix=prefix) as c:
        out = c.state / "run.json"
        job = c.launch(6, ["tiny", "--weights", tiny, "--repeat", "250", "--check", "-q", "--output", str(out)],
                       timeout=90)
        job.wait_for("on 6 ranks")
        time.sleep(1.0)
        c.link_cut(2)
        done = job.finish()
        results = json.loads(out.read_text()) if out.exists() else None
    _gone(prefix)
    assert not done.timed_out, done.explain()
    assert "Send error after request freed" not in done.output, done.explain()
    _all_ok(done, results)
    assert results["dead_ranks"] == [3], done.explain()


# ---------------------------------------------------------------- daemons on the head (relays)

def _cmdline(pid: int) -> bytes | None:
    """A process's command line; None for one that ended since it was listed."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _run_head(tiny, fault, repeat=250, timeout=120, after=1.0, look=None):
    """As :func:`_run`, with every daemon on the head and each device's rank behind a relay; ``look(c)``
    is called once every rank is running, before the fault.  Bounded at 120 s: with other jobs loading
    the 2 cores (load average ~30) a 250-request run took about 60 s, on this branch and on main alike."""
    prefix = _prefix("h")
    with Cluster(5, prefix=prefix, daemons="head") as c:
        out = c.state / "run.json"
        job = c.launch(6, ["tiny", "--weights", tiny, "--repeat", str(repeat), "--check", "-q", "--output", str(out)],
                       timeout=timeout)
        job.wait_for("on 6 ranks")
        if look:
            look(c)
        time.sleep(after)
        at = getattr(c, fault)(2)
        done = job.finish()
        results = json.loads(out.read_text()) if out.exists() else None
        seen = done.first("rank 3 failed")
        time.sleep(0.5)
        # only the device daemons may be left (one per namespace still alive), never a rank or a relay
        left = {ns: [p for p in pids if (cmd := _cmdline(p)) is not None and b"devd.py" not in cmd]
                for ns, pids in c.leftovers().items()}
        head_left = c.leftovers().get(c.head.netns, [])
    _gone(prefix)
    assert not done.timed_out, done.explain()
    return done, results, None if seen is None else seen - at, {ns: p for ns, p in left.items() if p}, head_left


@pytest.mark.parametrize("fault", ["loud_death", "power_off", "link_cut"])
def test_head_arrangement_survives_every_device_death(tiny, fault):
    """Daemons on the head: a loud node death (which ends the job with a daemon per device), a power-off
    and a link cut all look like a local child's death to the runtime; every request served and matched,
    exit 0, the relay says why it ended the rank, nothing of the job left on the head or the devices."""
    done, results, seen, left, head_left = _run_head(tiny, fault)
    _all_ok(done, results)
    assert "PRTE has lost communication" not in done.output, done.explain()
    assert results["dead_ranks"] == [3], done.explain()
    why = "device connection lost" if fault == "loud_death" else "device silent for 3 s"
    assert "mpicdc relay: rank 3 on d2" in done.output and why in done.output, done.explain()
    limit = 1.0 if fault == "loud_death" else 15.0  # a reset is seen at once; silence after the 2 s detector
    assert seen is not None and seen < limit, (seen, done.explain())
    assert not left and not head_left, (left, head_left)


def _rank_view(c, device: int, marker: Path) -> dict:
    """What the rank on ``device`` sees, read through /proc (so in its own mount namespace): its PMIx
    ``gds`` module, whether ``marker`` and the head daemon's PMIx session folder exist for it (and the
    folder on the head), and what its /tmp holds."""
    pids = rank_pids(c, device)
    assert len(pids) == 1, (device, pids)
    root = Path(f"/proc/{pids[0]}/root")
    env = dict(kv.split(b"=", 1) for kv in (root.parent / "environ").read_bytes().split(b"\0") if b"=" in kv)
    session = env[b"PMIX_SERVER_TMPDIR"].decode()
    return {"gds": env.get(b"PMIX_GDS_MODULE", b"").decode(), "marker_seen": (root / marker.relative_to("/")).exists(),
            "session_on_head": Path(session).is_dir(), "session_seen": (root / session.lstrip("/")).exists(),
            "tmp": sorted(p.name for p in (root / "tmp").iterdir())}


def test_head_arrangement_device_ranks_share_no_shm_or_tmp_with_the_head(tiny):
    """The head arrangement as on real devices: a device rank gets PMIx's job data over its tunnelled
    connection (``gds`` ``hash``) and has its own empty /dev/shm and /tmp (a file the head puts in
    /dev/shm and the head daemon's PMIx session folder are absent in its view; its /tmp holds only the
    weights and working folder its command names), and the job still serves every request, MATCHED,
    with a device powered off."""
    marker = Path("/dev/shm") / f"mpicdc-head-only-{random.randrange(10 ** 9)}"
    views = {}
    marker.write_text("only on the head")
    try:
        done, results, seen, left, head_left = _run_head(
            tiny, "power_off", look=lambda c: views.update({d: _rank_view(c, d, marker) for d in range(len(c.devices))}))
    finally:
        marker.unlink(missing_ok=True)
    install = (str(Path(mpicdc.__file__).resolve().parents[1]), sys.prefix)  # a device's own copy, same path
    deployed = {Path(p).relative_to("/tmp").parts[0] for p in (tiny, *install) if p.startswith("/tmp/")}
    deployed |= {"mpicdc-cluster"}
    assert len(views) == 5, views
    for view in views.values():
        assert view["gds"] == "hash" and not view["marker_seen"], view
        assert view["session_on_head"] and not view["session_seen"], view
        assert set(view["tmp"]) <= deployed, (view, deployed)
    _all_ok(done, results)
    assert results["dead_ranks"] == [3] and seen is not None and seen < 15.0, (seen, done.explain())
    assert not left and not head_left, (left, head_left)


def test_head_arrangement_two_losses_in_sequence_under_mds_r2(tmp_path):
    """MDS r=2 over 6 devices: a power-off, then a loud death of another device 2 s later; both reported,
    every request served and matched (with a daemon per device the loud death ends the job)."""
    weights = str(prepare_zoo(tmp_path, "tiny", 4, 2, "mds"))
    prefix = _prefix("two")
    with Cluster(6, prefix=prefix, daemons="head") as c:
        out = c.state / "run.json"
        job = c.launch(7, ["tiny", "--weights", weights, "--code", "mds", "--repeat", "600", "--check", "-q",
                           "--output", str(out)], timeout=90)
        job.wait_for("on 7 ranks")
        time.sleep(1.0)
        first = c.power_off(1)   # rank 2
        time.sleep(2.0)
        second = c.loud_death(3)  # rank 4
        done = job.finish()
        results = json.loads(out.read_text()) if out.exists() else None
    _gone(prefix)
    assert not done.timed_out, done.explain()
    _all_ok(done, results)
    assert len(results["requests"]) == 600 and results["dead_ranks"] == [2, 4], done.explain()
    assert done.first("rank 2 failed") - first < 15.0 and done.first("rank 4 failed") - second < 1.0, done.explain()


def _one_big_layer(root: Path, side: int = 1448) -> str:
    """A model whose first layer's input is ``side``^2 floats (8.4 MB), prepared for 2 workers + 1 parity."""
    from mpicdc import store
    from mpicdc.core.models import GraphBuilder
    from mpicdc.core.plan import make_plan

    b = GraphBuilder("bigjob", (1, side, side), "one large layer input (the detector-scaling test)")
    b.dense(b.gap(b.relu(b.conv("input", 4, 3, stride=4, name="conv1"), name="relu1"), name="gap"), 10, name="fc")
    model = b.build()
    store.prepare(model, make_plan(model, 2, 1, "sum"), root)
    return str(root)


@pytest.fixture(scope="module")
def big_layer(tmp_path_factory):
    return _one_big_layer(tmp_path_factory.mktemp("big") / "w")


@pytest.mark.parametrize("link", [True, False], ids=["scaled", "default-2s"])
def test_detector_scaled_to_a_20mbit_link_raises_no_false_alarm(big_layer, link):
    """3 x 8.4 MB queued on the master's 20 Mbit/s link (10 s): with ``--link 20mbit`` the detector's
    timeout (22 s) outlasts the queue and the request is served with no rank declared dead; with the
    2 s default the same request makes a worker declare the master dead (the false alarm)."""
    prefix = _prefix("big")
    with Cluster(3, rate="20mbit", prefix=prefix, daemons="head") as c:
        out = c.state / "run.json"
        job = c.launch(4, ["bigjob", "--weights", big_layer, "--check", "--output", str(out),
                           *(["--link", "20mbit"] if link else [])], timeout=90)
        done = job.finish()
        results = json.loads(out.read_text()) if out.exists() else None
    _gone(prefix)
    assert not done.timed_out, done.explain()
    if link:
        assert "timeout 22.1 s" in done.output, done.explain()
        _all_ok(done, results)
        assert results["dead_ranks"] == [] and "failed; decoding" not in done.output, done.explain()
    else:
        assert done.returncode != 0 and "reported dead by someone else" in done.output, done.explain()
