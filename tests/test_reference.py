"""The serial reference forward of every zoo model against PyTorch, layer by layer.

mpicdc's numpy kernels (im2col + GEMM, tiled or not, separable pools, LRN, ...)
and an independent ``torch.nn.functional`` walk of the same graph
(:func:`mpicdc.bench.kernels.torch_forward`) run on the same He-initialised
weights and input.  Every layer's output must agree to a relative error
(max abs difference / max abs torch value) of at most 1e-4 in float32: deep
enough to catch a wrong window, pad, channel order or junk column, loose
enough for float32 summation-order differences (observed: about 2e-6).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: pip install torch==2.13.0")

from mpicdc.bench.kernels import torch_forward, torch_weights  # noqa: E402
from mpicdc.core.kernels import Workspace, default_input, forward  # noqa: E402
from mpicdc.core.models import get_model, model_names  # noqa: E402
from mpicdc.core.random_weights import init_weights  # noqa: E402

RTOL = 1e-4
SLOW = {"vgg16", "c3d", "alexnet", "inception_v3"}   # about a second or more each


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Keep torch from oversubscribing the (2-core) test machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref| (0 when both are all-zero)."""
    scale = float(np.abs(ref).max())
    diff = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    return diff if scale == 0.0 else diff / scale


def _params():
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
            for name in model_names()]


@pytest.fixture(scope="module", params=_params())
def case(request):
    """One zoo model with weights, input, and every layer's output from mpicdc and from torch.

    Module scope with a parameter: pytest runs both tests of one model back to
    back, so VGG16's and C3D's weights are generated once and dropped after.
    """
    name = request.param
    model = get_model(name)
    weights = init_weights(model, seed=1)
    x = default_input(model, seed=2)
    ours = forward(model, weights, x, return_all=True)
    ref = torch_forward(model, torch_weights(model, weights), torch.from_numpy(x), return_all=True)
    return model, weights, x, ours, {k: v.numpy()[0] for k, v in ref.items()}


def test_every_layer_matches_torch(case):
    model, _, _, ours, ref = case
    name = model.name
    assert set(ours) == set(ref) == {"input"} | {layer.name for layer in model.layers}
    shapes = model.shapes()
    errors = {}
    for layer in model.layers:
        got, want = ours[layer.name], ref[layer.name]
        assert got.dtype == np.float32, f"{name}/{layer.name}: dtype {got.dtype}"
        assert got.shape == want.shape == shapes[layer.name], \
            f"{name}/{layer.name}: shape {got.shape}, torch {want.shape}, model says {shapes[layer.name]}"
        assert np.isfinite(got).all(), f"{name}/{layer.name}: non-finite values"
        errors[layer.name] = rel_err(got, want)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{name}: layer {worst} relative error {errors[worst]:.2e} > {RTOL}"
    # the output is informative: not a constant (a dead network would pass trivially)
    assert np.ptp(ours[model.output]) > 0


def test_fast_path_output_equals_return_all(case):
    """forward() without return_all fuses ReLU in place and frees activations: same output, bit for bit.

    Also with a reused Workspace that holds another input's lowering: stale
    scratch contents (pads, junk columns) must never leak into a result.
    """
    model, weights, x, ours, _ = case
    ws = Workspace()
    forward(model, weights, default_input(model, seed=5) + 1, workspace=ws)
    np.testing.assert_array_equal(forward(model, weights, x, workspace=ws), ours[model.output])
    if model.name not in SLOW:   # the default (fresh workspace) path once more, where it is cheap
        np.testing.assert_array_equal(forward(model, weights, x), ours[model.output])


def test_tolerance_detects_a_wrong_layer():
    """The comparison is sharp enough to catch an off-by-one padding in one layer."""
    model = get_model("tiny")
    weights = init_weights(model, seed=1)
    x = default_input(model, seed=2)
    ref = torch_forward(model, torch_weights(model, weights), torch.from_numpy(x), return_all=True)
    W, b = torch_weights(model, weights)["conv1"]
    shifted = torch.nn.functional.conv2d(ref["input"], W, b, padding=1)[..., 1:, :]
    shifted = torch.nn.functional.pad(shifted, (0, 0, 0, 1))
    assert rel_err(shifted.numpy()[0], ref["conv1"].numpy()[0]) > 100 * RTOL
