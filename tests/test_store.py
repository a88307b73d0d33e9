"""HDF5 weight store: real files in tmp_path, reloaded and decoded against the serial reference."""
import hashlib
import io
import itertools
import math
import shutil
import zlib

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpicdc import store
from mpicdc.core.codes import encode_rows
from mpicdc.core.kernels import default_input, forward, lower
from mpicdc.core.models import GraphBuilder, get_model
from mpicdc.core.plan import format_plan_table, make_plan, rank_bytes
from mpicdc.core.random_weights import init_weights, layer_weights
from mpicdc.progress import Progress
from mpicdc.store import ShardError, shards

# (model, data workers, parity workers or None when the code implies them, code)
CASES = [
    ("tiny", 3, None, "none"),
    ("tiny", 3, 3, "replication"),
    ("tiny", 4, None, "sum"),
    ("tiny", 4, None, "groups:2"),
    ("tiny", 4, 2, "mds"),
    ("lenet", 3, None, "sum"),
    ("lenet", 4, 2, "mds"),
    ("actionrec", 4, None, "groups:2"),
    ("alexnet", 4, None, "sum"),
]
SEED = 3


def case_id(case):
    return f"{case[0]}-{case[3]}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``case -> Manifest``, each case prepared once per module."""
    cache = {}

    def get(case):
        if case not in cache:
            name, workers, parity, code = case
            model = get_model(name)
            plan = make_plan(model, workers, parity, code)
            out = tmp_path_factory.mktemp(case_id(case)) / f"{name}-{plan.tag}"
            cache[case] = store.prepare(model, plan, out, "random", SEED)
        return cache[case]
    return get


@pytest.fixture(scope="module")
def tiny_sum(prepared):
    return prepared(("tiny", 4, None, "sum"))


@pytest.fixture
def tiny_copy(tiny_sum, tmp_path):
    """A private copy of the prepared tiny/sum directory, free to damage."""
    out = tmp_path / tiny_sum.directory.name
    shutil.copytree(tiny_sum.directory, out)
    return out


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- format and manifest

@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_prepared_directory_verifies_and_manifest_matches(prepared, case):
    m = prepared(case)
    name, workers, parity, code = case
    model = get_model(name)
    plan = make_plan(model, workers, parity, code)
    assert store.verify(m.directory) == []
    assert m.model == model and m.plan == plan
    assert (m.source, m.seed, m.format_version) == ("random", SEED, store.FORMAT_VERSION)
    assert m.directory.name == f"{name}-{plan.tag}"
    assert sorted(p.name for p in m.directory.iterdir()) == ["manifest.h5"] + [
        f"rank-{r:03d}.h5" for r in range(plan.world_size)]
    for rank in range(plan.world_size):
        path = m.directory / m.files[rank]
        assert m.checksums[rank] == _sha256(path)
        assert m.sizes[rank] == path.stat().st_size
    for lp in plan.layers:
        np.testing.assert_array_equal(m.parity[lp.layer], lp.code_obj.parity)


def test_shard_files_are_self_describing(tiny_sum):
    m = tiny_sum
    lp = m.plan.for_layer("fc1")
    with h5py.File(m.directory / "rank-002.h5", "r") as f:
        assert f.attrs["format"] == "mpicdc-shard" and f.attrs["rank"] == 2 and f.attrs["role"] == "data"
        assert f.attrs["world_size"] == 6 and f.attrs["plan_tag"] == m.plan.tag and f.attrs["code"] == "sum"
        start, stop = lp.rows[1]
        g = f[f"fc1/data-block-1-rows-{start}-{stop}"]
        assert g.parent.attrs["layer"] == "fc1"
        assert (g.attrs["layer"], g.attrs["kind"], g.attrs["block"], g.attrs["code"]) == ("fc1", "data", 1, "sum")
        assert list(g.attrs["rows"]) == [start, stop] and "rows" in g.attrs["description"]
        for key in ("W", "b"):
            d = g[key]
            assert d.attrs["sha256"] == hashlib.sha256(d[()].astype("<f4").tobytes()).hexdigest()
    with h5py.File(m.directory / "rank-005.h5", "r") as f:
        g = f["fc1/parity-block-4"]
        assert f.attrs["role"] == "parity" and g.attrs["kind"] == "parity"
        np.testing.assert_array_equal(g.attrs["coefficients"], np.ones(4))
        assert g["W"].shape == (lp.block_rows, 192)
    with h5py.File(m.directory / "manifest.h5", "r") as f:
        assert f.attrs["format"] == "mpicdc-manifest"
        assert f["codes/fc1"].shape == (1, 4)
        assert list(f["shards/files"].asstr()[()]) == [f"rank-{r:03d}.h5" for r in range(6)]


