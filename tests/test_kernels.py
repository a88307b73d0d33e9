"""Unit tests of the numpy kernels against independent references.

The references are naive loops over every output element on tiny shapes (in
float64), written from the definitions rather than from the kernels, plus a
few checks against torch where it is installed.  Lowering is a copy, so it is
compared exactly; arithmetic is compared with float32 tolerances.
"""
import contextlib
import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpicdc.core import kernels as K
from mpicdc.core.models import (
    GraphBuilder,
    Layer,
    Model,
    UnknownModelError,
    get_model,
    model_names,
)
from mpicdc.core.random_weights import init_weights, layer_weights

RNG = np.random.default_rng(12345)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- naive references

def naive_im2col(x, kernel, stride, padding):
    """Rows (c, *kernel offset), columns output positions in C order; zero outside the image."""
    C, spatial = x.shape[0], x.shape[1:]
    out = [(spatial[a] + 2 * padding[a] - kernel[a]) // stride[a] + 1 for a in range(len(spatial))]
    rows = []
    for c in range(C):
        for k in itertools.product(*map(range, kernel)):
            row = []
            for o in itertools.product(*map(range, out)):
                idx = [o[a] * stride[a] + k[a] - padding[a] for a in range(len(spatial))]
                inside = all(0 <= idx[a] < spatial[a] for a in range(len(spatial)))
                row.append(x[(c,) + tuple(idx)] if inside else 0.0)
            rows.append(row)
    return np.array(rows, dtype=np.float64), tuple(out)


def naive_conv(x, W, b, kernel, stride, padding):
    """Direct convolution from the definition; ``W`` is (out, C, *kernel)."""
    X, out = naive_im2col(x.astype(np.float64), kernel, stride, padding)
    return (W.reshape(W.shape[0], -1).astype(np.float64) @ X + b[:, None]).reshape((W.shape[0],) + out)


def naive_pool(x, kernel, stride, padding, mode, count_include_pad=False):
    C, spatial = x.shape[0], x.shape[1:]
    nd = len(spatial)
    out = [(spatial[a] + 2 * padding[a] - kernel[a]) // stride[a] + 1 for a in range(nd)]
    y = np.empty((C,) + tuple(out))
    for c in range(C):
        for o in itertools.product(*map(range, out)):
            vals = []
            for k in itertools.product(*map(range, kernel)):
                idx = [o[a] * stride[a] + k[a] - padding[a] for a in range(nd)]
                if all(0 <= idx[a] < spatial[a] for a in range(nd)):
                    vals.append(float(x[(c,) + tuple(idx)]))
            if mode == "max":
                y[(c,) + o] = max(vals)
            else:
                y[(c,) + o] = sum(vals) / (math.prod(kernel) if count_include_pad else len(vals))
    return y


def conv_layer(kernel, stride, padding, out=4, name="conv"):
    return Layer(name, "conv", ("input",), {"out": out, "kernel": list(kernel),
                                             "stride": list(stride), "padding": list(padding)})


# ---------------------------------------------------------------- im2col and conv

#: MAX_JUNK settings that force each unit-stride layout (strided convs are always dense)
LAYOUTS = {"pitched": 2.0, "dense": -1.0}


@contextlib.contextmanager
def forced_layout(layout):
    """Force the pitched or the dense lowering for unit-stride convs (tiny test images would
    otherwise mostly get the dense one, since their junk fraction is high)."""
    before = K.MAX_JUNK
    K.MAX_JUNK = LAYOUTS[layout]
    try:
        yield
    finally:
        K.MAX_JUNK = before


CONV_CASES = [
    # (input shape, kernel, stride, padding)
    ((3, 5, 7), (3, 3), (1, 1), (1, 1)),        # pitched, "same"
    ((2, 6, 5), (3, 2), (1, 1), (0, 1)),        # pitched, non-square kernel, pad on one axis
    ((2, 4, 4), (1, 1), (1, 1), (0, 0)),        # 1x1: no junk at all
    ((2, 4, 5), (1, 1), (1, 1), (1, 1)),        # pad beyond the kernel: output larger than input
    ((1, 7, 7), (5, 5), (1, 1), (2, 2)),        # 5x5 same
    ((3, 4, 6), (2, 3), (1, 1), (2, 0)),        # asymmetric padding per axis, pad > kernel//2
    ((2, 3, 4, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1)),   # 3-D pitched
    ((2, 4, 3, 5), (2, 1, 3), (1, 1, 1), (0, 1, 1)),   # 3-D odd everything
    ((3, 11, 9), (3, 3), (2, 2), (1, 1)),       # strided
    ((2, 13, 13), (5, 5), (4, 3), (2, 0)),      # strided, different per axis (AlexNet-like)
    ((2, 5, 6, 7), (3, 2, 3), (2, 1, 3), (1, 0, 1)),   # 3-D strided
]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("shape,kernel,stride,padding", CONV_CASES)
def test_im2col_matches_naive_exactly(shape, kernel, stride, padding, layout):
    x = rand(*shape)
    with forced_layout(layout):
        lo = K.im2col(x, kernel, stride, padding)
    if layout == "dense" or any(s != 1 for s in stride):
        assert lo.pitch == lo.out_spatial
    want, out = naive_im2col(x, kernel, stride, padding)
    assert lo.out_spatial == out
    assert lo.X.shape == (shape[0] * math.prod(kernel), math.prod(lo.pitch))
    assert all(p >= o for p, o in zip(lo.pitch, out))
    valid = lo.X.reshape((lo.X.shape[0],) + lo.pitch)[(slice(None),) + tuple(slice(0, o) for o in out)]
    np.testing.assert_array_equal(valid.reshape(want.shape), want.astype(np.float32))
    assert np.isfinite(lo.X).all()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("shape,kernel,stride,padding", CONV_CASES)
def test_conv_lower_gemm_finish_matches_naive(shape, kernel, stride, padding, layout):
    x = rand(*shape)
    W4 = rand(5, shape[0], *kernel)
    b = rand(5)
    layer = conv_layer(kernel, stride, padding, out=5)
    with forced_layout(layout):
        got = K.linear_forward(layer, W4.reshape(5, -1), b, x)
        assert K.lowered_layout(layer, x.shape).pitch == K.lower(layer, x).pitch
    want = naive_conv(x, W4, b, kernel, stride, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layout_choice_shared_padding_and_dense_fallback():
    """Pitched with shared padding: one junk column per row of a 3x3 same conv (41 for 40 wide).

    When that junk would exceed MAX_JUNK of the GEMM (14x14: 1/15), the dense
    layout is used instead: exactly prod(out) columns.
    """
    lo = K.im2col(rand(2, 40, 40), (3, 3), (1, 1), (1, 1))
    assert lo.pitch == (40, 41) and lo.out_spatial == (40, 40)
    lo = K.im2col(rand(2, 14, 14), (3, 3), (1, 1), (1, 1))
    assert lo.pitch == lo.out_spatial == (14, 14) and lo.X.shape == (18, 196)
    lo3 = K.im2col(rand(1, 3, 100, 100), (3, 3, 3), (1, 1, 1), (1, 1, 1))
    assert lo3.pitch == (3, 101, 101)


@pytest.mark.parametrize("name", model_names())
def test_lowered_layout_agrees_with_lower(name):
    """The master finishes decoded products with lowered_layout(): it must match the workers' lower()."""
    model = get_model(name)
    shapes = model.shapes()
    for layer in model.linear_layers:
        x = np.zeros(shapes[layer.inputs[0]], np.float32)
        lo, layout = K.lower(layer, x), K.lowered_layout(layer, x.shape)
        assert layout.X is None
        assert (layout.out_spatial, layout.pitch) == (lo.out_spatial, lo.pitch), layer.name
        assert lo.X.shape[1] == max(1, math.prod(lo.pitch))
        if layer.op == "conv":
            assert lo.out_spatial == shapes[layer.name][1:]
            junk = 1 - math.prod(lo.out_spatial) / math.prod(lo.pitch)
            assert junk <= K.MAX_JUNK or 4 * lo.X.shape[0] * math.prod(lo.out_spatial) > K.DENSE_MAX_BYTES


def test_workspace_reuse_never_leaks_stale_values():
    """A workspace full of NaN (or of a bigger previous layer) must not show through pads or junk."""
    ws = K.Workspace()
    ws.take("padded", 10_000)[:] = np.nan
    ws.take("X", 100_000)[:] = np.nan
    for (shape, kernel, stride, padding), layout in itertools.product(CONV_CASES, LAYOUTS):
        x = rand(*shape)
        with forced_layout(layout):
            lo = K.im2col(x, kernel, stride, padding, workspace=ws)
            assert np.isfinite(lo.X).all(), (shape, kernel, stride, padding, layout)
            np.testing.assert_array_equal(lo.X, K.im2col(x, kernel, stride, padding).X)
    assert ws.nbytes >= 4 * 110_000


def test_lowering_accepts_strided_views():
    """The master feeds finish() views (junk columns dropped) straight into the next lowering."""
    base = rand(3, 6, 9)
    view = base[:, :, :7]
    assert not view.flags.c_contiguous
    for stride, layout in itertools.product(((1, 1), (2, 2)), LAYOUTS):
        with forced_layout(layout):
            a = K.im2col(view, (3, 3), stride, (1, 1))
            b = K.im2col(np.ascontiguousarray(view), (3, 3), stride, (1, 1))
        np.testing.assert_array_equal(a.X, b.X)


@settings(max_examples=80, deadline=None)
@given(c=st.integers(1, 3), nd=st.integers(1, 3), layout=st.sampled_from(sorted(LAYOUTS)), data=st.data())
def test_conv_random_geometry_matches_naive(c, nd, layout, data):
    kernel = [data.draw(st.integers(1, 3)) for _ in range(nd)]
    padding = [data.draw(st.integers(0, k)) for k in kernel]
    stride = [data.draw(st.integers(1, 3))] * nd if data.draw(st.booleans()) else [1] * nd
    spatial = [data.draw(st.integers(max(1, k - 2 * p), 6)) for k, p in zip(kernel, padding)]
    x = rand(c, *spatial)
    W4, b = rand(2, c, *kernel), rand(2)
    with forced_layout(layout):
        got = K.linear_forward(conv_layer(kernel, stride, padding, out=2), W4.reshape(2, -1), b, x)
    np.testing.assert_allclose(got, naive_conv(x, W4, b, kernel, stride, padding), rtol=1e-5, atol=1e-5)


def test_conv_matches_torch():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    F = torch.nn.functional
    x, W4, b = rand(8, 17, 19), rand(6, 8, 3, 5), rand(6)
    for stride, padding in (((1, 1), (1, 2)), ((2, 3), (1, 0))):
        got = K.linear_forward(conv_layer((3, 5), stride, padding, out=6), W4.reshape(6, -1), b, x)
        want = F.conv2d(torch.from_numpy(x)[None], torch.from_numpy(W4), torch.from_numpy(b),
                        stride=stride, padding=padding)[0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_row_blocks_reassemble_the_full_layer():
    """Output splitting: the GEMMs of row blocks of W, stacked, are the full product."""
    x = rand(3, 9, 8)
    W, b = rand(10, 27), rand(10)
    lo = K.lower(conv_layer((3, 3), (1, 1), (1, 1), out=10), x)
    blocks = [slice(0, 4), slice(4, 7), slice(7, 10)]
    Y = np.concatenate([K.gemm(W[s], b[s], lo.X) for s in blocks])
    np.testing.assert_allclose(lo.finish(Y), lo.finish(K.gemm(W, b, lo.X)), rtol=1e-6, atol=1e-6)
    part = lo.finish(K.gemm(W[4:7], b[4:7], lo.X))
    assert part.shape == (3, 9, 8)


@pytest.mark.parametrize("shape,kernel,padding", [((2, 40, 45), (3, 3), (1, 1)),
                                                  ((2, 4, 9, 11), (3, 1, 2), (1, 0, 1)),
                                                  ((4, 20, 27), (1, 1), (0, 0))])
def test_lower_gemm_tiles_give_the_single_gemm(shape, kernel, padding, monkeypatch):
    """lower_gemm's column tiles (forced tiny here) compute exactly gemm(W, b, lower(x).X)."""
    monkeypatch.setattr(K, "TILE_BYTES", 1)          # the minimum tile: 256 columns
    monkeypatch.setattr(K, "UNTILED_BYTES", 0)
    x = rand(*shape)
    rows = shape[0] * math.prod(kernel)
    W, b = rand(6, rows), rand(6)
    layer = conv_layer(kernel, [1] * len(kernel), padding, out=6)
    lo = K.lower(layer, x)
    assert lo.X.shape[1] > 256 and lo.X.shape[1] % 256, "the case must span tiles and a remainder"
    want = K.gemm(W, b, lo.X)
    ws = K.Workspace()
    ws.take("X", 10 * rows * 256)[:] = np.nan     # stale scratch must not leak
    Y, tiled = K.lower_gemm(layer, W, b, x, workspace=ws)
    assert tiled.X is None and tiled.pitch == lo.pitch and tiled.out_spatial == lo.out_spatial
    np.testing.assert_allclose(Y, want, rtol=1e-6, atol=1e-6)
    Yr, _ = K.lower_gemm(layer, W[2:5], None, x, relu=True)   # a worker's row block, no bias
    np.testing.assert_allclose(Yr, np.maximum(W[2:5] @ lo.X, 0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tiled.finish(Y), naive_conv(x, W.reshape((6,) + shape[:1] + tuple(kernel)),
                                                          b, kernel, [1] * len(kernel), padding),
                               rtol=1e-5, atol=1e-5)


def test_lower_gemm_small_and_strided_layers_take_the_plain_path():
    x = rand(2, 9, 9)
    for stride in ((1, 1), (2, 2)):
        layer = conv_layer((3, 3), stride, (1, 1), out=3)
        W, b = rand(3, 18), rand(3)
        Y, lo = K.lower_gemm(layer, W, b, x)
        assert lo.X is not None
        np.testing.assert_array_equal(Y, K.gemm(W, b, K.lower(layer, x).X))


def test_lower_gemm_rejects_a_weight_block_of_the_wrong_width():
    with pytest.raises(ValueError, match="17 columns.*18 rows"):
        K.lower_gemm(conv_layer((3, 3), (1, 1), (1, 1)), rand(4, 17), None, rand(2, 9, 9))


def test_dense_lower_gemm_finish():
    x = rand(4, 3, 2)
    W, b = rand(7, 24), rand(7)
    layer = Layer("fc", "dense", ("input",), {"out": 7})
    lo = K.lower(layer, x)
    assert lo.X.shape == (24, 1) and lo.out_spatial == ()
    want = W.astype(np.float64) @ x.reshape(-1) + b
    np.testing.assert_allclose(K.linear_forward(layer, W, b, x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(K.gemm(W, None, lo.X)[:, 0], W.astype(np.float64) @ x.reshape(-1),
                               rtol=1e-5, atol=1e-6)
    # a non-contiguous row block (every other row) takes the general path, same values
    np.testing.assert_allclose(K.gemm(W[::2], b[::2], lo.X)[:, 0], want[::2], rtol=1e-5, atol=1e-6)


def test_lower_rejects_nonlinear_layer():
    with pytest.raises(ValueError, match="not linear"):
        K.lower(Layer("r", "relu", ("input",)), rand(2, 3, 3))


def test_im2col_rejects_mismatched_geometry():
    with pytest.raises(ValueError, match="needs 2 entries"):
        K.im2col(rand(2, 5, 5), (3, 3, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match=r"does not fit input shape \(2, 5, 2\)"):
        K.im2col(rand(2, 5, 2), (3, 3), (1, 1), (0, 0))
    with pytest.raises(ValueError, match="stride >= 1"):
        K.im2col(rand(2, 5, 5), (3, 3), (0, 1), (0, 0))


# ---------------------------------------------------------------- pools

POOL_CASES = [
    # (input shape, kernel, stride, padding)
    ((3, 8, 8), (2, 2), (2, 2), (0, 0)),
    ((2, 9, 7), (3, 3), (2, 2), (1, 1)),        # overlapping windows, padded
    ((2, 7, 8), (3, 2), (1, 2), (1, 0)),        # stride 1 on one axis
    ((2, 6, 6), (1, 1), (2, 2), (0, 0)),        # stride > kernel: subsampling
    ((2, 2, 7, 7), (2, 2, 2), (2, 2, 2), (0, 1, 1)),   # C3D pool5
    ((2, 4, 5, 6), (1, 2, 3), (1, 2, 2), (0, 1, 1)),
]


def pool_layer(op, kernel, stride, padding, **extra):
    return Layer("p", op, ("input",), dict(kernel=list(kernel), stride=list(stride),
                                           padding=list(padding), **extra))


@pytest.mark.parametrize("shape,kernel,stride,padding", POOL_CASES)
def test_maxpool_matches_naive(shape, kernel, stride, padding):
    x = rand(*shape) - 2.0   # all-negative values: a zero pad instead of -inf would show
    got = K.nonlinear(pool_layer("maxpool", kernel, stride, padding), [x])
    np.testing.assert_array_equal(got, naive_pool(x, kernel, stride, padding, "max").astype(np.float32))


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("shape,kernel,stride,padding", POOL_CASES)
def test_avgpool_matches_naive(shape, kernel, stride, padding, include):
    x = rand(*shape)
    layer = pool_layer("avgpool", kernel, stride, padding, count_include_pad=include)
    got = K.nonlinear(layer, [x])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, naive_pool(x, kernel, stride, padding, "avg", include),
                               rtol=1e-5, atol=1e-6)


def test_pools_do_not_modify_or_alias_their_input():
    x = rand(2, 4, 4)
    keep = x.copy()
    for op in ("maxpool", "avgpool"):
        y = K.nonlinear(pool_layer(op, (1, 1), (1, 1), (0, 0)), [x])
        assert not np.shares_memory(x, y)
        y[...] = 7
        np.testing.assert_array_equal(x, keep)


def test_pools_match_torch():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    F = torch.nn.functional
    x = rand(4, 13, 11)
    t = torch.from_numpy(x)[None]
    got = K.nonlinear(pool_layer("maxpool", (3, 3), (2, 2), (1, 1)), [x])
    np.testing.assert_array_equal(got, F.max_pool2d(t, 3, 2, 1)[0].numpy())
    got = K.nonlinear(pool_layer("avgpool", (3, 3), (2, 2), (1, 1), count_include_pad=False), [x])
    np.testing.assert_allclose(got, F.avg_pool2d(t, 3, 2, 1, count_include_pad=False)[0].numpy(),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- other nonlinear ops

@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(7, 3, 4), (4, 2, 3, 2), (6,)])
def test_lrn_matches_definition(size, shape):
    x = rand(*shape) * 3
    alpha, beta, k = 1e-2, 0.75, 2.0   # a large alpha so that the normaliser matters
    layer = Layer("n", "lrn", ("input",), {"size": size, "alpha": alpha, "beta": beta, "k": k})
    got = K.nonlinear(layer, [x])
    C = shape[0]
    want = np.empty(shape)
    for c in range(C):
        lo, hi = max(0, c - size // 2), min(C - 1, c + (size - 1) // 2)
        s = sum(x[j].astype(np.float64) ** 2 for j in range(lo, hi + 1))
        want[c] = x[c] / (k + alpha / size * s) ** beta
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lrn_matches_torch():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    x = rand(10, 5, 6) * 4
    layer = Layer("n", "lrn", ("input",), {"size": 5, "alpha": 1e-3, "beta": 0.75, "k": 2.0})
    want = torch.nn.functional.local_response_norm(torch.from_numpy(x)[None], 5, 1e-3, 0.75, 2.0)
    np.testing.assert_allclose(K.nonlinear(layer, [x]), want[0].numpy(), rtol=1e-5, atol=1e-6)


def test_softmax():
    x = np.array([1.0, 2.0, 3.0, -1.0], dtype=np.float32)
    e = np.exp(x.astype(np.float64))
    got = K.nonlinear(Layer("s", "softmax", ("input",)), [x])
    np.testing.assert_allclose(got, e / e.sum(), rtol=1e-6)
    big = np.array([1000.0, 1001.0, -1000.0], dtype=np.float32)   # must not overflow
    got = K.nonlinear(Layer("s", "softmax", ("input",)), [big])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, [1 / (1 + math.e), math.e / (1 + math.e), 0.0], rtol=1e-6, atol=1e-30)


def test_gap_relu_flatten_concat_add_identity():
    a, b = rand(3, 4, 5), rand(2, 4, 5)
    op = lambda name, *xs: K.nonlinear(Layer("l", name, tuple(f"i{i}" for i in range(len(xs)))), list(xs))  # noqa: E731
    np.testing.assert_allclose(op("gap", a), a.astype(np.float64).mean(axis=(1, 2)), rtol=1e-6)
    assert op("gap", a).dtype == np.float32
    np.testing.assert_array_equal(op("relu", a), np.where(a > 0, a, 0))
    np.testing.assert_array_equal(op("flatten", a[:, :, :3]), a[:, :, :3].reshape(-1))
    cat = op("concat", a, b)
    assert cat.shape == (5, 4, 5)
    np.testing.assert_array_equal(cat[:3], a)
    np.testing.assert_array_equal(cat[3:], b)
    c = rand(3, 4, 5)
    keep = a.copy()
    np.testing.assert_allclose(op("add", a, c, a), 2 * keep + c, rtol=1e-6)
    np.testing.assert_array_equal(a, keep)   # add must not write into its first input
    assert op("identity", a) is a


def test_batchnorm_folded_scale_shift():
    x = rand(3, 2, 2)
    layer = Layer("bn", "batchnorm", ("input",), {"scale": [1.0, 2.0, -1.0], "shift": [0.5, 0.0, 1.0]})
    want = x * np.array([1, 2, -1], np.float32)[:, None, None] + np.array([0.5, 0, 1], np.float32)[:, None, None]
    np.testing.assert_allclose(K.nonlinear(layer, [x]), want, rtol=1e-6)


def test_unknown_op_in_nonlinear_raises():
    layer = Layer("fc", "dense", ("input",), {"out": 3})
    with pytest.raises(ValueError, match="no kernel for op 'dense'"):
        K.nonlinear(layer, [rand(4)])


# ---------------------------------------------------------------- inputs, zoo, package

def test_bad_input_shape_names_expected_shape():
    model = get_model("lenet")
    weights = init_weights(model)
    with pytest.raises(ValueError, match=r"\(1, 28, 28\)"):
        K.forward(model, weights, np.zeros((28, 28), np.float32))
    with pytest.raises(ValueError, match=r"expects input of shape \(1, 28, 28\).*got \(2, 1, 28, 28\)"):
        K.check_input(model, np.zeros((2, 1, 28, 28), np.float32))


@pytest.mark.parametrize("bad", [np.zeros((1, 28, 28), np.complex64),
                                 np.full((1, 28, 28), "a"),
                                 np.zeros((1, 28, 28), object)])
def test_bad_input_dtype_raises(bad):
    with pytest.raises(ValueError, match="real-valued input"):
        K.check_input(get_model("lenet"), bad)


def test_input_with_batch_axis_and_integer_dtype_is_accepted():
    model = get_model("lenet")
    x = K.check_input(model, np.ones((1, 1, 28, 28), np.uint8))
    assert x.shape == (1, 28, 28) and x.dtype == np.float32 and x.flags.c_contiguous


def test_unknown_model_lists_the_zoo():
    with pytest.raises(UnknownModelError) as info:
        get_model("resnet9000")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "resnet9000" in message
    for name in model_names():
        assert name in message


@pytest.mark.parametrize("name", model_names())
def test_model_json_round_trip(name):
    model = get_model(name)
    text = model.to_json()
    json.loads(text)   # plain JSON
    again = Model.from_json(text)
    assert again == model
    assert again.shapes() == model.shapes()
    assert again.flops() == model.flops()


def test_model_json_rejects_unknown_layer_keys():
    d = json.loads(get_model("tiny").to_json())
    d["layers"][0]["colour"] = "blue"
    with pytest.raises(ValueError, match="colour"):
        Model.from_json(json.dumps(d))


def test_weights_are_deterministic_and_per_layer():
    model = get_model("lenet")
    a, b = init_weights(model, seed=7), init_weights(model, seed=7)
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0])
        assert a[name][0].shape == model.weight_shapes()[name] and a[name][0].dtype == np.float32
    W1, _ = layer_weights(model, "conv2", seed=7)
    np.testing.assert_array_equal(W1, a["conv2"][0])
    assert not np.array_equal(init_weights(model, seed=8)["conv2"][0], W1)


def test_forward_small_graph_by_hand():
    """A two-layer graph computed by hand: conv (1x1) then dense."""
    b = GraphBuilder("hand", (2, 2, 2))
    x = b.conv("input", 1, 1, name="c")
    b.dense(b.flatten(x, name="f"), 1, name="d")
    model = b.build()
    weights = {"c": (np.array([[1.0, -1.0]], np.float32), np.array([0.5], np.float32)),
               "d": (np.array([[1.0, 2.0, 3.0, 4.0]], np.float32), np.array([0.0], np.float32))}
    inp = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    conv = inp[0] - inp[1] + 0.5              # -3.5 everywhere
    want = float(np.dot([1, 2, 3, 4], conv.reshape(-1)))
    np.testing.assert_allclose(K.forward(model, weights, inp), [want], rtol=1e-6)


def _run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_is_quiet_and_starts_no_mpi():
    quiet = _run_python("import mpicdc")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""
    probe = _run_python("import sys, mpicdc, mpicdc.core.kernels, mpicdc.bench.kernels\n"
                        "print(sorted(m for m in ('mpi4py', 'torch') if m in sys.modules))")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]", f"import mpicdc imported {probe.stdout.strip()}"


def test_kernels_benchmark_runs_and_agrees_with_torch():
    """Smoke test of ``python -m mpicdc.bench kernels`` on the tiny model (no timing asserted)."""
    pytest.importorskip("torch", reason="torch is not installed")
    import os
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "mpicdc.bench", "kernels", "--models", "tiny",
                          "--repeat", "5", "--peak-size", "256"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert "re-running" not in run.stdout
    assert "sgemm 256^3" in run.stdout
    row = [line for line in run.stdout.splitlines() if line.startswith("| tiny |")]
    assert len(row) == 1, run.stdout
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert float(cells[-1]) <= 1e-4          # max rel err of the output against torch
    assert float(cells[2]) > 0 and float(cells[4]) > 0


def test_kernels_benchmark_rejects_bad_arguments():
    for args in (["--repeat", "3"], ["--models", "nope"]):
        run = subprocess.run([sys.executable, "-m", "mpicdc.bench", "kernels"] + args,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2
        assert ("at least 5" in run.stderr) or ("known models" in run.stderr)


def test_forward_timings_cover_every_layer():
    model = get_model("tiny")
    timings = {}
    K.forward(model, init_weights(model), K.default_input(model), timings=timings)
    assert set(timings) == {layer.name for layer in model.layers}
    assert all(t >= 0 for t in timings.values())
    assert timings["conv1_relu"] == 0.0      # fused into conv1 (its only reader)
    assert timings["conv1"] > 0


def test_kernels_benchmark_without_torch_times_mpicdc_only():
    import os
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    code = ("import sys; sys.modules['torch'] = None\n"   # makes 'import torch' fail
            "from mpicdc.bench import kernels\n"
            "sys.exit(kernels.main(['--models', 'lenet', '--repeat', '5', '--peak-size', '128']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert "torch is missing" in run.stdout
    row = [line for line in run.stdout.splitlines() if line.startswith("| lenet |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert float(cells[2]) > 0 and cells[4] == "-"
