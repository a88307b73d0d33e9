"""Device models and the discrete-event simulator, checked against closed forms."""
import itertools
import json
import math

import numpy as np
import pytest

from mpicdc.core.models import GraphBuilder, get_model
from mpicdc.core.plan import make_plan
from mpicdc.sim import (
    Decodability,
    SimConfig,
    decode_structure,
    main,
    nonlinear_work,
    simulate,
)
from mpicdc.sim.devices import (
    DEVICES,
    PAPER_FC_COMPUTE_S,
    DeviceModel,
    get_device,
    paper_wifi_delay,
    wifi_calibration,
)

# A device with round numbers: 1 GFLOP/s, 1 MB/s, 1 ms latency, no memory limit.
DEV = DeviceModel("test", gflops=1.0, bandwidth_MBps=1.0, latency_s=0.001)
K, M = 1000, 400  # dense layer input size and output rows
EXACT = dict(rtol=1e-12, atol=1e-15)


def dense_model(layers=1, k=K, m=M, tail=()):
    """``layers`` dense layers of ``m`` outputs on a ``(k,)`` input (hidden layers are m -> m)."""
    b = GraphBuilder("dense%d" % layers, (k,))
    x = "input"
    for i in range(layers):
        x = b.dense(x, m, name=f"fc{i + 1}")
        for op in tail:
            x = getattr(b, op)(x, name=f"{op}{i + 1}")
    return b.build()


def one_layer_times(n, code="sum", link="shared", d=0.0):
    """Hand-computed pieces of a one-dense-layer request on DEV (no memory roofline)."""
    rows = M / n
    send = 4 * K / 1e6                   # input bytes / bandwidth
    compute = 2 * rows * K / 1e9         # block GEMM
    reply = 4 * rows / 1e6
    lat = DEV.latency_s
    return send, compute, reply, lat


# --------------------------------------------------------------------------------------------
# devices


def test_device_roofline_and_link():
    dev = DeviceModel("x", gflops=2.0, bandwidth_MBps=10.0, latency_s=0.5, mem_GBps=1.0)
    assert dev.compute_time(4e9) == pytest.approx(2.0)
    assert dev.compute_time(4e9, 3e9) == pytest.approx(3.0)          # memory bound
    assert dev.transfer_time(20e6) == pytest.approx(2.5)
    np.testing.assert_allclose(dev.transfer_time(np.array([0, 10e6])), [0.5, 1.5])
    # 2 * 10 * 100 * 1 flops, 4 * (1000 + 100 + 10) bytes
    assert dev.gemm_time(10, 100) == pytest.approx(max(2000 / 2e9, 4440 / 1e9))
    assert dev.scaled(0.5).gflops == 1.0 and dev.scaled(0.5).mem_GBps == 0.5
    with pytest.raises(ValueError, match="gflops must be > 0"):
        DeviceModel("bad", 0, 1, 0)
    with pytest.raises(ValueError, match="unknown device 'pi9'"):
        get_device("pi9")
    assert get_device("rpi3") is DEVICES["rpi3"] and get_device(dev) is dev
    assert {"rpi3", "rpi4", "local"} <= set(DEVICES)


def test_rpi3_paper_profile_matches_paper_fc_time():
    assert DEVICES["rpi3-paper"].gemm_time(2048, 2048) == pytest.approx(PAPER_FC_COMPUTE_S)


def test_paper_wifi_delay_reproduces_both_fractions():
    c = 0.05
    model = paper_wifi_delay(c)
    # arrival = c + D: P(arrival <= 2c) = 0.34, P(arrival <= 3c) = 0.42, exactly
    assert float(model.cdf(c)) == pytest.approx(0.34, abs=1e-12)
    assert float(model.cdf(2 * c)) == pytest.approx(0.42, abs=1e-12)
    w, mean = wifi_calibration(c)
    assert w == pytest.approx(1 - 0.66 ** 2 / 0.58) and mean == pytest.approx(c / math.log(0.66 / 0.58))
    x = model.sample(np.random.default_rng(0), 200_000)
    for t, f in ((c, 0.34), (2 * c, 0.42)):
        assert abs(np.mean(x <= t) - f) < 5 * math.sqrt(f * (1 - f) / x.size)
    with pytest.raises(ValueError, match="cannot be fitted"):
        wifi_calibration(c, {2: 0.5, 3: 0.4})


# --------------------------------------------------------------------------------------------
# deterministic latency


