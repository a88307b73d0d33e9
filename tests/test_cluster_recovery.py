"""The recovery experiment's ``--cluster`` mode, quick, on one fault kind: a power-off of device 2.

In-job decoding (daemons on the head) must answer every request, matched, with the request hit by
the fault answered long before the detector's verdict (it never waits for detection); the
supervisor's relaunch of the uncoded job must answer every request too, the hit one late.
"""
from __future__ import annotations

import pytest
from mpi_helpers import requires_cluster, requires_mpi

from mpicdc.cluster.netns import list_netns
from mpicdc.experiments import common, recovery

pytestmark = [requires_mpi, pytest.mark.mpi, pytest.mark.cluster, pytest.mark.slow, requires_cluster]


def test_power_off_in_job_decoding_against_supervisor_relaunch(tmp_path):
    before = set(list_netns())
    out = tmp_path / "out"
    code = recovery.main(["--cluster", "--quick", "--faults", "power_off", "--systems", "cdc-head,relaunch",
                          "--out", str(out), "--weights-dir", str(tmp_path / "weights")])
    text = (out / "summary.txt").read_text()
    assert code == 0, text
    rows = {r["system"]: r for r in common.read_csv(out / "runs.csv")}
    assert set(rows) == {"cdc-head", "relaunch"}, rows
    for r in rows.values():
        assert r["answered"] == r["requests"] == "200" and r["matched"] == "1", (r, text)
        assert r["exit_code"] == "0", (r, text)
    cdc, sup = rows["cdc-head"], rows["relaunch"]
    # in-job decoding: the hit request was served in the job, before the detector spoke (~2 s)
    assert cdc["hit_in_job"] == "1" and cdc["attempts"] == "1", (cdc, text)
    assert cdc["detect_s"] and 1.0 < float(cdc["detect_s"]) < 15.0, (cdc, text)
    assert float(cdc["hit_ms"]) < 1e3 * float(cdc["detect_s"]) / 2, (cdc, text)
    # relaunch: the uncoded job ended, the supervisor relaunched, the hit request answered late
    assert sup["hit_in_job"] == "0" and sup["attempts"] == "2", (sup, text)
    assert float(sup["hit_ms"]) > float(sup["median_ms"]), (sup, text)
    assert "power_off" in text and "cdc-head" in text and "200/200" in text, text
    assert not [ns for ns in set(list_netns()) - before if ns.startswith("cr")], list_netns()