def test_no_pickle_anywhere(tiny_sum):
    """Every dataset is numeric or a string; every attribute a number, string or numeric array."""
    def check(obj):
        for value in obj.attrs.values():
            assert isinstance(value, (str, bytes, np.integer, np.floating, np.ndarray)), type(value)
            if isinstance(value, np.ndarray):
                assert value.dtype.kind in "iuf"
        if isinstance(obj, h5py.Dataset):
            assert obj.dtype.kind in "iufO" and (obj.dtype.kind != "O" or h5py.check_string_dtype(obj.dtype))
    for path in tiny_sum.directory.iterdir():
        with h5py.File(path, "r") as f:
            check(f)
            f.visititems(lambda _, obj: check(obj))


# ---------------------------------------------------------------- values

def _assemble(manifest):
    """Full ``{layer: (W, b)}`` from the data blocks (trimmed) and the master's layers."""
    blocks = {rank: store.load_rank(manifest.directory, rank, manifest) for rank in range(manifest.world_size)}
    weights = dict(blocks[0])
    for lp in manifest.plan.layers:
        parts = [blocks[lp.ranks[i]][lp.layer] for i in range(lp.n)]
        sizes = [stop - start for start, stop in lp.rows]
        weights[lp.layer] = (np.concatenate([W[:k] for (W, _), k in zip(parts, sizes)]),
                             np.concatenate([b[:k] for (_, b), k in zip(parts, sizes)]))
    return weights, blocks


def test_random_shards_reproduce_init_weights_exactly(tmp_path):
    model = get_model("lenet")
    plan = make_plan(model, 3, None, "sum", keep_on_master=["fc3"], speeds=[1, 2, 1])
    m = store.prepare(model, plan, tmp_path / "w", "random", 7)
    weights, blocks = _assemble(m)
    reference = init_weights(model, 7)
    assert set(blocks[0]) == {"fc3"}
    for name, (W, b) in reference.items():
        np.testing.assert_array_equal(weights[name][0], W)
        np.testing.assert_array_equal(weights[name][1], b)


@pytest.mark.parametrize("name", ["tiny", "lenet", "actionrec"])
def test_in_place_layer_weights_match_the_out_of_place_formula(name):
    """layer_weights scales in place (half the peak memory when streaming); values are bit-identical."""
    model = get_model(name)
    for layer in model.linear_layers:
        W, b = layer_weights(model, layer.name, 5)
        rows, cols = model.weight_shapes()[layer.name]
        rng = np.random.default_rng([5, zlib.crc32(layer.name.encode())])
        W0 = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(math.sqrt(2.0 / cols))
        b0 = rng.standard_normal(rows, dtype=np.float32) * np.float32(0.01)
        assert W.dtype == W0.dtype == np.float32
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("case", [c for c in CASES if c[3] != "none"], ids=case_id)
def test_parity_blocks_match_encode_rows(prepared, case):
    m = prepared(case)
    reference = init_weights(m.model, SEED)
    loaded = {}
    for lp in m.plan.layers:
        W, b = reference[lp.layer]
        expected = encode_rows(W, b, lp.code_obj, [slice(*r) for r in lp.rows])
        for i in range(lp.n, lp.n + lp.r):
            rank = lp.ranks[i]
            if rank not in loaded:
                loaded[rank] = store.load_rank(m.directory, rank, m)
            Wp, bp = loaded[rank][lp.layer]
            scale = float(np.abs(expected[i][0]).max()) or 1.0
            np.testing.assert_allclose(Wp, expected[i][0], rtol=0, atol=1e-6 * scale)
            np.testing.assert_allclose(bp, expected[i][1], rtol=0, atol=1e-6 * max(float(np.abs(bp).max()), 1e-3))


