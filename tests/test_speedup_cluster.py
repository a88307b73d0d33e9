"""``bench speedup --cluster``: the measured speedup on the namespace cluster, and its pieces without MPI.

The cluster test runs the real thing on the tiny model (head + 4 + 1 devices at 100 Mbit/s, one
measured request per run, every output checked against the serial forward by ``run --check``);
it asserts what the run produced and the JSON's fields, never how fast it was.
"""
from __future__ import annotations

import json
import math
import random

import pytest
from mpi_helpers import requires_cluster, requires_mpi

from mpicdc.bench import speedup, speedup_cluster
from mpicdc.cluster.netns import list_links, list_netns
from mpicdc.core.models import get_model

FIELDS = {"mode", "model", "link", "plan", "wire", "ranks", "split", "requests", "median_s", "p99_s",
          "vs_one_device", "predicted_s", "predicted_vs_one_device", "max_check_rel_err", "matched",
          "worker_compute_fraction"}


def test_float16_is_predicted_faster_than_float32_for_the_even_plan_and_equal_on_one_device():
    model = get_model("alexnet")
    plans = speedup_cluster.plans(model, 4, "sum", "rpi3", "100mbit")
    f32, f16 = (speedup_cluster.predicted(model, plans["even"], "rpi3", "100mbit", w) for w in ("float32", "float16"))
    assert f16 < f32
    one = [speedup_cluster.predicted(model, plans["one"], "rpi3", "100mbit", w) for w in ("float32", "float16")]
    assert one[0] == pytest.approx(one[1])


def test_latency_stats_drop_the_warm_up_and_give_p99_only_from_enough_requests():
    def job(n, code=0):
        return {"_returncode": code, "summary": {},
                "requests": [{"ok": True, "latency_ms": 1000.0 * (i + 1), "check_rel_err": 1e-7} for i in range(n)]}
    few = speedup_cluster.latency_stats(job(4))
    assert few["requests"] == 3 and few["median_s"] == 3.0 and few["p99_s"] is None and few["matched"]
    many = speedup_cluster.latency_stats(job(speedup_cluster.P99_MIN_REQUESTS + 1))
    assert many["p99_s"] == pytest.approx(20.81)
    assert not speedup_cluster.latency_stats(job(4, code=1))["matched"]


@pytest.mark.parametrize("args, says", [(["--requests", "0"], "--requests must be >= 1"),
                                        (["--plans", "evn"], "--plans 'evn': choose from even, auto"),
                                        (["--wires", "float8"], "--wires 'float8': choose from float32, float16")])
def test_bad_options_are_refused_before_anything_runs(capsys, args, says):
    with pytest.raises(SystemExit) as exc:
        speedup.main(["--cluster", *args])
    assert exc.value.code == 2 and says in capsys.readouterr().err


@requires_mpi
@requires_cluster
@pytest.mark.mpi
@pytest.mark.cluster
def test_cluster_mode_runs_every_plan_matches_the_serial_forward_and_writes_the_fields(tmp_path, capsys):
    prefix = f"tsc{random.randrange(10 ** 6)}"
    out = tmp_path / "speedup.json"
    code = speedup.main(["--cluster", "--models", "tiny", "--links", "100mbit", "--requests", "1", "--plans", "even",
                         "--weights-dir", str(tmp_path / "weights"), "--output", str(out), "--prefix", prefix])
    text = capsys.readouterr().out
    assert code == 0, text
    rows = json.loads(out.read_text())["cluster"]
    assert [(r["plan"], r["wire"]) for r in rows] == [("one", "float32"), ("even", "float32"), ("even", "float16")]
    for r in rows:
        assert FIELDS <= set(r), sorted(FIELDS - set(r))
        assert r["mode"] == "cluster" and r["matched"] and r["requests"] == 1
        assert r["max_check_rel_err"] is not None and r["max_check_rel_err"] < (1e-2 if r["wire"] == "float16" else 1e-4)
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0 and r["predicted_s"] > 0
    assert {r["ranks"] for r in rows} == {1, 6}
    assert text.count("cluster tiny") == len(rows) and "matched" in text
    assert not [ns for ns in list_netns() if ns.startswith(prefix + "-")]
    assert not [link for link in list_links() if link.startswith(prefix)]


def test_the_frontier_on_ranks_compares_uncoded_mds_and_replication_with_equal_mean_delays():
    from mpicdc.bench import frontier_ranks
    from mpicdc.core.faults import parse_delay

    model = get_model(frontier_ranks.MODEL)
    got = [(name, plan.code, plan.world_size) for name, plan in frontier_ranks.systems(model)]
    assert got == [("uncoded", "none", 5)] + [(f"{kind} +{r}", code, 5 + r) for r in (1, 2, 3)
                                              for kind, code in (("MDS", "mds"), ("replication", "replication"))]
    (_, wifi), (_, pareto) = frontier_ranks.delays("rpi3")
    assert parse_delay(pareto).mean() == pytest.approx(parse_delay(wifi).mean(), rel=1e-5)
