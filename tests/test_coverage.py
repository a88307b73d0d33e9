"""Device-coverage planner (the paper's Fig. 3): hand-computed cases and the five distributions."""
import json

import pytest

from mpicdc.core.models import get_model
from mpicdc.sim.coverage import (
    DISTRIBUTIONS,
    Distribution,
    Part,
    additions,
    coverage_curve,
    devices_for_full_coverage,
    main,
    part_loads,
)


def small():
    # device 1 alone, devices 2-4 split one layer: N = 4
    return Distribution("small", "alexnet", 4, (Part(["conv1"], [1]), Part(["fc6"], [2, 3, 4])))


def test_hand_computed_small_case():
    d = small()
    assert coverage_curve(d, "2mr") == [0, 0.25, 0.5, 0.75, 1.0]
    assert coverage_curve(d, "cdc+2mr") == [0, 0.75, 1.0, 1.0, 1.0]   # the parity first: covers 3
    assert devices_for_full_coverage(d, "2mr") == 4
    assert devices_for_full_coverage(d, "CDC") == 2
    assert additions(d, "cdc+2mr") == [("parity of devices (2, 3, 4)", (2, 3, 4)),
                                       ("replica of device 1", (1,))]
    # added devices may fail too: (covered + k) / (N + k)
    assert coverage_curve(d, "2mr", population="all") == pytest.approx([0, 2 / 5, 4 / 6, 6 / 7, 8 / 8])
    assert coverage_curve(d, "cdc+2mr", extra=2, population="all") == pytest.approx([0, 4 / 5, 6 / 6])


def test_two_groups_and_solo_greedy_order():
    d = Distribution("g", "alexnet", 6, (Part(["conv1"], [1, 2]), Part(["conv2"], [3]),
                                          Part(["fc6"], [4, 5, 6])))
    assert coverage_curve(d, "cdc+2mr", extra=3) == pytest.approx([0, 3 / 6, 5 / 6, 1.0])
    assert coverage_curve(d, "2mr", extra=2) == pytest.approx([0, 1 / 6, 2 / 6])
    assert devices_for_full_coverage(d, "cdc+2mr") == 3


def test_all_solo_makes_cdc_no_better():
    d = Distribution("solo", "alexnet", 3, tuple(Part([f"conv{i}"], [i]) for i in (1, 2, 3)))
    assert coverage_curve(d, "cdc+2mr") == coverage_curve(d, "2mr")


@pytest.mark.parametrize("parts, fragment", [
    ((Part(["a"], [1]), Part(["b"], [1, 2])), "runs both"),
    ((Part(["a"], [1]),), r"devices \[2\] run nothing"),
    ((Part(["a"], [1, 3]), Part(["b"], [2])), "outside 1..2"),
])
def test_invalid_distributions(parts, fragment):
    with pytest.raises(ValueError, match=fragment):
        Distribution("bad", "alexnet", 2, parts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        coverage_curve(small(), "3mr")
    with pytest.raises(ValueError, match="unknown distribution"):
        coverage_curve("resnet-4", "2mr")
    with pytest.raises(ValueError, match="unknown population"):
        coverage_curve(small(), "2mr", population="some")


def test_paper_distributions_cover_their_models():
    sizes = {"alexnet-5": 5, "actionrec-8": 8, "c3d-7": 7, "c3d-9": 9, "vgg16-8": 8}
    assert {k: d.devices for k, d in DISTRIBUTIONS.items()} == sizes
    for d in DISTRIBUTIONS.values():
        linear = [l.name for l in get_model(d.model).linear_layers]
        in_parts = [l for p in d.parts for l in p.layers]
        assert in_parts == linear, d.name  # every linear layer once, in graph order
        assert len(part_loads(d)) == len(d.parts)


def test_paper_distributions_cdc_needs_fewer_devices():
    for d in DISTRIBUTIONS.values():
        c2, cc = coverage_curve(d, "2mr"), coverage_curve(d, "cdc+2mr")
        assert c2[0] == cc[0] == 0 and c2[-1] == cc[-1] == 1
        assert all(a <= b for a, b in zip(c2, c2[1:])) and all(a <= b for a, b in zip(cc, cc[1:]))
        assert all(b >= a for a, b in zip(c2, cc))
        assert devices_for_full_coverage(d, "cdc+2mr") < devices_for_full_coverage(d, "2mr") == d.devices


def test_cli_json(capsys):
    assert main(["--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    row = {r["name"]: r for r in table}["alexnet-5"]
    assert (row["full_2mr"], row["full_cdc_2mr"]) == (5, 3)
    assert row["curve_cdc_2mr"] == pytest.approx([0, 0.4, 0.8, 1, 1, 1])
    assert main(["--parts"]) == 0
    assert "VGG16 on 8 devices" in capsys.readouterr().out