def _loss_patterns(code):
    """Every set of lost blocks the code tolerates, up to ``r`` losses (all patterns up to ``tolerance``)."""
    blocks = range(code.n + code.r)
    for k in range(1, code.r + 1):
        for lost in itertools.combinations(blocks, k):
            received = [i for i in blocks if i not in lost]
            if k <= code.tolerance:
                assert code.decodable(received), (code.spec, lost)
            if code.decodable(received):
                yield lost


def _check_layer_decodes(layer, lp, blocks, x, reference_out, rtol=1e-4):
    lo = lower(layer, x)
    replies = {}
    for i, rank in enumerate(lp.ranks):
        W, b = blocks[rank][lp.layer]
        assert W.shape[0] == lp.block_rows and b.shape == (lp.block_rows,)
        replies[i] = W @ lo.X + b[:, None]
    code = lp.code_obj
    scale = float(np.abs(reference_out).max())
    sizes = [stop - start for start, stop in lp.rows]
    checked = 0
    for lost in [()] + list(_loss_patterns(code)):
        got = code.decode({i: y for i, y in replies.items() if i not in lost})
        assert len(got) == lp.n
        Y = np.concatenate([np.asarray(y)[:k] for y, k in zip(got, sizes)])
        out = lo.finish(Y)
        assert out.shape == reference_out.shape
        err = float(np.abs(out - reference_out).max())
        assert err <= rtol * scale, f"{lp.layer} lost {lost}: max error {err:.3g} vs max {scale:.3g}"
        checked += 1
    return checked


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reloaded_blocks_decode_to_reference_layer_outputs(prepared, case):
    """Every rank's ``W_block @ X + b_block`` decodes (all replies, each tolerated loss) to the reference."""
    m = prepared(case)
    model = m.model
    acts = forward(model, init_weights(model, SEED), default_input(model, 1), return_all=True)
    blocks = {rank: store.load_rank(m.directory, rank, m) for rank in range(m.world_size)}
    patterns = 0
    for layer in model.linear_layers:
        lp = m.plan.for_layer(layer.name)
        assert lp is not None
        patterns += _check_layer_decodes(layer, lp, blocks, acts[layer.inputs[0]], acts[layer.name])
    if m.plan.parity:
        assert patterns > len(model.linear_layers)


def test_layer_subsets_speeds_and_master_layers(tmp_path):
    model = get_model("tiny")
    plan = make_plan(model, 4, 2, "mds", keep_on_master=["fc2"], layer_workers={"fc1": [1, 3, 4]},
                     speeds=[1, 1, 2, 4])
    m = store.prepare(model, plan, tmp_path / "w", "random", 0)
    assert store.verify(m.directory) == []
    blocks = {rank: store.load_rank(m.directory, rank, m) for rank in range(m.world_size)}
    assert set(blocks[0]) == {"fc2"}
    np.testing.assert_array_equal(blocks[0]["fc2"][0], layer_weights(model, "fc2", 0)[0])
    assert "fc1" not in blocks[2] and "fc1" in blocks[5] and "fc1" in blocks[6]
    lp = plan.for_layer("conv2")
    assert len({stop - start for start, stop in lp.rows}) > 1      # proportional blocks
    unpadded = store.load_rank(m.directory, 1, m, pad=False)
    assert unpadded["conv2"][0].shape[0] == lp.rows[0][1] - lp.rows[0][0] < lp.block_rows
    acts = forward(model, init_weights(model, 0), default_input(model), return_all=True)
    for name in ("conv2", "fc1"):
        layer = model.layer(name)
        _check_layer_decodes(layer, plan.for_layer(name), blocks, acts[layer.inputs[0]], acts[name])


