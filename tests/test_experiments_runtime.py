"""The runtime experiments (fig1, fig5b, recovery, simval) in --quick mode, end to end.

Each runs as a subprocess into a temporary folder with a hard timeout and must
leave no MPI process behind.  The checks are about correctness only -- files
written, every MPI output matching the serial reference (``check_rel_err`` <=
1e-4), fractions in [0, 1], tables with the expected rows -- never about
latency targets, which depend on how loaded the machine is.
"""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
from mpi_helpers import requires_mpi, run_bounded

pytestmark = [requires_mpi, pytest.mark.mpi, pytest.mark.slow]

RTOL = 1e-4


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """One weights folder for the module: AlexNet shards are prepared once and reused."""
    return tmp_path_factory.mktemp("exp-runtime")


def run_experiment(name: str, out: Path, weights: Path, *extra, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"mpicdc.experiments.{name}", "--quick", "--out", str(out),
           "--weights-dir", str(weights), *extra]
    job = run_bounded(cmd, out.parent, timeout, str(weights))
    stdout, stderr = job.stdout, job.stderr
    result = subprocess.CompletedProcess(cmd, job.returncode, stdout, stderr)
    assert job.returncode == 0, f"{name} exited {job.returncode}\n{stdout}\n{stderr}"
    for f in ("summary.txt",):
        assert (out / f).exists(), f"{name}: {f} missing"
    assert (out / "summary.txt").read_text().strip() in stdout
    return result


def rows(path: Path) -> list:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def num(x) -> float:
    return float(x) if x not in ("", None) else math.nan


def test_fig1_quick(shared):
    out = shared / "fig1"
    run_experiment("fig1", out, shared / "weights")
    assert (out / "fig1.png").stat().st_size > 10_000
    fr = {r["source"]: r for r in rows(out / "fractions.csv")}
    assert set(fr) == {"paper", "delay model", "mpi", "sim"}
    for src in ("delay model", "mpi", "sim"):
        f2, f3 = num(fr[src]["within_2c"]), num(fr[src]["within_3c"])
        assert 0.0 <= f2 <= f3 <= 1.0, (src, f2, f3)
    # the delay model is calibrated to the paper's two points exactly
    assert abs(num(fr["delay model"]["within_2c"]) - 0.34) < 1e-3
    assert abs(num(fr["delay model"]["within_3c"]) - 0.42) < 1e-3
    assert int(fr["mpi"]["replies"]) == 3 * 60          # 60 requests, every reply of 3 workers recorded
    assert num(fr["mpi"]["worst_check_rel_err"]) <= RTOL
    arrivals = rows(out / "arrivals.csv")
    c = num(fr["mpi"]["c_ms"])
    mpi = [num(a["arrival_ms"]) for a in arrivals if a["source"] == "mpi"]
    assert len(mpi) == 180 and min(mpi) >= 0.9 * c      # nothing arrives before its modeled reply time
    assert sum(a["source"] == "sim" for a in arrivals) == int(fr["sim"]["replies"])


def test_fig5b_quick(shared):
    out = shared / "fig5b"
    run_experiment("fig5b", out, shared / "weights")
    assert (out / "fig5b.png").stat().st_size > 10_000
    reqs = rows(out / "requests.csv")
    assert {r["system"] for r in reqs} == {"uncoded", "2MR+1", "CDC+1"}
    for r in reqs:
        assert r["ok"] == "1", r
        assert num(r["check_rel_err"]) <= RTOL, r
    stats = rows(out / "stats.csv")
    assert len(stats) == 6
    for s in stats:
        assert int(s["ok"]) == int(s["requests"]) > 0
        assert 0 < num(s["p50_ms"]) <= num(s["p95_ms"]) <= num(s["p99_ms"]) <= num(s["max_ms"])
        if s["source"] == "emulated":
            assert int(s["requests"]) == 5
            assert num(s["worst_check_rel_err"]) <= RTOL
            assert 0 < num(s["median_compute_fraction"]) <= num(s["worst_compute_fraction"])
    sens = rows(out / "sensitivity.csv")
    assert len(sens) >= 3 and all(num(r["mean_ratio"]) > 0 and num(r["p99_ratio"]) > 0 for r in sens)


def test_recovery_quick(shared):
    out = shared / "recovery"
    run_experiment("recovery", out, shared / "weights")
    assert (out / "recovery.png").stat().st_size > 10_000
    reqs = rows(out / "requests.csv")
    for system in ("CDC+1", "restart", "supervised"):
        mine = sorted(int(r["request"]) for r in reqs if r["system"] == system)
        assert mine == list(range(5)), (system, mine)      # every request served, the killed one included
    for r in reqs:
        assert r["ok"] == "1" and num(r["check_rel_err"]) <= RTOL, r
    cdc = [r for r in reqs if r["system"] == "CDC+1"]
    assert all(int(r["decoded_layers"]) >= 1 for r in cdc if int(r["request"]) > 2)  # rank 2 is dead after request 2
    (parts,) = rows(out / "recovery.csv")
    total = sum(num(parts[k]) for k in ("detect_ms", "teardown_ms", "relaunch_reload_ms", "recompute_ms"))
    assert all(num(parts[k]) > 0 for k in ("detect_ms", "teardown_ms", "relaunch_reload_ms", "recompute_ms",
                                            "reshard_ms", "cdc_kill_request_ms"))
    assert abs(total - num(parts["restart_total_ms"])) < 1.0
    # the supervised restart: the killed request was submitted before its job ended, answered after the relaunch
    assert num(parts["supervised_late_ms"]) > num(parts["supervised_first_answer_ms"]) > \
        num(parts["supervised_ready_ms"]) > 0


def test_simval_quick(shared):
    out = shared / "sim_validation"
    run_experiment("simval", out, shared / "weights")
    assert (out / "simval.png").stat().st_size > 10_000
    table = rows(out / "comparison.csv")
    assert len(table) == 9                               # 3 systems x (mean, p95, p99)
    assert {r["system"] for r in table} == {"uncoded", "2MR+1", "CDC+1"}
    for r in table:
        assert int(r["emulated_requests"]) == 5
        for k in ("emulated_ms", "sim_ms", "sim_ovh_ms"):
            assert num(r[k]) > 0
        assert math.isfinite(num(r["sim_ovh_err_pct"])) and r["within_10pct"] in ("0", "1")
    for r in rows(out / "requests.csv"):
        assert r["ok"] == "1" and num(r["check_rel_err"]) <= RTOL, r


def test_simval_reuses_fig5b(shared):
    """--from-fig5b compares against a finished fig5b run instead of running the systems again."""
    if not (shared / "fig5b" / "requests.csv").exists():
        pytest.skip("needs test_fig5b_quick's output")
    out = shared / "simval-reuse"
    run_experiment("simval", out, shared / "weights", "--from-fig5b", str(shared / "fig5b"), timeout=120)
    assert len(rows(out / "comparison.csv")) == 9
    assert "reused from" in (out / "summary.txt").read_text()
