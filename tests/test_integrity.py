"""Checking replies against the code: wrong values flagged, located, corrected and quarantined.

In-process cases run the real master and worker loops over the fake network
(:mod:`fake_channel`, the ``Cluster`` of test_protocol.py) with real ``tiny`` shards and the
worker's own ``corrupt`` injection; outputs are compared with the serial reference.  One case
runs a real mpiexec job; one alters a parity shard file behind ``prepare --verify``'s back.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from mpi_helpers import requires_mpi, run_job
from test_protocol import RTOL, cluster, replies_from  # noqa: F401 - cluster is a fixture

from mpicdc import store
from mpicdc.bench.integrity import layer_blocks
from mpicdc.core import integrity
from mpicdc.core.faults import CORRUPTION_KINDS, parse_injection, parse_injections
from mpicdc.core.kernels import forward
from mpicdc.core.models import get_model
from mpicdc.core.random_weights import init_weights

CODES = [("sum", 1), ("groups:2", 2), ("mds", 2), ("mds", 3)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    made = {}

    def get(code, r, n=4):
        if (code, r) not in made:
            made[code, r] = store.prepare_zoo(tmp_path_factory.mktemp("shards"), "tiny", n, r, code)
        return made[code, r]
    return get


def _rel_err(c, result):
    return np.max(np.abs(result.output - c.reference)) / np.max(np.abs(c.reference))


def test_corrupt_injection_grammar():
    inj = parse_injection("corrupt:2@1")
    assert (inj.kind, inj.ranks, inj.request, inj.layer, inj.corruption) == ("corrupt", (2,), 1, None, "bitflip")
    inj = parse_injection("corrupt:1-3@0:fc6=noise")
    assert (inj.ranks, inj.layer, inj.corruption) == ((1, 2, 3), "fc6", "noise")
    with pytest.raises(ValueError, match="(?s)unknown corruption .flip.*injection specs"):
        parse_injection("corrupt:2@1=flip")
    with pytest.raises(ValueError, match=r"expected corrupt:RANKS@REQ\[:LAYER\]"):
        parse_injection("corrupt:2")
    injections = parse_injections(["corrupt:2@1:fc6=const"])
    assert injections.corruption_for(2, 1, "fc6").corruption == "const"
    assert injections.corruption_for(2, 1, "fc7") is None and injections.corruption_for(2, 2, "fc6") is None
    assert injections.action_for(2, 1, "fc6", True) is None and injections.failures() == []


@pytest.mark.parametrize("kind", CORRUPTION_KINDS)
def test_each_corruption_is_flagged_under_sum_parity_in_strict_mode(shards, cluster, kind):  # noqa: F811
    c = cluster(shards("sum", 1), injections=parse_injections([f"corrupt:2@1={kind}"]), integrity="strict")
    before, hit, after = (c.master.infer(c.x) for _ in range(3))
    assert before.ok and not before.flagged and _rel_err(c, before) <= RTOL
    assert hit.ok and hit.flagged, "a corrupted request must be flagged"
    assert {f.rank for f in hit.integrity} == {None} and not any(f.corrected for f in hit.integrity)
    assert all(f.residual > f.tolerance for f in hit.integrity)
    assert all(rec.checks == 1 for rec in hit.layers)  # strict waited for all 5 blocks every layer
    assert after.ok and not after.flagged and _rel_err(c, after) <= RTOL
    assert not c.master.quarantined  # one sum parity cannot say which rank was wrong
    c.close()


def test_mds_strict_locates_corrects_and_quarantines(shards, cluster):  # noqa: F811
    c = cluster(shards("mds", 2), injections=parse_injections(["corrupt:2@1=scale"]), integrity="strict")
    assert not c.infer().flagged
    hit = c.infer()  # compared with the reference inside: the wrong block was decoded around
    assert hit.ok and hit.flagged
    first = hit.integrity[0]
    assert first.rank == 2 and first.corrected and not first.late
    assert c.master.quarantined == {2}
    jobs = sum(1 for m in c.data.log if m[1] == 2 and m[2] == 0)
    for _ in range(2):
        r = c.infer()
        assert r.ok and not r.flagged
        assert all(2 not in rec.used for rec in r.layers)
    assert sum(1 for m in c.data.log if m[1] == 2 and m[2] == 0) == jobs, "a quarantined rank gets no work"
    c.close()


def test_opportunistic_adds_no_wait_and_a_late_reply_flags_the_request(shards, cluster):  # noqa: F811
    # parity ranks answer 50 ms late: every layer decodes from the 4 data replies, the first decodable set
    late = replies_from(5, lambda m: [(0.05, m)])
    later = replies_from(6, lambda m: [(0.08, m)])
    c = cluster(shards("mds", 2), lambda s, d, t, m: (late if s == 5 else later)(s, d, t, m),
                injections=parse_injections(["corrupt:2@0=scale"]), integrity="opportunistic")
    r = c.master.infer(c.x)
    assert r.ok
    assert all(len(rec.used) == 4 and rec.checks == 0 and rec.check_wait_s == 0 for rec in r.layers)
    c.master.drain(2.0)
    assert r.flagged, "the late parity replies must reveal the corrupted request"
    assert all(f.late and not f.corrected for f in r.integrity)
    assert any(f.rank == 2 for f in r.integrity) and c.master.quarantined == {2}
    c.close()


@pytest.mark.parametrize("code, r", CODES, ids=[f"{c}-r{r}" for c, r in CODES])
def test_no_false_alarms_over_clean_requests(shards, cluster, code, r):  # noqa: F811
    c = cluster(shards(code, r), integrity="strict")
    rng = np.random.default_rng(1)
    weights = store.reference_weights(c.manifest)
    for _ in range(25):
        x = rng.standard_normal(c.manifest.model.input_shape).astype(np.float32)
        result = c.master.infer(x)
        ref = forward(c.manifest.model, weights, x)
        assert result.ok and not result.flagged, result.integrity
        assert all(rec.checks >= 1 for rec in result.layers)
        assert np.max(np.abs(result.output - ref)) <= RTOL * np.max(np.abs(ref))
    c.close()


def test_no_false_alarms_on_alexnet_layers_with_every_code():
    """alexnet's layers (K up to 9216) through the workers' kernel, checked as the master does."""
    model = get_model("alexnet")
    weights = init_weights(model)
    x = np.random.default_rng(3).random(model.input_shape, dtype=np.float32)
    checked = 0
    for layer, K, code, replies in layer_blocks(model, weights, x, CODES):
        for drop in [None, *replies]:
            verdict = integrity.check(code, {k: v for k, v in replies.items() if k != drop}, K)
            assert verdict.ok, (layer.name, code.spec, drop, verdict)
            checked += verdict.checks > 0
    assert checked >= 100


def test_prepare_verify_catches_parity_that_does_not_encode_the_data(tmp_path):
    directory = store.prepare_zoo(tmp_path / "shards", "tiny", 3, 1, "sum")
    assert store.verify(directory) == []
    lp = store.open_manifest(directory).plan.layers[0]
    _alter_parity(directory, lp.ranks[-1], lp.layer)
    problems = store.verify(directory)
    assert len(problems) == 1 and f"layer {lp.layer!r}: parity block 3 does not encode the data" in problems[0]


def _alter_parity(directory, rank, layer):
    """Change one parity weight, then store its checksums again the way prepare does: the dataset's
    sha256 attribute over its bytes, the file's sha256 and size in the manifest's /shards."""
    import hashlib

    from mpicdc.store.shards import MANIFEST_NAME, _file_sha256, shard_name
    path = directory / shard_name(rank)
    with h5py.File(path, "r+") as f:
        name = next(k for k in _datasets(f) if k.endswith("/W") and "parity" in k and layer in k)
        W = f[name][...]
        W[0, 0] += np.float32(0.5) * (1 + abs(W[0, 0]))
        f[name][...] = W
        f[name].attrs["sha256"] = hashlib.sha256(memoryview(np.ascontiguousarray(W)).cast("B")).hexdigest()
    with h5py.File(directory / MANIFEST_NAME, "r+") as m:
        m["shards/sha256"][rank] = _file_sha256(path)
        m["shards/bytes"][rank] = path.stat().st_size


def _datasets(f):
    found = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    return found


@requires_mpi
@pytest.mark.mpi
@pytest.mark.slow
def test_bench_strict_measures_every_mode_on_real_ranks(capsys):
    """``bench strict`` runs off/opportunistic/strict jobs and reports strict's own check wait."""
    from mpicdc.bench import strict

    assert strict.main(["--model", "tiny", "--rounds", "1", "--requests", "3"]) == 0
    out = capsys.readouterr().out
    for mode in strict.MODES:
        assert f"\n{mode} " in out, out
    assert "strict mode waited" in out and "% of its request time" in out, out


