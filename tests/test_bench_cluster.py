"""``python -m mpicdc.bench cluster``: options checked before anything is made, targets judged from the runs,
and one real run on the namespace cluster (a crash absorbed in the job: nothing lost, nothing wrong)."""
from __future__ import annotations

import json

import pytest
from mpi_helpers import requires_cluster, requires_mpi

from mpicdc.bench import cluster as bench


def _row(**changes) -> dict:
    """A run as cluster_recovery.one_run reports it: a fault absorbed in the job, every target met."""
    row = {"trial": 0, "fault": "power_off", "requests": 20, "answered": 20, "matched": 1, "hit_in_job": 1,
           "hit_ms": 900.0, "median_ms": 850.0, "hit_over_median": 1.06, "max_before_fault_ms": 880.0,
           "detect_s": 1.9, "runtime_ended_s": None, "attempts": 1, "relaunch_first_answer_s": None}
    return {**row, **changes}


def test_judge_names_each_missed_target_and_nothing_else():
    assert bench.judge([_row()]) == []
    missed = bench.judge([_row(answered=18), _row(fault="crash", matched=0), _row(hit_over_median=1.5)])
    assert missed[0] == "power_off (trial 1): 2 of 20 requests lost (target 0)"
    assert missed[1] == "crash (trial 1): an answer did not match the serial forward (target 0 wrong)"
    assert missed[2].startswith("power_off (trial 1): the hit request took 1.50x the median in the job "
                                "(target at most 1.2x; noise 1.04x)")
    assert len(missed) == 3
    # a request late across a relaunch is no in-job latency: the ratio target does not apply to it
    assert bench.judge([_row(hit_in_job=0, hit_over_median=9.0, attempts=2, relaunch_first_answer_s=8.0)]) == []


def test_table_gives_ranges_over_trials_and_the_outcome_per_fault():
    rows = [_row(), _row(trial=1, detect_s=2.1, hit_over_median=1.10),
            _row(fault="loud_death", hit_in_job=0, hit_ms=9500.0, hit_over_median=11.0, detect_s=None,
                 runtime_ended_s=0.1, attempts=2, relaunch_first_answer_s=7.25)]
    text = bench.table(rows).splitlines()
    assert text[0].split()[:3] == ["fault", "lost", "wrong"]
    power, loud = text[1].split(), text[2].split()
    assert power[:5] == ["power_off", "0", "0", "1.90-2.10", "1.06-1.10x"] and text[1].endswith("absorbed in the job")
    assert loud[:5] == ["loud_death", "0", "0", "-", "-"] and "7.25" in loud and "9.50" in loud
    assert text[2].endswith("relaunched by the supervisor")
    ended_at_the_end = _row(runtime_ended_s=30.0)  # a daemon per device: all served, PRRTE gave up at the end
    assert bench.table([ended_at_the_end]).endswith("absorbed in the job (the runtime lost the daemon at its end)")
    mixed = bench.table([_row(), _row(trial=1, answered=15)])
    assert mixed.endswith("1/2 absorbed in the job; 1/2 the job ended"), mixed


@pytest.mark.parametrize("args, message", [
    (["--faults", "crash,meteor"], "--faults: unknown meteor; choose from crash, power_off"),
    (["--requests", "10", "--fault-after", "10"], "--fault-after must be in 1..9 (--requests 10)"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--model", "resnet9000"], "--model:"),
    (["--arrangement", "cloud"], "invalid choice: 'cloud'"),
])
def test_bad_options_are_refused_before_any_cluster_is_made(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@requires_mpi
@requires_cluster
@pytest.mark.mpi
@pytest.mark.cluster
@pytest.mark.slow
def test_a_crash_on_the_cluster_is_measured_and_written(tmp_path):
    """tiny, daemons on the head, a crash of device 2 after 10 of 60 answers: nothing lost or wrong,
    detected within a second; the JSON holds the run (the latency ratio is printed, not asserted:
    tiny's 20 ms requests on loaded cores are noise)."""
    out = tmp_path / "cluster.json"
    code = bench.main(["--faults", "crash", "--requests", "60", "--fault-after", "10", "--output", str(out),
                       "--weights-dir", str(tmp_path / "w")])
    assert code == 0
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    assert (run["fault"], run["system"], run["answered"], run["matched"], run["exit_code"]) == \
        ("crash", "cdc-head", 60, 1, 0), run
    assert run["hit_in_job"] == 1 and run["attempts"] == 1 and 0 <= run["detect_s"] < 1.0, run
    assert not [m for m in doc["missed"] if "lost" in m or "did not match" in m], doc["missed"]
