"""Link rates, the bytes a plan queues on the master's link, the detector scaled to them, and the
relay's pure parts (no MPI, no namespaces).  References are computed by hand from the layer shapes."""
from __future__ import annotations

import json
import os

import pytest

from mpicdc.cluster import relay, tunnel
from mpicdc.core.models import get_model
from mpicdc.core.plan import make_plan
from mpicdc.core.traffic import link_backlog_bytes, rate_bits
from mpicdc.runtime.mpienv import DETECTOR_DEFAULTS, detector_for_link


@pytest.mark.parametrize("text, bits", [("20mbit", 20e6), ("500kbit", 5e5), ("1gbit", 1e9), ("64", 64.0),
                                        (" 2.5Mbit ", 2.5e6), ("1mibit", 1 << 20)])
def test_rate_bits_reads_tc_units(text, bits):
    assert rate_bits(text) == bits


@pytest.mark.parametrize("bad", ["fast", "20 mbps", "-3mbit", "0mbit", ""])
def test_rate_bits_rejects_nonsense_saying_how(bad):
    with pytest.raises(ValueError, match="use e.g. 20mbit"):
        rate_bits(bad)


def test_vgg16_backlog_is_conv1_2s_input_sent_to_all_five_ranks():
    model = get_model("vgg16")
    plan = make_plan(model, 4, 1, "sum")
    # conv1_2's input is 64 x 224 x 224 float32, sent whole to 4 data + 1 parity ranks at once
    assert link_backlog_bytes(model, plan) == 5 * 64 * 224 * 224 * 4


def test_backlog_counts_replies_when_they_outweigh_the_jobs():
    from mpicdc.core.models import GraphBuilder
    b = GraphBuilder("widen", (1, 8, 8))
    b.conv("input", 64, 1, name="c")  # input 64 floats x 2 ranks; output 64 rows x 64 cols, 32 rows per rank
    model = b.build()
    plan = make_plan(model, 2, None, "none")
    assert link_backlog_bytes(model, plan) == 2 * 32 * 64 * 4


def test_detector_timeout_covers_twice_the_queue_at_the_link_rate():
    got = detector_for_link(20e6, 5 * 64 * 224 * 224 * 4)  # VGG16 over 20 Mbit/s: 25.7 s of queue
    assert float(got["OMPI_MCA_mpi_ft_detector_timeout"]) == pytest.approx(2 * 25.69 + 2, abs=0.1)
    assert float(got["OMPI_MCA_mpi_ft_detector_period"]) == 1.0
    # Open MPI wants timeout > 3 x period
    assert float(got["OMPI_MCA_mpi_ft_detector_timeout"]) > 3 * float(got["OMPI_MCA_mpi_ft_detector_period"])


def test_detector_never_below_the_defaults_on_fast_links():
    got = detector_for_link(1e9, 10_000)
    for key in ("OMPI_MCA_mpi_ft_detector_period", "OMPI_MCA_mpi_ft_detector_timeout"):
        assert float(got[key]) == float(DETECTOR_DEFAULTS[key])
    with pytest.raises(ValueError):
        detector_for_link(0, 1)


def test_scale_detector_keeps_values_the_user_exported(monkeypatch):
    from mpicdc.runtime.linkscale import scale_detector
    monkeypatch.setenv("OMPI_MCA_mpi_ft_detector_timeout", "99")
    monkeypatch.setenv("OMPI_MCA_mpi_ft_detector_period", "")  # so monkeypatch restores it after the test
    monkeypatch.delenv("OMPI_MCA_mpi_ft_detector_period")
    note, seconds = scale_detector("20mbit", "vgg16", None, "sum", None, 6)
    assert os.environ["OMPI_MCA_mpi_ft_detector_timeout"] == "99"
    assert os.environ["OMPI_MCA_mpi_ft_detector_period"] == "1"
    assert "64.2 MB" in note and "kept the exported OMPI_MCA_mpi_ft_detector_timeout" in note
    assert seconds == 53.4  # what the link needs, whatever the user exported


def test_pmix_uri_repointed_at_the_tunnel():
    uri = "prterun-vm-2044@0.0;tcp4://127.0.0.1:60951"
    env = {"PMIX_SERVER_URI41": uri, "PMIX_SERVER_URI2": uri, "PMIX_RANK": "3", "OTHER": "tcp4://127.0.0.1:60951"}
    assert tunnel.pmix_port(env) == 60951
    out = tunnel.repoint_pmix(env, 4242)
    assert out["PMIX_SERVER_URI41"] == out["PMIX_SERVER_URI2"] == "prterun-vm-2044@0.0;tcp4://127.0.0.1:4242"
    assert out["OTHER"] == env["OTHER"] and out["PMIX_RANK"] == "3"
    with pytest.raises(LookupError, match="started by mpirun"):
        tunnel.pmix_port({"PMIX_SERVER_URI4": "x;tcp4://10.0.0.1:5"})


def test_relay_places_rank_r_on_device_r_minus_1(tmp_path):
    nodes = [{"name": "head", "address": "10.1.1.1"}] + [{"name": f"d{i}", "address": f"10.1.1.{10 + i}"}
                                                        for i in range(3)]
    (tmp_path / "cluster.json").write_text(json.dumps({"nodes": nodes}))
    assert relay.device_of_rank(str(tmp_path), 0) is None
    assert relay.device_of_rank(str(tmp_path), 3)["address"] == "10.1.1.12"
    with pytest.raises(LookupError, match="has no device"):
        relay.device_of_rank(str(tmp_path), 4)


def test_frames_round_trip():
    import asyncio

    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(tunnel.frame(tunnel.DATA, 7, b"abc") + tunnel.frame(tunnel.PING))
        reader.feed_eof()
        first, second = await tunnel.read_frame(reader), await tunnel.read_frame(reader)
        with pytest.raises(asyncio.IncompleteReadError):
            await tunnel.read_frame(reader)
        return first, second

    assert asyncio.run(go()) == ((tunnel.DATA, 7, b"abc"), (tunnel.PING, 0, b""))


def test_run_refuses_a_bad_link_rate_before_starting_mpi(capsys):
    from mpicdc.run import main
    assert main(["tiny", "--link", "fast"]) == 2
    assert "bad rate 'fast': use e.g. 20mbit" in capsys.readouterr().err
    assert main(["tiny", "--link", "20mbit", "--layer-timeout", "0"]) == 2
    assert "--layer-timeout must be a positive number of seconds" in capsys.readouterr().err