@pytest.mark.parametrize("code", ["none", "sum"])
def test_constant_delay_gives_exact_latency_shared_link(code):
    n, d = 4, 0.0125
    model = dense_model()
    plan = make_plan(model, n, code=code)
    res = simulate(model, plan, requests=5, device=DEV, delay=f"const:{d}")
    send, compute, reply, lat = one_layer_times(n)
    # the k-th send lands at lat + k*send; replies are spaced by send > reply, so no queueing;
    # the n-th reply (the last data block) decides
    expected = lat + n * send + compute + d + reply + lat
    np.testing.assert_allclose(res.latency, expected, **EXACT)
    assert res.ok.all() and res.summary()["success_rate"] == 1.0


def test_constant_delay_gives_exact_latency_parallel_link():
    n, d = 5, 0.002
    model = dense_model()
    res = simulate(model, make_plan(model, n, code="sum"), requests=3, device=DEV, delay=f"const:{d}",
                   config=SimConfig(link="parallel"))
    send, compute, reply, lat = one_layer_times(n)
    np.testing.assert_allclose(res.latency, 2 * lat + send + compute + d + reply, **EXACT)


def test_constant_delay_gives_exact_latency_fair_link():
    """A fair link: the n + 1 sends share it, all land at lat + (n + 1) send; the replies, ready together,
    queue, so the n-th decides; with a rank known dead only n sends share it."""
    n, d = 4, 0.002
    model = dense_model()
    plan = make_plan(model, n, code="sum")
    send, compute, reply, lat = one_layer_times(n)
    res = simulate(model, plan, requests=3, device=DEV, delay=f"const:{d}", config=SimConfig(link="fair"))
    np.testing.assert_allclose(res.latency, 2 * lat + (n + 1) * send + compute + d + n * reply, **EXACT)
    res = simulate(model, plan, requests=3, device=DEV, delay=f"const:{d}", failures=[2],
                   config=SimConfig(link="fair", decode_scale=0))  # (decoding the dead rank's block: free)
    np.testing.assert_allclose(res.latency, 2 * lat + n * send + compute + d + n * reply, **EXACT)


def test_master_work_nonlinear_and_kept_layers_add_exactly():
    model = dense_model(layers=2, m=M, tail=("relu",))
    n = 4
    plan = make_plan(model, n, code="none", keep_on_master=["fc2"])
    res = simulate(model, plan, requests=2, device=DEV, config=SimConfig(link="parallel"),
                   breakdown=True)
    send, compute, reply, lat = one_layer_times(n)
    relu = DEV.compute_time(*nonlinear_work("relu", [(M,)], (M,), {}))
    fc2 = DEV.gemm_time(M, M, 1)
    np.testing.assert_allclose(res.latency, 2 * lat + send + compute + reply + 2 * relu + fc2, **EXACT)
    means = res.breakdown_means()
    assert means["fc2"] == pytest.approx(fc2) and means["relu1"] == pytest.approx(relu)


def test_dead_rank_costs_decode_time_exactly():
    n = 4
    model = dense_model()
    plan = make_plan(model, n, code="sum")
    send, compute, reply, lat = one_layer_times(n)
    E = plan.layers[0].block_rows  # block elements (spatial size 1)
    decode = DEV.compute_time(2 * n * E, 4 * (n + 1) * E)
    par = simulate(model, plan, requests=3, device=DEV, failures=[2], config=SimConfig(link="parallel"))
    np.testing.assert_allclose(par.latency, 2 * lat + send + compute + reply + decode, **EXACT)
    # shared link: the master skips the dead rank, so the parity input is the n-th send
    sh = simulate(model, plan, requests=3, device=DEV, failures=[2], breakdown=True)
    np.testing.assert_allclose(sh.latency, lat + n * send + compute + reply + lat + decode, **EXACT)
    assert np.all(sh.layer_missing["fc1"] == 1)


# --------------------------------------------------------------------------------------------
# straggler statistics against order statistics of exponentials


def _mean_close(x, expected, sigmas=5):
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert abs(x.mean() - expected) < sigmas * se, (x.mean(), expected, se)


@pytest.mark.parametrize("code, parity, order_stat", [
    ("none", None, lambda n, r: sum(1 / i for i in range(1, n + 1))),           # max of n
    ("sum", None, lambda n, r: sum(1 / i for i in range(2, n + 2))),            # n-th of n+1
    ("mds", 2, lambda n, r: sum(1 / i for i in range(r + 1, n + r + 1))),       # n-th of n+r
])
def test_exponential_stragglers_match_order_statistics(code, parity, order_stat):
    n, mean = 8, 0.05
    model = dense_model()
    plan = make_plan(model, n, parity, code)
    config = SimConfig(link="parallel", decode_scale=0.0)
    base = simulate(model, plan, requests=1, device=DEV, config=config).latency[0]
    res = simulate(model, plan, requests=20_000, device=DEV, delay=f"shexp:0,{mean}", config=config, seed=3)
    _mean_close(res.latency - base, mean * order_stat(n, plan.parity))


