"""The run CLI around the runtime: inputs, HDF5 output, bad input, and a launch without ULFM."""
from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from mpi_helpers import ROOT, requires_mpi, run_bounded, run_job

from mpicdc.core.kernels import forward
from mpicdc.core.models import get_model
from mpicdc.core.random_weights import init_weights
from mpicdc.runtime.launch import find_mpirun
from mpicdc.store import prepare_zoo

pytestmark = [requires_mpi, pytest.mark.mpi]


@pytest.fixture(scope="module")
def tiny_sum(tmp_path_factory):
    return prepare_zoo(tmp_path_factory.mktemp("cli"), "tiny", 2, 1, "sum")


def test_npy_input_and_hdf5_output_match_the_reference(tiny_sum, tmp_path):
    model = get_model("tiny")
    x = np.random.default_rng(5).standard_normal(model.input_shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.h5"
    job = run_job(4, ["tiny", "--weights", str(tiny_sum), "--input", str(tmp_path / "x.npy"), "--repeat", "2",
                      "--output", str(out)], tmp_path, output=False)
    assert job.returncode == 0, job.explain()
    expected = forward(model, init_weights(model, 0), x)
    with h5py.File(out, "r") as f:
        outputs = f["outputs"][...]
        assert f["ok"][...].all() and f["latency_ms"].shape == (2,)
    # sum parity decoding is one float32 subtraction per block: far below 1e-4 relative
    for y in outputs:
        assert np.max(np.abs(y - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_wrong_input_shape_is_a_clear_error(tiny_sum, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((3, 8, 8), np.float32))
    job = run_job(4, ["tiny", "--weights", str(tiny_sum), "--input", str(tmp_path / "bad.npy")], tmp_path,
                  output=False)
    assert job.returncode == 2, job.explain()
    assert "array of shape (3, 8, 8), but model 'tiny' takes (3, 16, 16)" in job.stderr, job.explain()


def test_unknown_model_lists_the_zoo(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpicdc.run", "resnet999"], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert proc.returncode == 2
    assert "unknown model 'resnet999'" in proc.stderr and "vgg16" in proc.stderr


def test_without_ulfm_warns_and_still_mitigates_stragglers(tiny_sum, tmp_path):
    """ULFM off (a venv built by `make venv` turns it on, so say so): a start-up warning, and a straggler is
    still decoded around."""
    cmd = [find_mpirun(), "-np", "4", "--oversubscribe", "--bind-to", "none", "--mca", "mpi_ft_enable", "0"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, "-m", "mpicdc.run", "tiny", "--weights", str(tiny_sum), "--repeat", "3", "--check",
            "--inject", "delay:1:const:0.2"]
    proc = run_bounded(cmd, tmp_path, 120, str(tiny_sum))
    assert proc.returncode == 0, proc.explain()
    assert "fault tolerance is OFF" in proc.stderr
    assert "MATCHED" in proc.stdout
    assert "did not wait for late rank(s): 1 (" in proc.stdout  # rank 1 is slow, not dead
    assert "rank 1 failed" not in proc.stderr

