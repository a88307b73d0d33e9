"""The supervisor under real mpiexec: a job that ends abnormally is relaunched and every request answered once.

``python -m mpicdc.launch --supervise`` runs tiny (sum parity 4+1) with ``--journal``; faults are
real (a SIGKILL from outside to rank 0, injected crashes).  Every test checks that each request id
was answered exactly once in the journal and that every output equals the serial numpy reference
forward (:func:`mpicdc.core.kernels.forward` on the same input and weights) within ``RTOL``.
"""
from __future__ import annotations

import json
import re
import signal
import sys
import time
from collections import Counter

import numpy as np
import pytest
from mpi_helpers import CLUSTER_UNAVAILABLE, ROOT, LiveJob, requires_mpi, run_bounded

from mpicdc.core.kernels import default_input, forward
from mpicdc.core.models import get_model
from mpicdc.core.random_weights import init_weights
from mpicdc.runtime.journal import decode_output, read_journal
from mpicdc.store import prepare_zoo

pytestmark = [requires_mpi, pytest.mark.mpi, pytest.mark.slow]

RTOL = 1e-4  # sum parity: decoding is one subtraction in float32 (docs/codes.md)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(prepare_zoo(tmp_path_factory.mktemp("shards"), "tiny", 4, 1, "sum"))


@pytest.fixture(scope="module")
def reference():
    model = get_model("tiny")
    return forward(model, init_weights(model, 0), default_input(model, 0)).reshape(-1)


def assert_every_request_answered_once(journal, results, n, reference, text):
    """Each id 0..n-1 has exactly one good answer in the journal; outputs (journal and --output) match."""
    state = read_journal(journal)
    good = Counter(a["id"] for run in state.runs for a in run.answers if a["ok"])
    assert sorted(good) == list(range(n)) and set(good.values()) == {1}, (good, text)
    for i in range(n):
        out = decode_output(state.answers[i])
        err = np.max(np.abs(out - reference)) / np.max(np.abs(reference))
        assert err <= RTOL, (i, err, text)
    assert results is not None and results["supervised"], text
    assert [r["request"] for r in results["requests"]] == list(range(n)), text
    for r in results["requests"]:
        np.testing.assert_allclose(np.asarray(r["output"], dtype=np.float32), reference,
                                   rtol=0, atol=RTOL * float(np.max(np.abs(reference))))


def wait_answered(journal, count: int, timeout: float = 60) -> int:
    """Wait (bounded) until the journal holds ``count`` answers; how many it holds then."""
    end = time.monotonic() + timeout
    while len(read_journal(journal).answered) < count and time.monotonic() < end:
        time.sleep(0.02)
    return len(read_journal(journal).answered)


def live_supervised(tiny, tmp_path, n: int, supervisor_args: list, answered: int) -> tuple:
    """tiny under ``launch --supervise`` in the background, once ``answered`` requests are in its journal."""
    journal = tmp_path / "journal.jsonl"
    job = LiveJob(6, ["tiny", "--weights", tiny, "--repeat", str(n), "--check", "-q", "--journal", str(journal)],
                  tmp_path, timeout=150, launcher_args=["--supervise", *supervisor_args])
    job.wait_for("mpicdc: tiny on 6 ranks")
    done = wait_answered(journal, answered)
    assert answered <= done < n, f"answered {done} before the fault\n{''.join(job.lines)}"
    return job, journal, done


def test_master_killed_mid_run_is_relaunched_and_every_request_answered_once(tiny, reference, tmp_path):
    n = 120
    job, journal, killed_with = live_supervised(tiny, tmp_path, n, ["--relaunches", "2"], 20)
    job.signal_rank(0, signal.SIGKILL)
    killed_at = time.time()
    done = job.finish()
    assert done.returncode == 0, done.stdout
    assert "attempt 1 ended: the master died or the runtime ended the job" in done.stdout, done.stdout
    assert "relaunch 1/2 on 6 rank(s)" in done.stdout, done.stdout
    assert_every_request_answered_once(journal, done.results, n, reference, done.stdout)
    attempts = done.results["attempts"]
    assert [a["ranks"] for a in attempts] == [6, 6] and attempts[1]["first_answer"] > killed_at, done.stdout
    # the request in flight when the master died straddled the relaunch: it is late, and said so
    # (the master begins the next request as soon as it journaled the last, so one is always in flight)
    late = done.results["summary"]["late_s"]
    assert len(late) == 1, late
    (i, seconds), = late.items()
    assert int(i) >= killed_with and 0 < seconds < 60, late
    assert f"request {i} answered {seconds:.2f} s after its first submission" in done.stdout, done.stdout