# --------------------------------------------------------------------------------------------
# failures


def test_sum_parity_survives_any_single_dead_rank_and_fails_beyond():
    n = 5
    model = dense_model(layers=2)
    plan = make_plan(model, n, code="sum")
    for rank in range(1, n + 2):
        assert simulate(model, plan, requests=50, device=DEV, failures=[rank]).ok.all()
    res = simulate(model, plan, requests=50, device=DEV, failures=[1, 6])
    assert not res.ok.any() and np.isnan(res.latency).all()
    assert set(res.failed_layer) == {"fc1"}
    assert math.isnan(res.summary()["mean"]) and res.summary()["success_rate"] == 0.0


def test_random_failures_match_binomial_success_rate():
    n, p, R = 6, 0.05, 20_000
    model = dense_model()
    for code, ok_prob in (("none", (1 - p) ** n),
                          ("sum", (1 - p) ** (n + 1) + (n + 1) * p * (1 - p) ** n)):
        res = simulate(model, make_plan(model, n, code=code), requests=R, device=DEV, fail_prob=p, seed=7)
        se = math.sqrt(ok_prob * (1 - ok_prob) / R)
        assert abs(res.ok.mean() - ok_prob) < 5 * se, (code, res.ok.mean(), ok_prob)


def test_crash_and_hang_injections_fire_at_their_request_and_layer():
    model = dense_model(layers=3)
    plan = make_plan(model, 3, code="none")
    res = simulate(model, plan, requests=8, device=DEV, injections=["crash:2@5"])
    assert res.ok.tolist() == [True] * 5 + [False] * 3
    assert list(res.failed_layer[5:]) == ["fc1"] * 3
    res = simulate(model, plan, requests=6, device=DEV, injections=["hang:1@3:fc2"])
    assert res.ok.tolist() == [True] * 3 + [False] * 3
    assert list(res.failed_layer[3:]) == ["fc2", "fc1", "fc1"]
    coded = make_plan(model, 3, code="sum")
    assert simulate(model, coded, requests=8, device=DEV, injections=["crash:2@5"]).ok.all()
    res = simulate(model, coded, requests=8, device=DEV, injections=["crash:2@5", "hang:3@2"])
    assert res.ok.tolist() == [True] * 5 + [False] * 3  # two losses from request 5 on
    with pytest.raises(ValueError, match="outside the workers"):
        simulate(model, coded, requests=1, device=DEV, injections=["crash:9@0"])
    with pytest.raises(ValueError, match="unknown layer"):
        simulate(model, coded, requests=1, device=DEV, injections=["crash:1@0:fc9"])


def test_injected_delay_is_decoded_around_with_sum_and_waited_for_without():
    model = dense_model()
    n, slow = 4, 0.5
    config = SimConfig(link="parallel")
    send, compute, reply, lat = one_layer_times(n)
    base = 2 * lat + send + compute + reply
    uncoded = simulate(model, make_plan(model, n, code="none"), requests=2, device=DEV,
                       injections=[f"delay:2:const:{slow}"], config=config)
    np.testing.assert_allclose(uncoded.latency, base + slow, **EXACT)
    coded_plan = make_plan(model, n, code="sum")
    E = coded_plan.layers[0].block_rows
    coded = simulate(model, coded_plan, requests=2, device=DEV, injections=[f"delay:2:const:{slow}"],
                     config=config)
    np.testing.assert_allclose(coded.latency, base + DEV.compute_time(2 * n * E, 4 * (n + 1) * E), **EXACT)


def test_busy_worker_skips_stale_job():
    # Rank 1 is 10x slow.  Layers 1-2 decode without it; when layer 3 arrives, rank 1 is still on
    # layer 1 and has not started layer 2, so it skips layer 2 and starts layer 3 at 10c.  Rank 2
    # hangs at layer 3, so layer 3 needs rank 1's reply: at 20c (30c without the skip).
    model = dense_model(layers=3, k=M)
    plan = make_plan(model, 2, code="sum")
    fast = DeviceModel("fast-link", gflops=1.0, bandwidth_MBps=1e12, latency_s=0.0)
    c = fast.gemm_time(M / 2, M)
    res = simulate(model, plan, requests=1, device=fast, slowdown={1: 10.0}, injections=["hang:2@0:fc3"],
                   config=SimConfig(link="parallel", decode_scale=0.0))
    assert res.latency[0] == pytest.approx(20 * c, rel=1e-12)


