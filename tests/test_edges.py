"""The edges of a job under real mpiexec: bad input, start-up and shutdown faults, signals, stalls.

Each case runs a real job through ``python -m mpicdc.launch`` under a hard timeout and asserts
the exit code, the one-line message, that nothing of the job is left running and, where requests
run, the outputs against the serial reference (``--check``).
"""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from mpi_helpers import LiveJob, requires_mpi, run_job

from mpicdc.store import prepare_zoo

pytestmark = [requires_mpi, pytest.mark.mpi]

RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(prepare_zoo(tmp_path_factory.mktemp("shards"), "tiny", 4, 1, "sum"))


def _one_error_line(job, fragment):
    """The error is said once (by rank 0), whatever the number of ranks."""
    text = job.stdout + job.stderr
    assert fragment in text, job.explain()
    assert text.count(fragment) == 1, f"said {text.count(fragment)} times\n{job.explain()}"


def _npy_header_claiming(shape) -> bytes:
    """A .npy file's bytes whose header claims ``shape`` (terabytes) with no data behind it."""
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("case, make, fragment", [
    ("empty-npy", lambda p: p.write_bytes(b""), "not a readable .npy file"),
    ("terabyte-npy", lambda p: p.write_bytes(_npy_header_claiming((1 << 20, 1 << 20, 1 << 10))), "array of shape"),
    ("folder", lambda p: p.mkdir(), "is a folder"),
    ("not-an-image", lambda p: p.write_bytes(b"\x89PNG but not really"), "not a readable image"),
    ("nan-npy", lambda p: np.save(p, np.full((3, 16, 16), np.nan, np.float32)), "non-finite"),
])
def test_bad_input_ends_the_job_with_one_line_and_exit_2(tiny, tmp_path, case, make, fragment):
    name = {"not-an-image": "x.png", "folder": "x.npy"}.get(case, "x.npy")
    make(tmp_path / name)
    job = run_job(6, ["tiny", "--weights", tiny, "--input", str(tmp_path / name)], tmp_path, timeout=90)
    assert job.returncode == 2, job.explain()
    _one_error_line(job, fragment)
    assert job.results is None  # no results file was started


def test_unwritable_output_is_refused_before_the_first_request(tiny, tmp_path):
    job = run_job(6, ["tiny", "--weights", tiny, "--output", str(tmp_path / "no" / "such" / "run.json")],
                  tmp_path, timeout=90, output=False)
    assert job.returncode == 2, job.explain()
    _one_error_line(job, "cannot write there")
    assert "request 0:" not in job.stdout


def test_usage_errors_through_the_launcher_say_it_once_and_return_2(tmp_path):
    job = run_job(6, ["tiny", "--inject", "crash:2@1:conv3_l"], tmp_path, timeout=60, output=False)
    assert job.returncode == 2, job.explain()
    _one_error_line(job, "unknown layer 'conv3_l'")


def test_frozen_worker_does_not_keep_the_job_alive(tiny, tmp_path):
    """SIGSTOP (forever) of a worker mid-run: every request is served and the job still ends."""
    job = LiveJob(6, ["tiny", "--weights", tiny, "--repeat", "60", "--check"], tmp_path, timeout=120)
    job.wait_for("request 3:")
    job.signal_rank(2, signal.SIGSTOP)
    done = job.finish()
    assert done.returncode == 0, done.explain()
    assert all(r["ok"] and r["check_rel_err"] <= RTOL for r in done.results["requests"]), done.explain()
    assert "did not stop when asked" in done.stdout or "have not exited" in done.stdout, done.explain()


def test_brief_stall_is_readmitted_and_a_later_crash_costs_nothing(tiny, tmp_path):
    """A 0.6 s freeze drops a worker as silent; when it answers again it is re-admitted, so a crash
    of another worker later is still within the code's tolerance."""
    job = LiveJob(6, ["tiny", "--weights", tiny, "--repeat", "400", "--check", "--inject", "crash:3@399"],
                  tmp_path, timeout=180)
    job.wait_for("request 5:")
    pid = job.signal_rank(2, signal.SIGSTOP)
    time.sleep(0.6)  # well below the 2 s failure detector: the rank is stalled, not dead
    import os
    os.kill(pid, signal.SIGCONT)
    done = job.finish()
    assert done.returncode == 0, done.explain()
    assert done.results["dead_ranks"] == [3], done.explain()
    assert all(r["ok"] and r["check_rel_err"] <= RTOL for r in done.results["requests"]), done.explain()
    assert 2 not in done.results["silent_ranks"], done.explain()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 128 + signal.SIGINT)])
