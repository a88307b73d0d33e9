"""The plan checks itself against the model; range lists parse and format both ways."""
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpicdc.core.codes import make_code, parse_code_spec
from mpicdc.core.models import get_model
from mpicdc.core.plan import Plan, make_plan, parity_count
from mpicdc.core.ranges import format_ranges, parse_ranges


def _with_layer(plan: Plan, **changes) -> Plan:
    """``plan`` with its first layer plan changed."""
    first = dataclasses.replace(plan.layers[0], **changes)
    return dataclasses.replace(plan, layers=(first,) + plan.layers[1:])


def test_make_plan_output_validates():
    model = get_model("tiny")
    for code, parity in (("none", None), ("sum", None), ("mds", 2), ("groups:2", None)):
        make_plan(model, 3, parity, code).validate(model)


@pytest.mark.parametrize("changes, message", [
    ({"rows": ((0, 2), (2, 4), (4, 6))}, r"'conv1' \(8 rows\).*row blocks end at row 6, but there are 8"),
    ({"rows": ((0, 3), (4, 6), (6, 8))}, r"'conv1'.*row blocks \[\(0, 3\), \(4, 6\).*tiling"),
    ({"ranks": (1, 1, 3, 4)}, r"'conv1'.*ranks \[1, 1, 3, 4\].*distinct"),
    ({"ranks": (1, 2, 3, 9)}, r"'conv1'.*ranks \[1, 2, 3, 9\].*in 1\.\.4"),
    ({"layer": "relu1"}, r"'relu1' is not a linear layer of tiny"),
    ({"code": "replication:5"}, r"'conv1': code 'replication:5' cannot be built for n=3 data and r=1 "
                                r"parity blocks.*\[5\] are not data blocks 0\.\.2"),
])
def test_plan_validate_rejects_what_does_not_fit_the_model(changes, message):
    model = get_model("tiny")
    plan = make_plan(model, 3, None, "sum")
    bad = _with_layer(plan, **changes)
    with pytest.raises(ValueError, match=message) as info:
        bad.validate(model)
    assert "make_plan" in str(info.value) or "cannot be built" in str(info.value)


def test_plan_validate_names_the_model_and_repeated_layers():
    model = get_model("tiny")
    plan = make_plan(model, 2, None, "sum")
    with pytest.raises(ValueError, match="plan is for model 'tiny', not 'lenet'"):
        plan.validate(get_model("lenet"))
    twice = dataclasses.replace(plan, layers=plan.layers + plan.layers[:1])
    with pytest.raises(ValueError, match="more than once"):
        twice.validate(model)


# ---------------------------------------------------------------------- one code grammar

@pytest.mark.parametrize("spec, n, r", [
    ("none", 4, 0), ("sum", 4, 1), ("groups:2", 4, 2), ("groups:0-1/2-3", 4, 2),
    ("replication:0,2", 4, 2), ("replication:0-2", 4, 3), ("mds", 4, 2), ("mds-cauchy", 4, 2),
])
def test_plan_and_codes_agree_on_the_parity_count(spec, n, r):
    assert make_code(spec, n, parity_count(spec, r)).r == r
    if parse_code_spec(spec).parity is not None:
        assert parity_count(spec, None) == r


@pytest.mark.parametrize("spec", ["fountain", "groups", "none:1", "mds-reed", "groups:a-b", "replication:3-1"])
def test_bad_code_specs_fail_the_same_way_in_plan_and_codes(spec):
    with pytest.raises(ValueError) as from_plan:
        parity_count(spec, 2)
    with pytest.raises(ValueError) as from_codes:
        make_code(spec, 4, 2)
    assert str(from_plan.value) == str(from_codes.value)
    assert "expected" in str(from_codes.value)


# ---------------------------------------------------------------------- one range parser

@given(st.lists(st.integers(0, 300), unique=True).map(sorted).filter(bool))
def test_parse_ranges_inverts_format_ranges(values):
    assert parse_ranges(format_ranges(values)) == values


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 5)), min_size=1))
def test_format_ranges_of_parsed_runs_is_canonical(runs):
    text = ",".join(f"{a}-{a + k}" if k else str(a) for a, k in runs)
    values = parse_ranges(text)
    assert values == [x for a, k in runs for x in range(a, a + k + 1)]
    canonical = sorted(set(values))
    assert parse_ranges(format_ranges(canonical)) == canonical


@pytest.mark.parametrize("text, message", [
    ("3-1", "range '3-1' runs backwards"), ("1,x", "'x' is not a number"), ("", "'' is not"),
    ("1,,2", "'' is not"), ("-1", "'-1' is not"), ("1-", "'1-' is not"), ("²", "'²' is not"),
    ("1-2-3", "'1-2-3' is not"),
])
def test_parse_ranges_rejects_junk_and_backwards_runs(text, message):
    with pytest.raises(ValueError, match=message):
        parse_ranges(text)


def test_parse_ranges_allows_spaces_and_keeps_order():
    assert parse_ranges(" 5, 0 - 2 ,4") == [5, 0, 1, 2, 4]
