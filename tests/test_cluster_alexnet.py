"""Issue 11's first "done when": AlexNet on the namespace cluster survives every fault kind at a random moment.

Each test runs ``alexnet --repeat N --check`` from the head of a cluster of devices (network
namespaces, every link shaped to 100 Mbit/s both ways) with every Open MPI daemon on the head
(``Cluster(daemons="head")``: no device's death can end the job), and does one fault kind to device 2
(rank 3, a data worker) at a moment drawn from a seeded RNG; the seed and the moment are printed,
and ``MPICDC_FAULT_SEED=S`` replays them.  Sum parity on 4+1 devices takes each fault kind; MDS r=2
on 4+2 devices takes two losses in sequence.  Every test asserts: 0 requests lost (every id answered
in the journal and the output), 0 wrong (each output against the serial numpy forward
:func:`mpicdc.core.kernels.forward` within the code's tolerance, and the job's own ``--check``
MATCHED), exit 0, a bounded end (the launcher out soon after the master's summary) and nothing of
the job left in any namespace (only the cluster's device daemons), then nothing of the cluster.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from mpi_helpers import requires_cluster, requires_mpi

from mpicdc.cluster import Cluster
from mpicdc.cluster.netns import list_links, list_netns
from mpicdc.core.kernels import default_input, forward
from mpicdc.core.models import get_model
from mpicdc.core.random_weights import init_weights
from mpicdc.run import CHECK_RTOL
from mpicdc.runtime.journal import read_journal
from mpicdc.store import prepare_zoo

pytestmark = [requires_mpi, pytest.mark.mpi, pytest.mark.cluster, pytest.mark.slow, requires_cluster]

RATE = "100mbit"
#: replay a failure with the seed it printed; otherwise a new seed each session
SEED = int(os.environ.get("MPICDC_FAULT_SEED") or random.randrange(10 ** 6))
REPEAT = 20             # ~0.85 s per AlexNet request here (2 cores, 100 Mbit/s): ~17 s of requests
WARM_ANSWERS = 2        # the fault is drawn after this many answers ...
FAULT_WINDOW_S = 6.0    # ... uniformly within this many seconds, so it lands mid-run
AFTER_FAULT_ANSWERS = 3  # and at least this many requests must be answered after it (else the test proves nothing)
FROZEN_S = 4.0          # a freeze lasts this long: past the detector's 2.5 s timeout
# a link cut lasts this long: past the device daemon's kill of the cut-off rank (3 s of silence, later on a loaded
# machine); a shorter cut that ends after the rank's own detector accused its peer is a race left open (cluster.md)
CUT_S = 8.0
END_AFTER_SUMMARY_S = 10.0  # bounded exit: the launcher is out this soon after the master's summary line


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("alexnet-shards")
    return {"sum": str(prepare_zoo(root, "alexnet", 4, 1, "sum")), "mds": str(prepare_zoo(root, "alexnet", 4, 2, "mds"))}


@pytest.fixture(scope="module")
def reference():
    """The serial numpy forward on the weights and input the job uses (seed 0)."""
    model = get_model("alexnet")
    return forward(model, init_weights(model, 0), default_input(model, 0)).reshape(-1)


def _moment(test: str, low: float, high: float) -> float:
    """A delay drawn from the session's seed and the test's name (so one test replays alone too), printed."""
    delay = random.Random(f"{SEED}-{test}").uniform(low, high)
    print(f"{test}: fault seed {SEED} -> {delay:.2f} s (replay: MPICDC_FAULT_SEED={SEED})", flush=True)
    return delay


def _answers(journal: Path) -> int:
    return len(read_journal(journal).answered) if journal.exists() else 0


def _wait_answers(journal: Path, count: int, job, timeout: float = 120.0) -> int:
    """Wait (bounded) until the journal holds ``count`` answers or the job ended; how many it holds."""
    end = time.monotonic() + timeout
    while _answers(journal) < count and job.proc.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    return _answers(journal)


def _job_leftovers(c: Cluster, within_s: float = 15.0) -> dict:
    """Processes of the job (anything but the cluster's device daemons) still in a namespace once they had
    ``within_s`` to end (polled: relays and device ranks end a moment after the launcher)."""
    def left():
        found = {}
        for ns, pids in c.leftovers().items():
            job = []
            for pid in pids:
                try:
                    if b"devd.py" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        job.append(pid)
                except OSError:
                    continue
            if job:
                found[ns] = job
        return found

    end = time.monotonic() + within_s
    while (found := left()) and time.monotonic() < end:
        time.sleep(0.25)
    return found


def _run(weights: str, code: str, devices: int, test: str, faults) -> tuple:
    """AlexNet (``code``, one rank per device plus the master) on a head + ``devices`` cluster; ``faults(c)``
    is called at the drawn moment and returns ``[(what, monotonic time)]``.  Returns (result, results json,
    requests answered after the first fault, the fault times, job leftovers); asserts the cluster is gone."""
    prefix = f"tcx{random.randrange(10 ** 6)}"
    delay = _moment(test, 0.0, FAULT_WINDOW_S)
    with Cluster(devices, rate=RATE, prefix=prefix, daemons="head") as c:
        journal, out = c.state / "journal.jsonl", c.state / "run.json"
        job = c.launch(devices + 1, ["alexnet", "--weights", weights, "--code", code, "--repeat", str(REPEAT),
                                     "--check", "-q", "--link", RATE, "--journal", str(journal),
                                     "--output", str(out)], timeout=240)
        warm = _wait_answers(journal, WARM_ANSWERS, job)
        assert warm >= WARM_ANSWERS, f"only {warm} answers before the fault was due\n{job.text}"
        time.sleep(delay)
        before = _answers(journal)
        done_faults = faults(c)
        done = job.finish()
        results = json.loads(out.read_text()) if out.exists() else None
        after = REPEAT - before
        left = _job_leftovers(c)
    assert not [ns for ns in list_netns() if ns.startswith(prefix + "-")], list_netns()
    assert not [link for link in list_links() if link.startswith(prefix)], list_links()
    print(f"{test}: fault after {before} answers; {done.seconds:.1f} s; "
          + ", ".join(f"{what} at +{at - done_faults[0][1]:.2f} s" for what, at in done_faults), flush=True)
    return done, results, after, done_faults, left


def _explain(done, faults) -> str:
    """The job's output, then its warnings and the faults on one clock (s after the first fault), to replay a failure."""
    zero = faults[0][1]
    events = sorted([(at, f"** {what}") for what, at in faults]
                    + [(at, line.rstrip()) for at, line in done.lines if "INFO" not in line])
    return done.explain() + "\ntimeline (s after the first fault):\n" + \
        "\n".join(f"{at - zero:8.2f} {line}" for at, line in events)


def _assert_served(done, faults, results, after, left, reference, code: str, dead: list) -> None:
    """0 lost, 0 wrong, exit 0, bounded end, nothing of the job left; the fault landed mid-run."""
    text = _explain(done, faults)
    assert not done.timed_out and done.returncode == 0, text
    assert after >= AFTER_FAULT_ANSWERS, f"the fault came after {REPEAT - after} of {REPEAT} answers: too late\n{text}"
    assert results is not None and [r["request"] for r in results["requests"]] == list(range(REPEAT)), text
    rtol = CHECK_RTOL[code]
    scale = float(np.max(np.abs(reference)))
    for r in results["requests"]:
        assert r["ok"] and r["check_rel_err"] is not None and r["check_rel_err"] <= rtol, (r["request"], text)
        got = np.asarray(r["output"], dtype=np.float32)
        err = float(np.max(np.abs(got - reference))) / scale
        assert err <= rtol, f"request {r['request']}: max error {err:.2e} against the serial forward\n{text}"
    assert "MATCHED" in done.output and "PRTE has lost communication" not in done.output, text
    assert results["dead_ranks"] == dead, text
    summary = done.first("summary:")
    assert summary is not None and done.lines[-1][0] - summary < END_AFTER_SUMMARY_S, text
    assert not left, (left, text)


def _then(first: str, then: str, off_s: float):
    """A fault to device 2 undone ``off_s`` later (freeze/thaw, link cut/restore)."""
    def faults(c):
        at = getattr(c, first)(2)
        time.sleep(off_s)
        try:
            back = getattr(c, then)(2)
        except LookupError:  # a frozen rank already gone (it ended with its job)
            back = time.monotonic()
        return [(first, at), (then, back)]
    return faults


def _once(kind: str):
    return lambda c: [(kind, getattr(c, kind)(2))]


FAULTS = {
    "crash": _once("crash"),
    "freeze_then_thaw": _then("freeze", "thaw", FROZEN_S),
    "power_off": _once("power_off"),
    "link_cut_then_restore": _then("link_cut", "link_restore", CUT_S),
    "loud_death": _once("loud_death"),
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_alexnet_sum_parity_survives_each_fault_kind_at_a_random_moment(shards, reference, kind):
    """Sum parity 4+1 on 5 devices: device 2 (rank 3) lost at a random moment; rank 3 reported dead,
    every request served and matched in the job."""
    done, results, after, faults, left = _run(shards["sum"], "sum", 5, f"alexnet-{kind}", FAULTS[kind])
    _assert_served(done, faults, results, after, left, reference, "sum", dead=[3])
    seen = done.first("rank 3 failed")
    assert seen is not None and seen - faults[0][1] < 15.0, _explain(done, faults)  # relay (3 s) or detector (2.5 s), slack for load
    if kind == "freeze_then_thaw":
        # thawed, it left (it knew it overslept, or learned it was declared dead) instead of accusing a peer
        assert "rank 3 was stopped for" in done.output or "reported dead by someone else" in done.output, \
            _explain(done, faults)


def test_alexnet_mds_r2_survives_two_losses_in_sequence_at_random_moments(shards, reference):
    """MDS 4+2 on 6 devices: a power-off of device 1 (rank 2) at a random moment, then a loud death of
    device 3 (rank 4) a random 0.5-4 s later (before or after the first is reported): both reported,
    every request served and matched."""
    gap = _moment("alexnet-mds-second", 0.5, 4.0)

    def faults(c):
        first = c.power_off(1)
        time.sleep(gap)
        return [("power_off d1", first), ("loud_death d3", c.loud_death(3))]

    done, results, after, times, left = _run(shards["mds"], "mds", 6, "alexnet-mds", faults)
    _assert_served(done, times, results, after, left, reference, "mds", dead=[2, 4])
    for rank, (_what, at) in zip((2, 4), times):
        seen = done.first(f"rank {rank} failed")
        assert seen is not None and seen - at < 15.0, _explain(done, times)