def test_slowdown_validation():
    model = dense_model()
    plan = make_plan(model, 2, code="sum")
    with pytest.raises(ValueError, match="outside the workers"):
        simulate(model, plan, requests=1, device=DEV, slowdown={7: 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        simulate(model, plan, requests=1, device=DEV, slowdown={1: 0.0})
    with pytest.raises(ValueError, match="plan is for model"):
        simulate(get_model("lenet"), plan, requests=1, device=DEV)


# --------------------------------------------------------------------------------------------
# decodability rules against the codes themselves


@pytest.mark.parametrize("code, n, parity", [
    ("none", 4, None), ("sum", 5, None), ("groups:2", 6, None), ("groups:3", 6, None),
    ("replication", 3, 3), ("replication", 4, 2), ("mds", 4, 2), ("mds", 8, 3),
])
def test_closed_form_rule_agrees_with_code_on_every_pattern(code, n, parity):
    lp = make_plan(dense_model(), n, parity, code).layers[0]
    obj = lp.code_obj
    rule = decode_structure(obj)
    m = lp.n + lp.r
    for size in range(m + 1):
        for received in itertools.combinations(range(m), size):
            assert rule.decodable(received) == bool(obj.decodable(received)), (code, received)
    if code in ("none", "sum") or obj.tolerance == lp.r:
        assert rule.kind in ("all", "kofn")
    if code in ("groups:2", "groups:3", "replication"):
        assert rule.kind == "components"
    # the vectorised time equals the prefix search of the generic rule
    rng = np.random.default_rng(0)
    arrival = rng.exponential(1.0, (300, m))
    arrival[rng.random((300, m)) < 0.2] = np.inf
    generic = Decodability("generic", lp.n, m, code=obj)
    np.testing.assert_array_equal(rule.time(arrival), generic.time(arrival))


# --------------------------------------------------------------------------------------------
# scale, reproducibility, command line


def test_thousand_devices_ten_thousand_requests():
    n, p, R = 999, 0.0005, 10_000
    model = dense_model(k=256, m=4000)
    plan = make_plan(model, n, code="sum")
    assert plan.world_size == 1001
    res = simulate(model, plan, requests=R, device="rpi4", delay="shexp:0.001,0.01", fail_prob=p, seed=11)
    assert res.latency.shape == (R,) and res.ok.shape == (R,)
    ok_prob = (1 - p) ** (n + 1) + (n + 1) * p * (1 - p) ** n
    assert abs(res.ok.mean() - ok_prob) < 5 * math.sqrt(ok_prob * (1 - ok_prob) / R)
    assert np.all(np.isfinite(res.latency[res.ok]))


def test_seed_reproduces_and_differs():
    model = dense_model(layers=2)
    plan = make_plan(model, 4, code="sum")
    kw = dict(requests=3000, device="rpi3", delay="wifi:0.05", fail_prob=0.02)
    a = simulate(model, plan, seed=5, **kw)
    b = simulate(model, plan, seed=5, **kw)
    c = simulate(model, plan, seed=6, **kw)
    np.testing.assert_array_equal(a.latency, b.latency)
    np.testing.assert_array_equal(a.ok, b.ok)
    assert not np.array_equal(np.nan_to_num(a.latency), np.nan_to_num(c.latency))


def test_zoo_model_runs_with_every_code():
    model = get_model("alexnet")
    for code, parity in (("none", None), ("sum", None), ("groups:2", None), ("replication", 4), ("mds", 2)):
        res = simulate(model, make_plan(model, 4, parity, code), requests=200, device="rpi3",
                       delay="wifi:0.05", seed=1)
        s = res.summary()
        assert s["success_rate"] == 1.0 and 0 < s["p50"] <= s["p95"] <= s["p99"] <= s["max"]


def test_cli_summary_and_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["lenet", "--workers", "3", "--code", "sum", "--requests", "500", "--delay", "shexp:0,0.01",
                 "--fail", "2", "--inject", "delay:1:const:0.1", "--breakdown", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "success 100.00%" in text and "p99" in text
    data = json.loads(out.read_text())
    assert data["summary"]["requests"] == 500 and data["meta"]["failures"] == [2]
    assert "fc1" in data["layer_means_s"]
    assert main(["lenet", "--workers", "3", "--code", "sum", "--delay", "gamma:1"]) == 2
    assert "bad delay spec" in capsys.readouterr().err


def test_cli_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for fragment in ("delay model specs", "injection specs", "examples:", "rpi3", "--fail-prob"):
        assert fragment in text
