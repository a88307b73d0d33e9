"""16-bit wire formats (``--wire float16|bfloat16``) and the one-device job (``--workers 0``).

Conversions are checked against independent references (numpy's float16 cast, PyTorch's
bfloat16 cast); the master and worker loops run over the in-process fake network with real
shards (as in test_protocol.py); the end-to-end jobs run under real ``mpiexec``.

Tolerance of a wire run against the float32 reference: :func:`mpicdc.core.wirefmt.check_tolerance`,
``sum over distributed layers of (2 n + 1) u`` (input rounded once, a reply once, a block
decoded from ``n + 1`` rounded replies ``2 n u``), on top of float32's ``1e-4``.  Against the
serial emulation of the same format (:func:`~mpicdc.core.wirefmt.wire_forward`, fault free) the
only differences are the split GEMMs' float32 rounding, which can move a value across a 16-bit
rounding boundary: at most one unit ``u`` per value and layer, so ``L u`` with ``L`` layers.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi_helpers import requires_mpi, run_job
from test_protocol import cluster  # noqa: F401 - cluster is a fixture

from mpicdc import store
from mpicdc.core.kernels import default_input, forward
from mpicdc.core.models import get_model
from mpicdc.core.plan import make_plan
from mpicdc.core.random_weights import init_weights
from mpicdc.core.wirefmt import (
    FORMATS,
    WireRangeError,
    check_tolerance,
    get_format,
    round_trip,
    wire_forward,
)
from mpicdc.runtime import wire

HALF = ("float16", "bfloat16")


# ---------------------------------------------------------------- conversions

def test_bfloat16_rounds_to_nearest_even_like_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-30, 30, 200_000)).astype(np.float32)
    # ties: the low 16 bits exactly 0x8000, with even and odd kept parts; subnormals; signed zeros
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x00008000, 0x00018000], dtype=np.uint32).view(np.float32)
    x = np.concatenate([x, ties, np.float32([0.0, -0.0, 1e-40, -1e-45, 3.38e38])])
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(round_trip(x, "bfloat16").view(np.uint32), want.view(np.uint32))


def test_float16_is_numpys_cast_and_errs_within_its_roundoff():
    x = np.random.default_rng(2).uniform(-60000, 60000, 100_000).astype(np.float32)
    got = round_trip(x, "float16")
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    for name in HALF:
        u = get_format(name).roundoff
        assert np.all(np.abs(round_trip(x, name) - x) <= u * np.abs(x))


@pytest.mark.parametrize("name,value", [("float16", 65520.0), ("float16", -1e5), ("bfloat16", 3.4e38)])
def test_a_finite_value_beyond_the_range_is_an_error_not_inf(name, value):
    x = np.array([1.0, value, 2.0], dtype=np.float32)
    with pytest.raises(WireRangeError, match=f"exceed the {name} wire format's range"):
        round_trip(x, name)


@pytest.mark.parametrize("name", HALF)
def test_non_finite_values_stay_non_finite_and_are_seen_without_decoding(name):
    x = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    back = round_trip(x, name)
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf and back[3] == 1.0
    fmt = get_format(name)
    buf = wire.message(wire.Header(wire.REPLY, 0, 0, 0, x.shape, wire=fmt.code), x)
    assert not wire.payload_finite(buf)
    ok = wire.message(wire.Header(wire.REPLY, 0, 0, 0, (3,), wire=fmt.code), np.float32([1, -2, 3]))
    assert wire.payload_finite(ok)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_the_header_names_the_format_and_payload_decodes_it(fmt):
    x = np.random.default_rng(3).standard_normal((3, 5, 7)).astype(np.float32)
    buf = wire.message(wire.Header(wire.JOB, 4, 2, -1, x.shape, wire=fmt.code), x)
    assert buf.nbytes == wire.HEADER_BYTES + fmt.itemsize * x.size == wire.payload_bytes(x.shape, fmt.code)
    head = wire.Header.unpack(buf)
    assert head.wire == fmt.code and head.format is fmt
    np.testing.assert_array_equal(wire.payload(buf, head.shape), round_trip(x, fmt))
    assert wire.reply_buffer(3, 35, fmt.code).nbytes == buf.nbytes


def test_an_unknown_format_code_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="code 7 is unknown.*float32, float16, bfloat16"):
        _ = wire.Header(wire.JOB, wire=7).format
    with pytest.raises(ValueError, match="use float32, float16, bfloat16"):
        get_format("float8")


# ---------------------------------------------------------------- master and workers over the fake network

@pytest.fixture(scope="module")
def tiny_sum(tmp_path_factory):
    return store.prepare_zoo(tmp_path_factory.mktemp("shards"), "tiny", 4, 1, "sum")


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def tiny_mds(tmp_path_factory):
    return store.prepare_zoo(tmp_path_factory.mktemp("shards"), "tiny", 3, 2, "mds")


@pytest.mark.parametrize("code,lost", [("sum", [2]), ("mds", [1, 3])])
@pytest.mark.parametrize("name", HALF)
def test_half_wire_matches_its_emulation_and_the_reference_with_lost_ranks(request, cluster, name, code,  # noqa: F811
                                                                          lost):
    c = cluster(request.getfixturevalue(f"tiny_{code}"), wire_format=name)
    plan, model = c.manifest.plan, c.manifest.model
    weights = store.reference_weights(c.manifest)
    emulated = wire_forward(model, weights, c.x, name, [lp.layer for lp in plan.layers])
    u = get_format(name).roundoff
    first = c.master.infer(c.x)
    assert first.ok, first.error
    assert _rel(first.output, emulated) <= len(plan.layers) * u
    for rank in lost:
        c.kill(rank)
    rtol = (1e-4 if code == "sum" else 1e-3) + check_tolerance(plan, name)  # what run --check allows
    for _ in range(2):
        r = c.master.infer(c.x)
        assert r.ok, r.error
        assert any(len(rec.decoded_blocks) == len(lost) for rec in r.layers)
        assert _rel(r.output, c.reference) <= rtol
        assert not r.integrity  # the format's rounding is no integrity alarm
    assert "bad" not in {a.status for a in c.master.arrivals}
    c.close()


def _rewrite(rank, kind, change):
    """A network rule rewriting the headers of ``kind`` messages from ``rank`` (replies) or to it (jobs)."""
    def rule(source, dest, tag, message):
        mine = (source == rank and dest == 0 and tag >= 16) if kind == "reply" else \
            (source == 0 and dest == rank and tag == wire.TAG_JOB)
        if mine and wire.Header.unpack(message).kind in (wire.REPLY, wire.JOB):
            altered = message.copy()
            change(wire.Header.unpack(message)).pack_into(altered)
            return [(0.0, altered)]
        return [(0.0, message)]
    return rule


def _with(head, **changes):
    fields = {k: getattr(head, k) for k in ("kind", "request", "layer", "block", "shape", "compute_s",
                                            "modeled_s", "wire")}
    return wire.Header(**{**fields, **changes})


def test_a_reply_in_another_format_of_the_same_size_is_refused(tiny_sum, cluster):  # noqa: F811
    # rank 3 claims bfloat16 for float16 bytes: same size, so only the header's format can tell
    c = cluster(tiny_sum, _rewrite(3, "reply", lambda h: _with(h, wire=2)), wire_format="float16")
    r = c.master.infer(c.x)
    assert r.ok, r.error
    assert all(3 not in rec.used for rec in r.layers) and any(3 in rec.failed for rec in r.layers)
    assert {a.status for a in c.master.arrivals if a.rank == 3 and not a.late} == {"bad"}
    assert 3 not in c.master.dead
    c.close()


@pytest.mark.parametrize("change", [lambda h: _with(h, wire=7), lambda h: _with(h, wire=0)],
                         ids=["unknown-format", "float32-header-on-float16-bytes"])
def test_a_worker_refuses_a_job_whose_format_does_not_fit_its_bytes(tiny_sum, cluster, change):  # noqa: F811
    c = cluster(tiny_sum, _rewrite(1, "job", change), wire_format="float16")
    r = c.master.infer(c.x)
    assert r.ok, r.error
    assert all(1 not in rec.used for rec in r.layers)
    assert "bad" in {a.status for a in c.master.arrivals if a.rank == 1}
    assert 1 not in c.master.dead and 1 not in c.errors
    c.close()


def test_out_of_float16_range_fails_the_request_with_the_fix(tiny_sum, cluster):  # noqa: F811
    c = cluster(tiny_sum, wire_format="float16")
    big = c.master.infer(c.x * 1e5)  # the input itself does not fit float16
    assert not big.ok and "beyond" not in big.error
    assert "exceed the float16 wire format's range" in big.error and "--wire bfloat16" in big.error
    # an input that fits, whose first layer's output does not: every worker says so, none sends inf
    scale = 0.9 * 65504 / float(np.max(np.abs(c.x)))
    r = c.master.infer(c.x * scale)
    ref = forward(c.manifest.model, store.reference_weights(c.manifest), c.x * scale)
    assert np.max(np.abs(ref)) > 0  # sanity: the reference itself is finite
    assert not r.ok, "expected the first layer's output to exceed float16's range"
    assert "beyond the float16 wire format's range (use --wire bfloat16 or float32)" in r.error
    assert {a.status for a in c.master.arrivals if a.request == r.request} == {"range"}
    fine = c.master.infer(c.x)  # the job goes on
    assert fine.ok, fine.error
    c.close()


# ---------------------------------------------------------------- one device, and real ranks

def test_a_single_device_folder_is_prepared_verified_and_loaded(tmp_path):
    model = get_model("tiny")
    folder = store.ensure_prepared(model, make_plan(model, 0, code="none"), tmp_path)
    assert folder.name == "tiny-w0-p0-none"
    manifest = store.open_manifest(folder)
    store.check_world(manifest, 1)
    assert store.verify(folder) == []
    blocks = store.load_rank(folder, 0, manifest)
    np.testing.assert_array_equal(forward(model, blocks, default_input(model)),
                                  forward(model, init_weights(model), default_input(model)))
    with pytest.raises(store.ShardError, match="prepared for 1 ranks.*launch with mpiexec -np 1"):
        store.check_world(manifest, 3)


@requires_mpi
@pytest.mark.mpi
def test_workers_0_serves_the_model_on_one_rank_equal_to_the_serial_forward(tmp_path):
    job = run_job(1, ["tiny", "--workers", "0", "--repeat", "2", "--check"], tmp_path)
    assert job.returncode == 0, job.explain()
    assert "on 1 rank: every layer on the master" in job.stdout
    model = get_model("tiny")
    ref = forward(model, init_weights(model), default_input(model))
    for r in job.results["requests"]:
        assert r["ok"] and r["layers"] == []
        np.testing.assert_array_equal(np.float32(r["output"]), ref.reshape(-1))
    assert job.results["plan"]["world_size"] == 1


@requires_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("np_ranks,args,message", [
    (2, ["--workers", "0"], ("--workers 0 serves the model on the master alone, but the job has 2 ranks: "
                             "launch it on one rank (mpirun -np 1")),
    (2, ["--workers", "3"], ("--workers 3 with code 'sum' (1 parity worker(s)) needs 5 ranks, but the job has 2: "
                             "launch with -np 5")),
    (1, [], "launch at least 3 ranks (mpirun -np 3 ...), or serve the model on this rank alone with --workers 0"),
], ids=["workers-0-on-2-ranks", "workers-3-on-2-ranks", "one-rank-without-workers-0"])
def test_a_world_size_that_does_not_fit_says_how_to_launch(tmp_path, np_ranks, args, message):
    job = run_job(np_ranks, ["tiny", *args], tmp_path, output=False)
    assert job.returncode == 2, job.explain()
    assert message in job.stderr, job.explain()


@requires_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("name", HALF)
def test_half_wire_on_real_ranks_survives_a_crash_within_the_derived_tolerance(tmp_path_factory, tmp_path, name):
    model = get_model("alexnet")
    plan = make_plan(model, 4, code="sum")
    folder = store.ensure_prepared(model, plan, tmp_path_factory.getbasetemp() / "alexnet-shards")
    job = run_job(6, ["alexnet", "--weights", str(folder), "--wire", name, "--repeat", "3", "--check", "--inject", "crash:2@1:conv3"],
                  tmp_path, timeout=300)
    assert job.returncode == 0, job.explain()
    tol = 1e-4 + check_tolerance(plan, name)
    assert f"(tolerance {tol:g})" in job.stdout, job.explain()
    reqs = job.results["requests"]
    assert all(r["ok"] and r["check_rel_err"] <= tol for r in reqs), job.explain()
    assert job.results["dead_ranks"] == [2]
    assert any(rec["decoded_blocks"] for r in reqs[1:] for rec in r["layers"])
    # fault free, request 0 is what the serial emulation of the format computes
    emulated = wire_forward(model, init_weights(model), default_input(model), name, [lp.layer for lp in plan.layers])
    u = get_format(name).roundoff
    assert _rel(np.float32(reqs[0]["output"]), emulated.reshape(-1)) <= len(plan.layers) * u
    assert "bad" not in {a["status"] for a in job.results["arrivals"]}


def test_prepare_cli_workers_0_and_its_usage_errors(tmp_path, capsys):
    from mpicdc.store.prepare_cli import main

    assert main(["tiny", "--workers", "0", "--code", "none", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "python -m mpicdc.launch -np 1 tiny --weights" in out
    manifest = store.open_manifest(tmp_path / "tiny-w0-p0-none")
    assert manifest.world_size == 1 and manifest.plan.layers == ()
    assert main(["tiny", "--workers", "0", "--parity", "1", "--out", str(tmp_path)]) == 2
    assert "--workers 0 keeps every layer on the master" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--workers", "0", "--code", "mds", "--parity", "2"], "--workers 0 runs every layer on the master"),
    (["--workers", "-1"], "--workers must be 0 (one device) or more"),
    (["--wire", "float8"], "invalid choice: 'float8'"),
    (["--master-device", "pi9"], "--master-device: unknown device 'pi9'"),
])
def test_run_usage_errors_for_the_new_options(capsys, args, message):
    from mpicdc.run import main

    assert main(["tiny", *args]) == 2
    assert message in capsys.readouterr().err
