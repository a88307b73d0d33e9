"""The experiments' ``--cluster`` mode: jobs on a cluster of network namespaces with real shaped links.

The pure parts (the compute-only device, the simulator's view of the cluster, option errors) run
anywhere; the real runs need network namespaces (``requires_cluster``) and check what the
experiments check: every output MATCHED against the serial forward, and the files marked as
cluster mode.  No wall-clock threshold: the simulator's 10 % target is ``simval --check``'s job.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from mpicdc.experiments import common
from mpicdc.sim.devices import compute_only, get_device
from tests.mpi_helpers import ROOT, requires_cluster, requires_mpi

CHECK_TOL = 1e-4  # what fig5b.check_job accepts (float32 GEMMs in another order than the reference)


def test_compute_only_device_keeps_the_compute_and_frees_the_link():
    dev = get_device("rpi3:compute")
    assert dev == compute_only("rpi3") and dev.name == "rpi3:compute"
    rpi3 = get_device("rpi3")
    assert dev.gemm_time(683, 2048) == rpi3.gemm_time(683, 2048)
    assert dev.transfer_time(10 ** 6) == 0.0 and rpi3.transfer_time(10 ** 6) > 0.2
    with pytest.raises(ValueError, match="unknown device 'pi9'"):
        get_device("pi9:compute")


def test_cluster_mode_sim_device_has_the_cluster_link():
    mode = common.ClusterMode("20mbit")
    dev = mode.sim_device("rpi3")
    assert dev.bandwidth_MBps == pytest.approx(2.5 * common.LINK_GOODPUT) and dev.latency_s == common.CLUSTER_LATENCY_S
    assert dev.gemm_time(100, 100, 10) == get_device("rpi3").gemm_time(100, 100, 10)
    assert mode.worker_device("rpi3") == "rpi3:compute" == mode.worker_device("rpi3:compute")
    assert common.device_rate("rpi3") == "30mbit" and common.device_rate("rpi4-eth") == "940.8mbit"


@pytest.mark.parametrize("module", ["fig1", "fig5b", "simval"])
@pytest.mark.parametrize("argv, message", [
    (["--rate", "20mbit"], "--rate applies only with --cluster"),
    (["--cluster", "--hostfile", "h"], "--hostfile does not apply"),
    (["--cluster", "--rate", "fast"], "--rate: link rate 'fast'"),
])
def test_cluster_options_are_checked(module, argv, message, capsys):
    import importlib
    main = importlib.import_module(f"mpicdc.experiments.{module}").main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def _cluster_namespaces() -> set:
    from mpicdc.cluster.netns import list_netns
    return {ns for ns in list_netns() if re.match(r"x\d+-", ns)}  # run_cluster_job's prefixes


def _run(module: str, args: list, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    return subprocess.run([sys.executable, "-m", f"mpicdc.experiments.{module}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@requires_mpi
@requires_cluster
@pytest.mark.mpi
def test_fig1_on_the_cluster_matches_the_reference(tmp_path):
    before = _cluster_namespaces()
    out = tmp_path / "fig1"
    done = _run("fig1", ["--cluster", "--requests", "8", "--sim-requests", "300", "--out", str(out),
                         "--weights-dir", str(tmp_path / "weights")], timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert settings["mode"] == "cluster" and settings["cluster"]["rate"] == "30mbit"
    assert settings["worker_device"] == "rpi3-paper:compute"
    mpi = next(r for r in common.read_csv(out / "fractions.csv") if r["source"] == "mpi")
    assert int(mpi["replies"]) == 3 * 8
    assert float(mpi["worst_check_rel_err"]) <= CHECK_TOL
    # c is the compute of a 683-row block plus the transfers at 30 Mbit/s' goodput, not the device's 2 ms latency
    c = float(mpi["c_ms"]) / 1e3
    dev = get_device("rpi3-paper")
    link = 3.75e6 * common.LINK_GOODPUT
    assert c == pytest.approx(dev.gemm_time(683, 2048) + (4 * 2048 + 4 * 683) / link + 2e-5, rel=1e-3)
    assert "namespace cluster, 30mbit links" in (out / "summary.txt").read_text()
    assert (out / "fig1.png").stat().st_size > 0
    assert _cluster_namespaces() <= before, "namespaces left behind"


@requires_mpi
@requires_cluster
@pytest.mark.mpi
@pytest.mark.slow
def test_fig5b_and_simval_on_the_cluster(tmp_path):
    """Fig. 5b's three systems (AlexNet, 2 requests each) on 1 Gbit/s clusters, every output MATCHED;
    then simval on those requests (the simulator only): its table has every system and metric."""
    before = _cluster_namespaces()
    out, weights = tmp_path / "fig5b", str(tmp_path / "weights")
    done = _run("fig5b", ["--cluster", "--rate", "1gbit", "--requests", "2", "--sim-requests", "200",
                          "--no-sensitivity", "--out", str(out), "--weights-dir", weights], timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert settings["mode"] == "cluster" and settings["cluster"]["rate"] == "1gbit"
    assert settings["sim_config"]["link"] == "fair"
    stats = [r for r in common.read_csv(out / "stats.csv") if r["source"] == "emulated"]
    assert {r["system"] for r in stats} == {"uncoded", "2MR+1", "CDC+1"}
    for r in stats:
        assert int(r["ok"]) == int(r["requests"]) == 2, r
        assert float(r["worst_check_rel_err"]) <= CHECK_TOL, r
    assert "every link shaped to 1gbit" in (out / "summary.txt").read_text()
    assert _cluster_namespaces() <= before, "namespaces left behind"

    sv = tmp_path / "simval"
    done = _run("simval", ["--cluster", "--rate", "1gbit", "--from-fig5b", str(out), "--sim-requests", "2000",
                           "--out", str(sv)], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = common.read_csv(sv / "comparison.csv")
    assert {(r["system"], r["metric"]) for r in rows} == {(s, m) for s in ("uncoded", "2MR+1", "CDC+1")
                                                          for m in ("mean", "p95", "p99")}
    assert all(math.isfinite(float(r["sim_ovh_ms"])) and float(r["emulated_ms"]) > 0 for r in rows)
    assert json.loads((sv / "settings.json").read_text())["mode"] == "cluster"
    # the emulated requests of another mode are refused
    done = _run("simval", ["--from-fig5b", str(out), "--sim-requests", "2000", "--out", str(sv)], timeout=120)
    assert done.returncode != 0 and "other settings" in done.stderr


def test_recovery_plot_and_cells_say_what_happened(tmp_path):
    """recovery --cluster's table cells and plot: a lost run, a relaunch, and a run with no request hit."""
    pytest.importorskip("matplotlib")
    from mpicdc.experiments.cluster_recovery import cell, plot

    base = {"requests": 20, "detect_s": 2.1, "runtime_ended_s": None, "median_ms": 900.0, "trial": 0}
    rows = [{**base, "fault": "power_off", "system": "cdc-head", "answered": 20, "hit_request": 6,
             "hit_in_job": 1, "hit_ms": 950.0, "hit_over_median": 1.06},
            {**base, "fault": "power_off", "system": "relaunch", "answered": 20, "hit_request": 6,
             "hit_in_job": 0, "hit_ms": 14300.0, "hit_over_median": 15.9},
            {**base, "fault": "loud_death", "system": "cdc-device", "answered": 5, "hit_request": 5,
             "hit_in_job": 0, "hit_ms": None, "hit_over_median": None, "detect_s": None, "runtime_ended_s": -0.1},
            {**base, "fault": "loud_death", "system": "cdc-head", "answered": 20, "hit_request": None,
             "hit_in_job": 0, "hit_ms": None, "hit_over_median": None, "detect_s": -0.01}]
    assert cell(rows[0]) == "1.06x (950 ms), 20/20, det 2.10 s"
    assert cell(rows[1]).startswith("late 14.30 s")
    assert cell(rows[2]) == "request 5 never answered, 5/20, det - (runtime ended the job -0.10 s)"
    assert cell(rows[3]) == "no request in flight, 20/20, det -0.01 s"
    plot(tmp_path / "r.png", rows, "test")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
