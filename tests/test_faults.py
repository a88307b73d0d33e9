"""Delay models and failure injection specs: parsing, errors, and sampled statistics."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpicdc.core.faults import (
    DELAY_HELP,
    INJECT_HELP,
    ConstDelay,
    EmpiricalDelay,
    Injection,
    MixtureDelay,
    ParetoDelay,
    ShiftedExpDelay,
    parse_delay,
    parse_injection,
    parse_injections,
)

N = 200_000  # samples for moment checks; tolerances are 5 standard errors


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("spec, model", [
    ("none", ConstDelay(0.0)),
    ("const:0.25", ConstDelay(0.25)),
    ("shexp:0.01,0.02", ShiftedExpDelay(0.01, 0.02)),
    ("pareto:0.005,1.5", ParetoDelay(0.005, 1.5)),
    (" SHEXP:0,1 ", ShiftedExpDelay(0.0, 1.0)),
])
def test_parse_delay_kinds_and_spec_round_trip(spec, model):
    parsed = parse_delay(spec)
    assert parsed == model
    assert parse_delay(parsed.spec) == parsed
    assert parse_delay(parsed) is parsed


def test_sample_returns_float_or_array_and_is_nonnegative():
    for spec in ("none", "const:0.5", "shexp:0.1,0.2", "pareto:0.01,2", "mix:1*none+3*const:2", "wifi:0.05"):
        model = parse_delay(spec)
        one = model.sample(rng())
        assert isinstance(one, float) and one >= 0, spec
        many = model.sample(rng(), (3, 4))
        assert many.shape == (3, 4) and many.dtype == float and np.all(many >= 0), spec


def test_const_is_exact():
    assert np.all(parse_delay("const:0.125").sample(rng(), 10) == 0.125)
    assert parse_delay("const:0.125").mean() == 0.125


def test_shifted_exponential_moments():
    model = parse_delay("shexp:0.01,0.02")
    x = model.sample(rng(), N)
    assert x.min() >= 0.01
    # mean 0.03, standard deviation 0.02
    assert abs(x.mean() - 0.03) < 5 * 0.02 / math.sqrt(N)
    assert model.mean() == pytest.approx(0.03)
    assert abs(np.mean(x <= 0.03) - float(model.cdf(0.03))) < 5 * 0.5 / math.sqrt(N)


def test_pareto_tail_and_mean():
    model = parse_delay("pareto:0.005,1.5")
    x = model.sample(rng(1), N)
    assert x.min() >= 0.005
    for q in (0.01, 0.05):
        expected = (0.005 / q) ** 1.5
        assert abs(np.mean(x > q) - expected) < 5 * math.sqrt(expected * (1 - expected) / N)
    assert model.mean() == pytest.approx(1.5 * 0.005 / 0.5)
    assert parse_delay("pareto:1,1").mean() == math.inf


def test_mixture_normalises_weights_and_mixes():
    model = parse_delay("mix:1*none+3*const:2")
    assert model.weights == (0.25, 0.75)
    assert model.mean() == pytest.approx(1.5)
    x = model.sample(rng(), N)
    assert set(np.unique(x)) == {0.0, 2.0}
    assert abs(np.mean(x == 0) - 0.25) < 5 * math.sqrt(0.25 * 0.75 / N)
    assert parse_delay(model.spec) == model
    # exponents with a plus sign do not split a mixture term
    assert parse_delay("mix:1*const:1e+1").mean() == 10


def test_empirical_lines_and_csv(tmp_path):
    lines = tmp_path / "d.txt"
    lines.write_text("# measured\n0.1\n0.2\n\n0.3\n")
    model = parse_delay(f"empirical:{lines}")
    assert isinstance(model, EmpiricalDelay) and model.mean() == pytest.approx(0.2)
    assert set(np.unique(model.sample(rng(), 1000))) == {0.1, 0.2, 0.3}
    table = tmp_path / "d.csv"
    table.write_text("rank,delay_s\n1,0.5\n2,1.5\n")
    assert parse_delay(f"empirical:{table}").mean() == pytest.approx(1.0)
    assert parse_delay(f"empirical:{table}").spec == f"empirical:{table}"


@pytest.mark.parametrize("spec, fragment", [
    ("const", "expected 1 number(s)"),
    ("const:-1", "finite and >= 0"),
    ("const:abc", "must be numbers"),
    ("shexp:1", "expected 2 number(s)"),
    ("shexp:-1,2", "SHIFT >= 0"),
    ("pareto:0,2", "SCALE > 0"),
    ("pareto:1,0", "ALPHA > 0"),
    ("pareto:1,inf", "finite"),
    ("gamma:1,2", "unknown delay model"),
    ("mix:none", "WEIGHT*SPEC"),
    ("mix:1*bogus:1", "unknown delay model"),
    ("empirical:", "file path"),
    ("empirical:/nonexistent/file.txt", "cannot be read"),
])
def test_bad_delay_specs_quote_spec_and_grammar(spec, fragment):
    with pytest.raises(ValueError) as err:
        parse_delay(spec)
    text = str(err.value)
    assert fragment in text
    assert "delay model specs" in text
    assert "bad delay spec" in text


def test_bad_empirical_files(tmp_path):
    (tmp_path / "neg.txt").write_text("0.1\n-0.2\n")
    (tmp_path / "nocol.csv").write_text("rank,seconds\n1,0.5\n")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    for name, fragment in (("neg.txt", ">= 0"), ("nocol.csv", "delay_s"), ("empty.txt", "no delays")):
        with pytest.raises(ValueError, match=fragment):
            parse_delay(f"empirical:{tmp_path / name}")


@settings(max_examples=50, deadline=None)
@given(shift=st.floats(0, 10), mean=st.floats(1e-6, 10), alpha=st.floats(0.1, 10))
def test_spec_round_trip_property(shift, mean, alpha):
    for model in (ShiftedExpDelay(shift, mean), ParetoDelay(mean, alpha), ConstDelay(shift)):
        assert parse_delay(model.spec) == model


# --------------------------------------------------------------------------------------------
# injections


def test_parse_injection_kinds():
    d = parse_injection("delay:1-3:shexp:0.01,0.02")
    assert (d.kind, d.ranks, d.delay) == ("delay", (1, 2, 3), ShiftedExpDelay(0.01, 0.02))
    assert parse_injection("delay:2:pareto:0.005,1.5").ranks == (2,)
    assert parse_injection("delay:1,4:none").ranks == (1, 4)
    assert parse_injection("delay:2-3,7:none").ranks == (2, 3, 7)
    assert parse_injection("delay:all:const:1").ranks == ()
    c = parse_injection("crash:2@5")
    assert (c.kind, c.ranks, c.request, c.layer) == ("crash", (2,), 5, None)
    h = parse_injection("hang:3@0:fc6")
    assert (h.kind, h.ranks, h.request, h.layer) == ("hang", (3,), 0, "fc6")
    e = parse_injection("exit:1@2")
    assert (e.kind, e.exit_code) == ("exit", 3)
    e = parse_injection("exit:1@2:conv1=7")
    assert (e.request, e.layer, e.exit_code) == (2, "conv1", 7)


@pytest.mark.parametrize("spec, fragment", [
    ("boom:1@2", "unknown kind"),
    ("delay:1", "delay:RANKS:MODEL"),
    ("delay:1:gamma:1", "unknown delay model"),
    ("delay:0:const:1", "rank 0 is the master"),
    ("crash:0@1", "rank 0 is the master"),
    ("crash:3-1@1", "runs backwards"),
    ("crash:x@1", "rank list"),
    ("crash:2", "RANKS@REQ"),
    ("crash:2@-1", "negative"),
    ("crash:2@soon", "not an integer"),
    ("crash:2@1=4", "only exit takes =CODE"),
    ("exit:2@1=x", "not an integer"),
    ("exit:2@1=300", "outside 0..255"),
])
def test_bad_injection_specs_quote_spec_and_grammar(spec, fragment):
    with pytest.raises(ValueError) as err:
        parse_injection(spec)
    assert fragment in str(err.value)
    assert repr(spec) in str(err.value)
    assert "injection specs" in str(err.value)


def test_delay_for_last_spec_wins():
    inj = parse_injections(["delay:all:const:1", "delay:2:const:5", "crash:3@1"])
    assert inj.delay_for(1) == ConstDelay(1.0)
    assert inj.delay_for(2) == ConstDelay(5.0)
    assert parse_injections([]).delay_for(1) is None


def test_action_for_fires_at_request_and_layer():
    inj = parse_injections(["crash:2@5", "hang:3@1:fc7", "exit:4@0=9"])
    assert inj.action_for(2, 4, "conv1", True) is None
    assert inj.action_for(2, 5, "conv1", False) is None        # not its first layer of request 5
    assert inj.action_for(2, 5, "conv1", True).kind == "crash"
    assert inj.action_for(2, 6, "fc8", False).kind == "crash"  # missed request 5: fires later
    assert inj.action_for(3, 1, "fc6", False) is None
    assert inj.action_for(3, 1, "fc7", False).kind == "hang"
    assert inj.action_for(4, 0, "conv1", True).exit_code == 9
    assert inj.action_for(1, 9, "conv1", True) is None
    both = parse_injections(["crash:2@5", "hang:2@3"])
    assert both.action_for(2, 7, "x", True).kind == "hang"    # earliest request wins


def test_validate_world_size_and_layers():
    inj = parse_injections(["crash:3@1", "delay:1-2:none"])
    assert inj.validate(4) is inj
    with pytest.raises(ValueError, match=r"\[3\] outside the workers 1..2"):
        inj.validate(3)
    with pytest.raises(ValueError, match="unknown layer 'fc9'"):
        parse_injections(["hang:1@0:fc9"]).validate(4, ["fc6", "fc7"])
    with pytest.raises(ValueError, match="at least one worker"):
        parse_injections(["delay:all:none"]).validate(1)


def test_injection_is_frozen_and_help_strings_exist():
    inj = parse_injection("crash:2@5")
    with pytest.raises(AttributeError):
        inj.kind = "hang"
    assert isinstance(inj, Injection)
    assert "crash:RANKS@REQ" in INJECT_HELP and "shexp:SHIFT,MEAN" in DELAY_HELP
    assert isinstance(parse_delay("wifi:0.05"), MixtureDelay)
