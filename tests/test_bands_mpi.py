"""Band-split layers on real mpiexec ranks: a worker SIGKILLed mid-request, decoded around, checked
against the serial forward (``run --check``)."""
from __future__ import annotations

import pytest
from mpi_helpers import requires_mpi, run_job

from mpicdc import store
from mpicdc.core.models import get_model
from mpicdc.core.plan import make_plan

pytestmark = [requires_mpi, pytest.mark.mpi]


def _decoded(job, layer: str) -> list:
    return [rec["decoded_blocks"] for r in job.results["requests"] for rec in r["layers"] if rec["layer"] == layer]


def test_alexnet_auto_plan_with_master_bands_survives_a_crash_and_matches_the_reference(tmp_path):
    from mpicdc.store.prepare_cli import main as prepare_main

    folder = tmp_path / "auto"
    assert prepare_main(["alexnet", "--workers", "4", "--code", "sum", "--plan", "auto", "--link", "100mbit",
                         "--dir", str(folder), "-q"]) == 0
    plan = store.open_manifest(folder).plan
    banded = [lp.layer for lp in plan.layers if lp.banded]
    assert "conv2" in banded and plan.for_layer("conv2").master_rows, plan.to_json()  # the master computes a band
    job = run_job(6, ["alexnet", "--weights", str(folder), "--repeat", "3", "--check",
                      "--inject", "crash:2@1:conv2"], tmp_path, timeout=300)
    assert job.returncode == 0, job.explain()
    assert "check: MATCHED" in job.stdout, job.explain()
    assert job.results["dead_ranks"] == [2]
    assert all(r["ok"] for r in job.results["requests"])
    assert _decoded(job, "conv2")[1:] == [[1], [1]], job.explain()  # rank 2 holds band 1, lost from request 1 on
    assert all(rec["master_ms"] > 0 for r in job.results["requests"] for rec in r["layers"]
               if plan.for_layer(rec["layer"]).master_rows), job.explain()


def test_alexnet_bands_under_mds_r2_survive_two_crashes(tmp_path_factory, tmp_path):
    model = get_model("alexnet")
    convs = [layer.name for layer in model.linear_layers if layer.op == "conv"]
    plan = make_plan(model, 4, 2, "mds", bands=convs, keep_on_master=["fc6", "fc7", "fc8"])
    folder = store.ensure_prepared(model, plan, tmp_path_factory.getbasetemp() / "alexnet-bands-mds")
    job = run_job(7, ["alexnet", "--weights", str(folder), "--repeat", "2", "--check",
                      "--inject", "crash:1@1:conv3", "--inject", "crash:3@1:conv3"], tmp_path, timeout=300)
    assert job.returncode == 0, job.explain()
    assert "check: MATCHED" in job.stdout, job.explain()
    assert job.results["dead_ranks"] == [1, 3]
    assert _decoded(job, "conv4")[1] == [0, 2], job.explain()