def test_mapping_source_and_layer_names_with_slashes(tmp_path):
    b = GraphBuilder("imported", (2, 6, 6))
    x = b.conv_relu("input", 4, 3, padding=1, name="features/0/Conv")
    x = b.flatten(x, name="flat")
    b.dense(x, 5, name="classifier.fc")
    model = b.build()
    weights = {name: (np.full(shape, i + 1.5, np.float64), None)
               for i, (name, shape) in enumerate(model.weight_shapes().items())}
    plan = make_plan(model, 2, None, "sum")
    m = store.prepare(model, plan, tmp_path / "w", dict(weights), source_label="model.onnx", consume=False)
    assert (m.source, m.seed) == ("model.onnx", None)
    assert store.verify(m.directory) == []
    got, _ = _assemble(m)
    for name, (W, _) in weights.items():
        np.testing.assert_array_equal(got[name][0], W.astype(np.float32))
        np.testing.assert_array_equal(got[name][1], 0)
    with h5py.File(m.directory / "rank-001.h5", "r") as f:
        assert "features%2F0%2FConv" in f and f["features%2F0%2FConv"].attrs["layer"] == "features/0/Conv"
    consumed = dict(weights)
    store.prepare(model, plan, tmp_path / "w2", consumed, consume=True)
    assert consumed == {}


def test_bad_source_weights_are_rejected(tmp_path):
    model = get_model("tiny")
    plan = make_plan(model, 2, None, "sum")
    weights = init_weights(model)
    weights["fc1"] = (weights["fc1"][0][:, :-1], weights["fc1"][1])
    with pytest.raises(ValueError, match=r"fc1.*\(32, 191\).*\(32, 192\)"):
        store.prepare(model, plan, tmp_path / "w", weights)
    del weights["fc2"]
    with pytest.raises(ValueError, match="fc2"):
        store.prepare(model, plan, tmp_path / "w", weights)
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        store.prepare(model, plan, tmp_path / "w", str(tmp_path / "nothing.onnx"))
    with pytest.raises(ValueError, match="plan is for model"):
        store.prepare(get_model("lenet"), plan, tmp_path / "w")
    assert not (tmp_path / "w" / "manifest.h5").exists()


def test_reprepare_replaces_files_and_drops_stale_ranks(tmp_path):
    model = get_model("tiny")
    out = tmp_path / "w"
    store.prepare(model, make_plan(model, 4, None, "sum"), out)
    (out / "notes.txt").write_text("mine")
    m = store.prepare(model, make_plan(model, 2, None, "sum"), out, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.h5", "notes.txt", "rank-000.h5",
                                                      "rank-001.h5", "rank-002.h5", "rank-003.h5"]
    assert m.seed == 1 and store.verify(out) == []


# ---------------------------------------------------------------- integrity

def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _dataset_offset(path, name):
    """File offset of a dataset's bytes (its first chunk when chunked)."""
    with h5py.File(path, "r") as f:
        d = f[name].id
        return d.get_offset() if d.get_offset() is not None else d.get_chunk_info(0).byte_offset


def test_flipped_byte_in_a_dataset(tiny_copy):
    path = tiny_copy / "rank-003.h5"
    m = store.open_manifest(tiny_copy)
    blk = [b for b in shards._layout(m.model, m.plan, 3) if b.layer == "conv2"][0]
    _flip(path, _dataset_offset(path, f"{blk.path}/W") + 5)
    for verify in (True, False):     # HDF5 checks every chunk's fletcher32 as it reads it
        with pytest.raises(ShardError) as info:
            store.load_rank(tiny_copy, 3, verify=verify)
        text = str(info.value)
        assert text.startswith(f"{path}: layer 'conv2': dataset /{blk.path}/W is corrupted"), text
        assert "re-run: python -m mpicdc.prepare tiny --workers 4 --code sum --seed 3" in text and "\n" not in text
    problems = store.verify(tiny_copy)
    assert any("rank-003.h5: corrupted: sha256" in p for p in problems)
    assert any(f"/{blk.path}/W is corrupted" in p for p in problems), problems