def test_frozen_master_is_ended_by_the_stall_deadline_and_relaunched(tiny, reference, tmp_path):
    """SIGSTOP to rank 0: nothing fails, nothing is answered; after --stall-timeout the attempt is
    ended (the stopped master SIGKILLed with its job) and the rest replayed."""
    n = 80
    job, journal, _ = live_supervised(tiny, tmp_path, n, ["--stall-timeout", "10"], 10)
    job.signal_rank(0, signal.SIGSTOP)
    done = job.finish()
    assert done.returncode == 0, done.stdout
    assert "made no progress for 10 s; ending it" in done.stdout, done.stdout
    assert "attempt 1 ended: it answered nothing for 10 s (--stall-timeout)" in done.stdout, done.stdout
    assert_every_request_answered_once(journal, done.results, n, reference, done.stdout)


def test_sigterm_to_the_supervisor_ends_the_job_keeps_the_answers_and_relaunches_nothing(tiny, tmp_path):
    n = 2000
    job, journal, _ = live_supervised(tiny, tmp_path, n, [], 10)
    job.proc.send_signal(signal.SIGTERM)
    done = job.finish()
    assert done.returncode == 143, done.stdout
    assert "relaunch" not in done.stdout and "stopped by signal 15" in done.stdout, done.stdout
    answered = read_journal(journal).answered
    assert 10 <= len(answered) < n and len(read_journal(journal).runs) == 1, done.stdout
    assert [r["request"] for r in done.results["requests"]] == sorted(answered), done.stdout  # nothing lost


def _supervised(args, tmp_path, timeout=120):
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "mpicdc.launch", "--supervise", *args, "--output", str(out)]
    job = run_bounded(cmd, tmp_path, timeout, str(out))
    job.results = json.loads(out.read_text()) if out.exists() else None
    return job


def test_losses_beyond_tolerance_relaunch_on_fewer_ranks_with_a_plan_cut_on_the_spot(tiny, reference, tmp_path):
    """Two crashes under sum parity: request 3 fails, the job ends with exit 4; the supervisor drops
    both lost devices and relaunches on 4 ranks (2 workers + 1 parity, shards cut on the spot)."""
    n, journal = 10, tmp_path / "journal.jsonl"
    job = _supervised(["-np", "6", "tiny", "--weights", tiny, "--repeat", str(n), "--check", "-q",
                       "--inject", "crash:2@3", "--inject", "crash:3@3", "--journal", str(journal)], tmp_path)
    assert job.returncode == 0, job.explain()
    assert ("attempt 1 ended: losses beyond the code's tolerance (exit 4, ranks lost: [2, 3]); 3/10 requests "
            "answered; without the devices of lost ranks [2, 3]; relaunch 1/3 on 4 rank(s)") in job.stderr, \
        job.explain()
    attempts = job.results["attempts"]
    assert [a["ranks"] for a in attempts] == [6, 4], attempts
    assert attempts[1]["ids"] == "3-9" and "w2-p1-sum cut on the spot" in attempts[1]["plan"], attempts
    assert_every_request_answered_once(journal, job.results, n, reference, job.explain())
    assert set(job.results["summary"]["late_s"]) == {"3"}, job.results["summary"]  # the failed request, replayed