def test_signal_to_the_launcher_ends_the_whole_job(tiny, tmp_path, sig, code):
    job = LiveJob(6, ["tiny", "--weights", tiny, "--repeat", "100000"], tmp_path, timeout=120)
    job.wait_for("request 2:")
    job.proc.send_signal(sig)
    done = job.finish()  # fails if any rank or mpirun outlives the launcher
    assert done.returncode == code, done.explain()
    assert "Traceback" not in done.stdout, done.explain()
    assert "ending the job" in done.stdout, done.explain()


@pytest.mark.parametrize("how", ["killed", "frozen-then-killed"])
def test_rank_killed_during_start_up_ends_the_job_naming_it(tiny, tmp_path, how):
    """A worker SIGKILLed as soon as it exists (inside MPI_Init), or frozen there for 3 s and then
    killed: the job ends within its start-up deadline with exit 2 and one line, nothing left."""
    job = LiveJob(6, ["tiny", "--weights", tiny, "--repeat", "3", "--startup-timeout", "10"], tmp_path,
                  timeout=120)
    end = time.monotonic() + 30
    while 3 not in job.pids() and time.monotonic() < end:
        time.sleep(0.005)
    if how == "frozen-then-killed":
        job.signal_rank(3, signal.SIGSTOP)
        time.sleep(3)
    job.signal_rank(3, signal.SIGKILL)
    done = job.finish()
    text = done.stdout
    if done.returncode == 0:  # the kill landed after start-up: then it is an ordinary crash, survived
        assert done.results["dead_ranks"] == [3], done.explain()
        return
    assert done.returncode == 2, done.explain()
    assert "Traceback" not in text, done.explain()
    assert text.count("mpicdc: ") == 1 and ("did not start" in text or "did not report" in text
                                             or "start-up" in text), done.explain()


def test_resumed_worker_declared_dead_exits_quietly(tiny, tmp_path):
    """Frozen past the failure detector's 2 s, a worker is declared dead; when it resumes it ends with
    one line (its progress thread saw it was stopped past the timeout; or, if an MPI call came first,
    Open MPI's "reported dead"), no stack dump, while the job goes on."""
    job = LiveJob(6, ["tiny", "--weights", tiny, "--repeat", "100000", "--quiet"], tmp_path, timeout=120)
    job.wait_for("mpicdc: tiny on 6 ranks")
    time.sleep(0.5)
    pid = job.signal_rank(2, signal.SIGSTOP)
    time.sleep(4)
    import os
    os.kill(pid, signal.SIGCONT)
    time.sleep(2)
    job.proc.send_signal(signal.SIGTERM)  # end the endless run
    done = job.finish()
    text = done.stdout + done.stderr
    assert "rank 2 was stopped for" in text or "reported dead" in text, done.explain()
    assert "Process received signal" not in done.stdout and "Traceback" not in done.stdout, done.explain()
    assert "Send error after request freed" not in done.stdout, done.explain()  # the master lived on


@pytest.fixture(scope="module")
def tiny_mds(tmp_path_factory):
    return str(prepare_zoo(tmp_path_factory.mktemp("shards"), "tiny", 3, 2, "mds"))


def test_soak_random_kills_stops_and_freezes_within_tolerance(tiny_mds, tmp_path):
    """400 requests under MDS r=2 while, from outside, one worker is SIGKILLed, another frozen for
    good, and the others frozen briefly several times: 0 failed, 0 wrong, bounded exit."""
    rng = np.random.default_rng(2026)
    workers = [1, 2, 3, 4, 5]
    killed, frozen = (int(w) for w in rng.choice(workers, 2, replace=False))
    others = [w for w in workers if w not in (killed, frozen)]
    events = sorted([(int(rng.integers(20, 120)), "kill", killed), (int(rng.integers(120, 220)), "stop", frozen)]
                    + [(int(rng.integers(10, 380)), "freeze", int(rng.choice(others))) for _ in range(6)])
    job = LiveJob(6, ["tiny", "--weights", tiny_mds, "--repeat", "400", "--check"], tmp_path, timeout=300)
    import os
    for request, kind, rank in events:
        job.wait_for(f"request {request}:")
        if kind == "kill":
            job.signal_rank(rank, signal.SIGKILL)
        elif kind == "stop":
            job.signal_rank(rank, signal.SIGSTOP)
        else:  # a brief freeze, well under the detector's timeout: a stall, not a death
            pid = job.signal_rank(rank, signal.SIGSTOP)
            time.sleep(float(rng.uniform(0.05, 0.4)))
            os.kill(pid, signal.SIGCONT)
    done = job.finish()
    assert done.returncode == 0, f"events {events}\n{done.explain()}"
    requests = done.results["requests"]
    assert len(requests) == 400
    assert all(r["ok"] for r in requests), [r["error"] for r in requests if not r["ok"]]
    assert max(r["check_rel_err"] for r in requests) <= 1e-3  # MDS r=2: a 2x2 solve per layer
    assert killed in done.results["dead_ranks"], events