def _bytes_read():
    """Bytes this process has read through read()/pread() so far (page cache included)."""
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io (Linux) to count bytes read")
def test_load_reads_each_file_once(tiny_sum):
    m = tiny_sum
    reference = init_weights(m.model, SEED)
    for rank in (1, 5):
        size = m.sizes[rank]
        before = _bytes_read()
        blocks = store.load_rank(m.directory, rank, m, pad=False)
        read = _bytes_read() - before
        assert size <= read < 1.3 * size + (64 << 10), (rank, read, size)
        if rank == 1:
            for layer, (W, b) in blocks.items():
                start, stop = m.plan.for_layer(layer).rows[0]
                np.testing.assert_array_equal(W, reference[layer][0][start:stop])
                np.testing.assert_array_equal(b, reference[layer][1][start:stop])
    before = _bytes_read()
    assert store.verify(m.directory, [1]) == []          # the thorough check reads it twice
    assert _bytes_read() - before >= 2 * m.sizes[1]


def _to_old_layout(folder):
    """Rewrite every shard of ``folder`` as mpicdc 0.1 wrote it: contiguous datasets, no fletcher32."""
    with h5py.File(folder / "manifest.h5", "r+") as man:
        for rank, name in enumerate(man["shards/files"].asstr()[()]):
            path = folder / name
            old = path.with_suffix(".new")
            with h5py.File(path, "r") as src, h5py.File(old, "w", libver=shards.LIBVER) as dst:
                dst.attrs.update(src.attrs)

                def copy(key, obj, dst=dst):
                    if isinstance(obj, h5py.Group):
                        dst.require_group(key).attrs.update(obj.attrs)
                    else:
                        dst.create_dataset(key, data=obj[()]).attrs.update(obj.attrs)
                src.visititems(copy)
            old.replace(path)
            man["shards/bytes"][rank] = path.stat().st_size
            man["shards/sha256"][rank] = _sha256(path)


def test_old_contiguous_shards_still_load_and_are_checked(tiny_copy):
    _to_old_layout(tiny_copy)
    assert store.verify(tiny_copy) == []
    m = store.open_manifest(tiny_copy)
    blk = [b for b in shards._layout(m.model, m.plan, 2) if b.layer == "fc1"][0]
    with h5py.File(tiny_copy / "rank-002.h5", "r") as f:
        assert not f[f"{blk.path}/W"].fletcher32
    expected = init_weights(m.model, SEED)["fc1"][0][blk.rows[0]:blk.rows[1]]
    np.testing.assert_array_equal(store.load_rank(tiny_copy, 2, m, pad=False)["fc1"][0], expected)
    path = tiny_copy / "rank-002.h5"
    _flip(path, _dataset_offset(path, f"{blk.path}/W") + 7)
    with pytest.raises(ShardError, match=rf"rank-002\.h5: layer 'fc1': dataset /{blk.path}/W is corrupted \(sha256"):
        store.load_rank(tiny_copy, 2, m)


def test_flipped_byte_anywhere_in_the_file(tiny_copy):
    path = tiny_copy / "rank-001.h5"
    _flip(path, 40)      # inside the HDF5 superblock
    with pytest.raises(ShardError, match=r"rank-001\.h5"):
        store.load_rank(tiny_copy, 1)
    assert any("rank-001.h5" in p for p in store.verify(tiny_copy))


def test_truncated_shard(tiny_copy):
    path = tiny_copy / "rank-002.h5"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"rank-002\.h5: truncated: \d+ bytes, the manifest says \d+"):
        store.load_rank(tiny_copy, 2, verify=False)
    assert any("truncated" in p for p in store.verify(tiny_copy))