@requires_mpi
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["strict", "opportunistic"])
@pytest.mark.parametrize("code, r", [("sum", 1), ("mds", 2)])
@pytest.mark.parametrize("kind", CORRUPTION_KINDS)
def test_every_corruption_kind_code_and_mode_on_real_ranks(tmp_path, kind, code, r, mode):
    """Rank 2's replies corrupted in request 1 (every layer): the request is flagged in both modes; under
    MDS r=2 in strict mode the wrong rank is located, decoded around (output matches the reference)
    and quarantined; a sum parity cannot locate it and says the output was not corrected."""
    shards = store.prepare_zoo(tmp_path / "shards", "tiny", 3, r, code)
    job = run_job(4 + r, ["tiny", "--weights", str(shards), "--integrity", mode, "--inject",
                          f"corrupt:2@1={kind}", "--repeat", "3", "--check"], tmp_path, timeout=120)
    text = job.stdout + job.stderr
    assert "INTEGRITY: layer" in text and "flagged requests: [1]" in text, job.explain()
    assert job.results is not None and all(r["ok"] for r in job.results["requests"]), job.explain()
    clean = [r for r in job.results["requests"] if r["request"] != 1]
    assert all(r["check_rel_err"] <= RTOL for r in clean), job.explain()
    if code == "mds" and mode == "strict":
        assert job.returncode == 0 and "check: MATCHED" in text and "quarantined ranks: [2]" in text, job.explain()
    elif code == "sum":
        assert "rank not locatable" in text, job.explain()


@requires_mpi
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["strict", "opportunistic"])
@pytest.mark.parametrize("code, r", [("groups:2", 2), ("mds", 3)])
def test_group_and_mds_r3_codes_flag_a_corruption_on_real_ranks(tmp_path, code, r, mode):
    """The other codes: 4 workers in two sum-parity groups, and MDS r=3 (which also locates and corrects)."""
    shards = store.prepare_zoo(tmp_path / "shards", "tiny", 4, r, code)
    job = run_job(5 + r, ["tiny", "--weights", str(shards), "--integrity", mode, "--inject",
                          "corrupt:2@1=bitflip", "--repeat", "3", "--check"], tmp_path, timeout=120)
    text = job.stdout + job.stderr
    assert "INTEGRITY: layer" in text and "flagged requests: [1]" in text, job.explain()
    assert job.results is not None and all(r["ok"] for r in job.results["requests"]), job.explain()
    if code == "mds" and mode == "strict":
        assert job.returncode == 0 and "check: MATCHED" in text and "quarantined ranks: [2]" in text, job.explain()
