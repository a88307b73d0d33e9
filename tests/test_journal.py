"""The answer journal, request ids and the supervisor's pure parts (no MPI): hostfiles, probes, lateness."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mpicdc.runtime.journal import Journal, decode_output, read_journal, request_ids
from mpicdc.runtime.supervisor import (
    ids_text,
    lateness,
    reachable,
    read_hostfile,
    unreachable_hosts,
    without_option,
    write_hostfile,
)


def _result(output, ok=True, latency_s=0.01):
    out = None if output is None else np.asarray(output, dtype=np.float32)
    top = [] if out is None else [(int(c), float(out[c])) for c in np.argsort(out)[::-1][:2]]
    return SimpleNamespace(ok=ok, output=out, latency_s=latency_s, error=None if ok else "lost",
                           top_k=lambda k: top[:k])


def test_journal_round_trip_is_exact_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "j.jsonl"
    rng = np.random.default_rng(0)
    outs = {i: rng.standard_normal(1000).astype(np.float32) for i in (4, 5)}
    j = Journal(str(path))
    j.start(6, "w4-p1-sum", [4, 5, 6])
    j.answer(4, _result(outs[4]), 2, check_rel_err=1e-7)
    j.answer(5, _result(outs[5]), 2)
    j.answer(6, _result(None, ok=False), 2)
    j.close()
    with open(path, "a") as f:  # the master killed while writing its next line
        f.write('{"t": 1, "event": "answer", "id": 7, "ok": tr')
    state = read_journal(path)
    assert state.answered == {4, 5}
    assert len(state.runs) == 1 and state.runs[0].ids == [4, 5, 6] and state.runs[0].end is None
    for i in (4, 5):
        np.testing.assert_array_equal(decode_output(state.answers[i]), outs[i])  # bit-exact, not pickled
    assert state.answers[4]["check_rel_err"] == pytest.approx(1e-7)
    assert [a["ok"] for a in state.runs[0].answers] == [True, True, False]
    # a second run appends; the first good answer of an id stays the one
    j = Journal(str(path))
    j.start(4, "w2-p1-sum", [6, 7])
    j.answer(6, _result(outs[4]), 2)
    j.end(0, [2, 3])
    j.close()
    state = read_journal(path)
    assert state.answered == {4, 5, 6} and state.runs[1].end["lost"] == [2, 3]
    assert all(json.loads(line)["t"] > 1e9 for line in path.read_text().splitlines()[:3])


def test_request_ids_keep_order_and_skip_answered(tmp_path):
    assert request_ids(4) == [0, 1, 2, 3]
    assert request_ids(4, "7,2-3") == [7, 2, 3]
    with pytest.raises(ValueError, match="appears twice"):
        request_ids(1, "1,1")
    with pytest.raises(ValueError, match="cannot write there"):
        Journal(str(tmp_path / "no-such-folder" / "j.jsonl"))
    with pytest.raises(ValueError, match="no such journal"):
        request_ids(3, None, str(tmp_path / "missing.jsonl"))
    path = tmp_path / "j.jsonl"
    j = Journal(str(path))
    j.start(6, "t", [0, 1, 2])
    j.answer(1, _result([1.0, 2.0]), 1)
    j.close()
    assert request_ids(3, None, str(path)) == [0, 2]
    assert ids_text([0, 2, 3, 4]) == "0,2-4" and ids_text([5, 1]) == "5,1"


def test_without_option_drops_both_spellings():
    argv = ["tiny", "--inject", "crash:2@1", "--check", "--inject=crash:3@1", "--repeat", "3"]
    assert without_option(argv, "--inject") == ["tiny", "--check", "--repeat", "3"]


def test_hostfile_slots_in_rank_order_and_back(tmp_path):
    src = tmp_path / "hosts"
    src.write_text("# cluster\n10.0.0.1 slots=1\n10.0.0.10 slots=2  # two ranks\n\n10.0.0.11\n")
    devices = read_hostfile(str(src))
    assert devices == ["10.0.0.1", "10.0.0.10", "10.0.0.10", "10.0.0.11"]
    out = write_hostfile(devices[:1] + devices[2:], tmp_path / "h2")
    assert Path(out).read_text() == "10.0.0.1 slots=1\n10.0.0.10 slots=1\n10.0.0.11 slots=1\n"


def test_probe_tells_a_refusing_host_from_a_silent_one():
    closed = socket.socket()
    closed.bind(("127.0.0.2", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: the host answers with a refusal, so it is alive
    assert reachable("127.0.0.2", port, 1.0)
    # a host that answers nothing: a listener whose backlog is full drops every new SYN (as a dead link does)
    silent = socket.socket()
    silent.bind(("127.0.0.3", 0))
    silent.listen(0)
    port = silent.getsockname()[1]
    fill = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.3", port))
        fill.append(c)
    time.sleep(0.1)
    try:
        start = time.monotonic()
        assert unreachable_hosts(["127.0.0.3", "localhost"], port, 0.5) == {"127.0.0.3"}
        assert time.monotonic() - start < 3.0  # bounded by the probe's timeout
    finally:
        for c in fill + [silent]:
            c.close()


def test_lateness_counts_only_the_request_in_flight_when_a_run_died(tmp_path):
    path = tmp_path / "j.jsonl"
    lines = [
        {"t": 100.0, "event": "start", "ids": "0-3"},
        {"t": 100.5, "event": "answer", "id": 0, "ok": True, "latency_ms": 500.0},
        {"t": 101.0, "event": "answer", "id": 1, "ok": True, "latency_ms": 500.0},
        # run killed while serving request 2 (begun at 101.0); request 3 never started
        {"t": 110.0, "event": "start", "ids": "2-3"},
        {"t": 110.4, "event": "answer", "id": 2, "ok": True, "latency_ms": 400.0},
        {"t": 110.8, "event": "answer", "id": 3, "ok": False, "latency_ms": 300.0},
        {"t": 110.9, "event": "end", "code": 4, "lost": [2, 3]},
        {"t": 120.0, "event": "start", "ids": "3"},
        {"t": 120.5, "event": "answer", "id": 3, "ok": True, "latency_ms": 500.0},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    late = lateness([0, 1, 2, 3], str(path))
    assert set(late) == {2, 3}
    assert late[2] == pytest.approx(110.4 - 101.0)
    assert late[3] == pytest.approx(120.5 - (110.8 - 0.3))


def test_run_refuses_bad_ids_and_a_missing_journal_before_starting_mpi(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for option, value, said in (("--request-ids", "2,2", "appears twice"), ("--request-ids", "3-1", "runs backwards"),
                                ("--skip-answered", str(tmp_path / "none.jsonl"), "no such journal file")):
        done = subprocess.run([sys.executable, "-m", "mpicdc.run", "tiny", option, value], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and said in done.stderr, (option, value, done.stderr)