def test_missing_shard(tiny_copy):
    (tiny_copy / "rank-005.h5").unlink()
    with pytest.raises(ShardError, match=r"rank-005\.h5: shard file of rank 5 is missing.*python -m mpicdc\.prepare"):
        store.load_rank(tiny_copy, 5)
    problems = store.verify(tiny_copy)
    assert len(problems) == 1 and "rank-005.h5" in problems[0]


def test_shard_for_another_world_size(tiny_copy, prepared):
    other = prepared(("tiny", 3, None, "none"))        # world size 4
    shutil.copy(other.directory / "rank-002.h5", tiny_copy / "rank-002.h5")
    with pytest.raises(ShardError, match=r"rank-002\.h5: this shard belongs to another preparation: "
                                         r"world size 4 \(expected 6\)"):
        store.load_rank(tiny_copy, 2, verify=False)


def test_shard_for_another_code(tiny_copy, tmp_path):
    model = get_model("tiny")
    other = store.prepare(model, make_plan(model, 4, 1, "mds"), tmp_path / "mds")   # same world size 6
    shutil.copy(other.directory / "rank-005.h5", tiny_copy / "rank-005.h5")
    with pytest.raises(ShardError, match=r"rank-005\.h5: .*code 'mds' \(expected 'sum'\)"):
        store.load_rank(tiny_copy, 5)
    assert any("code 'mds'" in p for p in store.verify(tiny_copy))


def test_shard_from_another_run_of_the_same_plan(tiny_copy, tmp_path):
    model = get_model("tiny")
    other = store.prepare(model, make_plan(model, 4, None, "sum"), tmp_path / "again", seed=SEED)
    shutil.copy(other.directory / "rank-001.h5", tiny_copy / "rank-001.h5")
    with pytest.raises(ShardError, match=r"rank-001\.h5: this shard comes from another run of prepare"):
        store.load_rank(tiny_copy, 1, verify=False)


def test_manifest_problems(tiny_copy, tmp_path):
    with pytest.raises(ShardError, match="no such weight directory"):
        store.open_manifest(tmp_path / "nowhere")
    path = tiny_copy / "manifest.h5"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ShardError, match=r"manifest\.h5: damaged or incomplete manifest"):
        store.open_manifest(tiny_copy)
    path.unlink()
    with pytest.raises(ShardError, match=r"manifest\.h5: manifest missing"):
        store.load_rank(tiny_copy, 1)
    assert "manifest missing" in store.verify(tiny_copy)[0]


def test_check_world_names_the_fitting_commands(tiny_sum):
    store.check_world(tiny_sum, 6)
    with pytest.raises(ShardError, match=r"prepared for 6 ranks .* has 9: launch with mpiexec -np 6, or prepare "
                                         r"shards for 9 ranks: python -m mpicdc.prepare tiny --workers 7 --code sum"):
        store.check_world(tiny_sum, 9)
    with pytest.raises(ShardError, match=r"-np 6, or prepare uncoded shards for 2 ranks: .*--workers 1 --code none"):
        store.check_world(tiny_sum, 2)
    with pytest.raises(ShardError, match="rank 6 has no shard"):
        store.load_rank(tiny_sum.directory, 6, tiny_sum)


def test_stored_parity_matrix_must_match_the_codes(tiny_copy):
    with h5py.File(tiny_copy / "manifest.h5", "r+") as f:
        f["codes/fc1"][0, 0] = 2.0
    assert any("layer 'fc1' was encoded with a parity matrix that differs" in p for p in store.verify(tiny_copy))
    with pytest.raises(ShardError, match="fc1"):
        store.load_rank(tiny_copy, 0)


# ---------------------------------------------------------------- plan table and progress bar