def test_gives_up_with_exit_5_when_no_relaunch_is_left(tiny, tmp_path):
    journal = tmp_path / "journal.jsonl"
    job = _supervised(["--relaunches", "0", "-np", "6", "tiny", "--weights", tiny, "--repeat", "6", "-q",
                       "--inject", "crash:2@3", "--inject", "crash:3@3", "--journal", str(journal)], tmp_path)
    assert job.returncode == 5, job.explain()
    assert "giving up after 0 relaunch(es): 3 of 6 request(s) unanswered: 3-5" in job.stderr, job.explain()
    assert read_journal(journal).answered == {0, 1, 2}
    summary = job.results["summary"]  # the answers it has are kept in the output
    assert (summary["requests"], summary["ok"]) == (6, 3)
    assert [r["request"] for r in job.results["requests"]] == [0, 1, 2]


def test_supervised_run_checks_its_options_before_launching(tmp_path):
    job = run_bounded([sys.executable, "-m", "mpicdc.launch", "--supervise", "tiny", "--output", "x.h5"],
                      tmp_path, 60)
    assert job.returncode == 2 and "a supervised run writes JSON" in job.stderr, job.explain()
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    job = run_bounded([sys.executable, "-m", "mpicdc.launch", "--supervise", "-np", "3", "--hostfile", "hosts",
                       "tiny"], tmp_path, 60)
    assert job.returncode == 2 and "-np 3 but the hostfile hosts lists 2 slot(s)" in job.stderr, job.explain()


@pytest.mark.cluster
def test_loud_node_death_on_the_cluster_relaunches_on_the_reachable_devices(tiny, reference, tmp_path):
    """Device 2 (rank 3) of a head + 5 device cluster dies loudly (PRRTE ends the whole job, mpirun
    returns 0) and stays off the network: the probe finds it unreachable, the supervisor relaunches on
    the head + 4 devices with shards cut on the spot (3 workers + 1 parity) and answers everything."""
    why = CLUSTER_UNAVAILABLE
    if why:
        pytest.skip(f"no network namespaces here: {why}")
    import random

    from mpicdc.cluster import Cluster, ClusterJob, mpirun_extra
    from mpicdc.cluster.netns import list_links, list_netns

    n, prefix = 150, f"tsup{random.randrange(10 ** 6)}"
    journal, out = tmp_path / "journal.jsonl", tmp_path / "out.json"
    with Cluster(5, prefix=prefix) as c:
        cmd = ["ip", "netns", "exec", c.head.netns, sys.executable, "-m", "mpicdc.launch", "--supervise",
               "--probe-timeout", "1", "-np", "6", "--hostfile", c.hostfile,
               *(f"--mpirun-arg={a}" for a in mpirun_extra(c)),
               "tiny", "--weights", tiny, "--repeat", str(n), "--check", "-q", "--journal", str(journal),
               "--output", str(out)]
        env = dict(__import__("os").environ, PYTHONPATH=str(ROOT))
        job = ClusterJob(c, cmd, env, timeout=240)
        c._jobs = [*getattr(c, "_jobs", []), job]
        job.wait_for("on 6 ranks")
        assert wait_answered(journal, 10) >= 10, job.text
        c.loud_death(2)
        c.link_cut(2)  # it does not come back
        done = job.finish()
        left = c.leftovers()
        gone_addr = c.node(2).address
    assert not [ns for ns in list_netns() if ns.startswith(prefix + "-")]
    assert not [link for link in list_links() if link.startswith(prefix)]
    assert not done.timed_out and done.returncode == 0, done.explain()
    assert "PRTE has lost communication with a remote daemon" in done.output, done.explain()
    # the supervisor may probe while the dead device's address still refuses connections (its link is
    # cut just after): then it relaunches on 6, that attempt cannot start, and the next probe drops it
    assert re.search(rf"dropped: {re.escape(gone_addr)} unreachable; relaunch [12]/3 on 5 rank\(s\)", done.output), \
        done.explain()
    assert not {ns: p for ns, p in left.items() if not ns.endswith("-d2")}, left
    results = json.loads(out.read_text())
    assert [a["ranks"] for a in results["attempts"]] in ([6, 5], [6, 6, 5]), results["attempts"]
    assert "w3-p1-sum cut on the spot" in results["attempts"][-1]["plan"]
    assert_every_request_answered_once(journal, results, n, reference, done.explain())