def test_plan_table_and_rank_bytes():
    model = get_model("alexnet")
    plan = make_plan(model, 4, None, "sum", keep_on_master=["fc8"])
    text = format_plan_table(plan, model)
    assert "block rows" in text and "MB/rank" in text
    assert "fc6" in text and "4096x9216" in text and "1-4 | 5" in text
    fc8 = [line for line in text.splitlines() if line.startswith("fc8")][0]
    assert "master" in fc8
    sizes = rank_bytes(plan, model)
    assert sizes[0] == 4 * 1000 * 4097
    assert sizes[5] == sizes[1] and len(sizes) == 6


def test_progress_bar_only_on_a_terminal():
    quiet = io.StringIO()
    with Progress(100, "x", stream=quiet) as bar:
        bar.update(50, status="fc6")
    assert quiet.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    with Progress(2e6, "vgg16", stream=term, rate=1e9) as bar:
        bar.update(1e6, status="fc6")
        assert term.getvalue().startswith("\rvgg16:")
        assert "50%" in term.getvalue() and "1.00M/2.00M" in term.getvalue() and "fc6" in term.getvalue()
        bar.update(1e6, status="fc7")
    out = term.getvalue()
    assert out.endswith("\n") and "100%" in out and "2.00M/2.00M" in out and "fc7" in out and out.count("\n") == 1


# ---------------------------------------------------------------- ensure_prepared

def test_ensure_prepared_prepares_once_then_reuses(tmp_path):
    model = get_model("tiny")
    plan = make_plan(model, 2, None, "sum")
    folder = store.ensure_prepared(model, plan, tmp_path, seed=3)
    assert folder == store.default_dir("tiny", plan, tmp_path)
    first = store.open_manifest(folder)
    assert (first.source, first.seed) == ("random", 3) and not store.verify(folder)
    again = store.ensure_prepared(model, plan, tmp_path, seed=3)
    assert again == folder and store.open_manifest(folder).preparation == first.preparation
    weights = store.reference_weights(first)
    np.testing.assert_array_equal(weights["fc1"][0], init_weights(model, 3)["fc1"][0])


def test_ensure_prepared_refuses_another_seed_or_plan(tmp_path):
    model = get_model("tiny")
    plan = make_plan(model, 2, None, "sum")
    folder = store.ensure_prepared(model, plan, tmp_path, seed=0)
    with pytest.raises(ShardError, match=r"seed \(0, not 1\).*--seed 1 --dir") as info:
        store.ensure_prepared(model, plan, tmp_path, seed=1)
    assert str(folder) in str(info.value)
    # same folder name (same tag), other plan: fc2 kept on the master
    other = make_plan(model, 2, None, "sum", keep_on_master=["fc2"])
    assert store.default_dir("tiny", other, tmp_path) == folder
    with pytest.raises(ShardError, match=r"another plan.*--keep-on-master fc2 --dir"):
        store.ensure_prepared(model, other, tmp_path, seed=0)
    # the run command takes what is there
    assert store.ensure_prepared(model, other, tmp_path, seed=1, check=False) == folder
    assert store.open_manifest(folder).seed == 0


def test_reference_weights_reassemble_imported_shards(tmp_path):
    model = get_model("tiny")
    weights = init_weights(model, 9)
    m = store.prepare(model, make_plan(model, 3, 2, "mds"), tmp_path / "w", dict(weights), source_label="x.npz")
    for name, (W, b) in store.reference_weights(m).items():
        np.testing.assert_array_equal(W, weights[name][0])
        np.testing.assert_array_equal(b, weights[name][1])


# ---------------------------------------------------------------- manifests that were edited

def _edit_attr(folder, key, change):
    with h5py.File(folder / "manifest.h5", "r+") as f:
        f.attrs[key] = change(shards._attr_str(f.attrs, key))


def test_manifest_file_names_must_be_the_rank_files(tiny_copy):
    with h5py.File(tiny_copy / "manifest.h5", "r+") as f:
        f["shards/files"][2] = "../x.h5"
    with pytest.raises(ShardError, match=r"manifest\.h5: /shards/files names '\.\./x\.h5' for rank 2; only "
                                         r"rank-002\.h5 inside the weight folder is accepted.*prepare the weights again"):
        store.open_manifest(tiny_copy)
    assert "../x.h5" in store.verify(tiny_copy)[0]


def _with_dense_out(model_json, layer, out):
    import json
    d = json.loads(model_json)
    next(x for x in d["layers"] if x["name"] == layer)["attrs"]["out"] = out
    return json.dumps(d)


def test_absurd_model_attribute_is_refused_before_allocation(tiny_copy):
    _edit_attr(tiny_copy, "model_json", lambda text: _with_dense_out(text, "fc1", 10**9))
    with pytest.raises(ShardError) as info:
        store.open_manifest(tiny_copy)
    text = str(info.value)
    assert "layer 'fc1' of the model has a 1,000,000,000x" in text and "weight matrix" in text, text
    assert "the manifest is damaged or was edited: prepare the weights again" in text and "\n" not in text
    with pytest.raises(ShardError, match="layer 'fc1' of the model"):
        store.load_rank(tiny_copy, 0)


def test_model_and_plan_edited_together_must_fit_the_file_sizes(tiny_copy):
    model = get_model("tiny")
    edited = type(model).from_json(_with_dense_out(model.to_json(), "fc1", 100_000))
    plan = make_plan(edited, 4, None, "sum")
    _edit_attr(tiny_copy, "model_json", lambda _: edited.to_json())
    _edit_attr(tiny_copy, "plan_json", lambda _: plan.to_json())
    with pytest.raises(ShardError, match=r"its model and plan put [\d,]+ bytes of weights \(.*\) in rank-000\.h5|"
                                         r"in rank-001\.h5, but /shards/bytes gives that file [\d,]+ bytes"):
        store.open_manifest(tiny_copy)


@pytest.mark.parametrize("key, value, message", [
    ("workers", 3, "attribute workers is 3 but its plan says 4"),
    ("plan_json", None, "its plan does not fit its model"),
])
def test_manifest_plan_must_fit_world_and_model(tiny_copy, key, value, message):
    if key == "plan_json":
        import json

        def change(text):
            d = json.loads(text)
            d["layers"][0]["rows"][0][1] += 1          # row blocks overlap
            return json.dumps(d)
        _edit_attr(tiny_copy, key, change)
    else:
        with h5py.File(tiny_copy / "manifest.h5", "r+") as f:
            f.attrs[key] = value
    with pytest.raises(ShardError, match=message):
        store.open_manifest(tiny_copy)


# ---------------------------------------------------------------- stale partial folders and the lock

def test_stale_partial_folders_are_removed_with_one_line(tmp_path, caplog):
    model = get_model("tiny")
    plan = make_plan(model, 2, None, "sum")
    out = tmp_path / "w"
    store.prepare(model, plan, out)
    stale = out / ".partial-deadbeef"
    stale.mkdir()
    (stale / "rank-001.h5").write_bytes(b"x" * 5000)
    with caplog.at_level(logging.WARNING, logger="mpicdc.store.shards"):
        store.prepare(model, plan, out, seed=1)
    assert not list(out.glob(".partial-*")) and store.verify(out) == []
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"{out}: removed 1 partial folder(s) (4.9 KiB) left by an interrupted prepare"]


def test_ensure_prepared_waits_for_the_lock_then_uses_the_result(tmp_path):
    model = get_model("tiny")
    plan = make_plan(model, 2, None, "sum")
    folder = store.default_dir("tiny", plan, tmp_path)
    folder.mkdir(parents=True)
    with shards._prepare_lock(folder, 0):
        with pytest.raises(ShardError, match=rf"another prepare \(pid {__import__('os').getpid()}: .*\) is writing "
                                             r"this folder .*--wait SECONDS"):
            store.prepare(model, plan, folder)
        with pytest.raises(ShardError, match="another prepare"):
            store.ensure_prepared(model, plan, tmp_path, wait=0.3)
    assert store.ensure_prepared(model, plan, tmp_path) == folder and store.verify(folder) == []
