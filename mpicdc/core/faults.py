"""Straggler delay models and failure injection, shared by the MPI runtime and the simulator.

Two small languages, both parsed here and nowhere else:

* a **delay model** spec (``--delay``) says how long a reply is held back on top of
  the compute time, e.g. ``shexp:0.01,0.02`` (see :data:`DELAY_HELP`);
* an **injection** spec (``--inject``, repeatable) makes chosen worker ranks slow,
  crash, hang, exit or send corrupted values at a chosen request and layer (see
  :data:`INJECT_HELP`).

Everything is pure: a delay model only draws numbers from the ``numpy`` generator
it is given, and :class:`Injections` only answers questions ("which delay model
does rank 3 use?", "does anything fire for rank 2 at request 5, layer fc6?").
The runtime acts on the answers (sleep, ``SIGKILL``, stop replying, ``exit``);
the simulator turns them into arrival times.  Every malformed spec raises
:class:`ValueError` quoting the spec and showing the grammar.
"""
from __future__ import annotations

import csv
import io
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mpicdc.core.ranges import parse_ranges

__all__ = ["DelayModel", "ConstDelay", "ShiftedExpDelay", "ParetoDelay", "EmpiricalDelay",
           "MixtureDelay", "parse_delay", "Injection", "Injections", "parse_injection",
           "parse_injections", "DELAY_HELP", "INJECT_HELP", "INJECTION_KINDS", "CORRUPTION_KINDS",
           "corrupt_block"]

DELAY_HELP = """\
delay model specs (seconds; every sample is >= 0):
  none                     no delay
  const:T                  always T
  shexp:SHIFT,MEAN         shifted exponential: SHIFT + Exp(mean MEAN)
  pareto:SCALE,ALPHA       classic Pareto, minimum SCALE, tail index ALPHA (mean infinite if ALPHA <= 1)
  empirical:PATH           resample (with replacement) the delays in PATH: one number per line,
                           or a CSV file with a column named delay_s ('#' lines are comments)
  mix:W1*SPEC1+W2*SPEC2..  mixture: SPECi with probability Wi/sum(W)
  wifi:C                   the paper's Raspberry Pi 3 WiFi arrival times, calibrated for a
                           compute time of C seconds (see paper_wifi_delay below)
examples: const:0.005  shexp:0.01,0.02  pareto:0.005,1.5  mix:0.9*none+0.1*const:0.5  wifi:0.05"""

INJECTION_KINDS = ("delay", "crash", "hang", "exit", "corrupt")
CORRUPTION_KINDS = ("bitflip", "scale", "noise", "const")

INJECT_HELP = """\
injection specs (repeat --inject; worker ranks only, rank 0 is the master):
  delay:RANKS:MODEL              replies of RANKS are held back by samples of MODEL (a delay spec)
  crash:RANKS@REQ[:LAYER]        the worker SIGKILLs itself on request REQ (0-based) when it is
                                 given layer LAYER (default: its first layer of that request)
  hang:RANKS@REQ[:LAYER]         the worker stops replying from then on but stays alive
  exit:RANKS@REQ[:LAYER][=CODE]  the worker exits with status CODE (default 3)
  corrupt:RANKS@REQ[:LAYER][=KIND]
                                 the worker alters its computed reply for request REQ at layer
                                 LAYER (default: every layer of REQ), then sends it: KIND is
                                 bitflip (default: an exponent or high mantissa bit of the
                                 block's largest value), scale (block x 1.5), noise (Gaussian,
                                 10% of the block's RMS) or const (every value the block's mean)
RANKS is 1, 1-3, 1,4, 2-3,7 or all (every worker).  A crash/hang/exit whose LAYER the
worker is not given in request REQ fires at its first layer of any later request; a
corrupt fires on request REQ only.
A later delay spec for the same rank overrides an earlier one.
examples: delay:1-3:shexp:0.01,0.02  delay:2:pareto:0.005,1.5  crash:2@5  hang:3@0:fc6  exit:1@2=7
          corrupt:2@1=scale  corrupt:3@0:fc6"""


def _bad_delay(spec: str, why: str) -> ValueError:
    return ValueError(f"bad delay spec {spec!r}: {why}\n{DELAY_HELP}")


class DelayModel(ABC):
    """A distribution of non-negative delays in seconds.

    Subclasses are frozen dataclasses, so two models built from the same spec
    compare equal and can key a dict (the simulator groups ranks by model).
    """

    @abstractmethod
    def sample(self, rng: np.random.Generator, size=None):
        """Draw delays: a float when ``size`` is None, else an ndarray of that shape."""

    @abstractmethod
    def mean(self) -> float:
        """Expected delay in seconds (``inf`` for a Pareto tail with alpha <= 1)."""

    @abstractmethod
    def cdf(self, x):
        """P(delay <= x), elementwise."""

    @property
    @abstractmethod
    def spec(self) -> str:
        """The spec string that :func:`parse_delay` turns back into this model."""

    def __str__(self) -> str:
        return self.spec


def _out(values: np.ndarray, size):
    return float(values) if size is None else values


def _num(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


@dataclass(frozen=True)
class ConstDelay(DelayModel):
    """Always the same delay ``value`` (``ConstDelay(0)`` is the ``none`` model)."""

    value: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"constant delay must be finite and >= 0, got {self.value}")

    def sample(self, rng, size=None):
        return self.value if size is None else np.full(size, self.value, dtype=float)

    def mean(self):
        return self.value

    def cdf(self, x):
        return (np.asarray(x, dtype=float) >= self.value).astype(float)

    @property
    def spec(self):
        return "none" if self.value == 0 else f"const:{_num(self.value)}"


@dataclass(frozen=True)
class ShiftedExpDelay(DelayModel):
    """``shift + Exp(mean)``: the classic straggler model of coded computing papers."""

    shift: float
    scale: float  # the mean of the exponential part

    def __post_init__(self):
        if not (math.isfinite(self.shift) and self.shift >= 0 and math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"shifted exponential needs finite SHIFT >= 0 and MEAN >= 0, "
                             f"got shift={self.shift}, mean={self.scale}")

    def sample(self, rng, size=None):
        return _out(self.shift + rng.exponential(self.scale, size), size) if self.scale > 0 \
            else ConstDelay(self.shift).sample(rng, size)

    def mean(self):
        return self.shift + self.scale

    def cdf(self, x):
        x = np.asarray(x, dtype=float)
        if self.scale == 0:
            return (x >= self.shift).astype(float)
        return np.where(x < self.shift, 0.0, -np.expm1(-(x - self.shift) / self.scale))

    @property
    def spec(self):
        return f"shexp:{_num(self.shift)},{_num(self.scale)}"


@dataclass(frozen=True)
class ParetoDelay(DelayModel):
    """Classic (type I) Pareto: ``P(D > x) = (scale / x) ** alpha`` for ``x >= scale``."""

    scale: float
    alpha: float

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0 and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"Pareto needs SCALE > 0 and ALPHA > 0, got scale={self.scale}, alpha={self.alpha}")

    def sample(self, rng, size=None):
        return _out(self.scale * (1.0 + rng.pareto(self.alpha, size)), size)

    def mean(self):
        return math.inf if self.alpha <= 1 else self.alpha * self.scale / (self.alpha - 1)

    def cdf(self, x):
        x = np.asarray(x, dtype=float)
        with np.errstate(divide="ignore"):
            return np.where(x < self.scale, 0.0, 1.0 - (self.scale / np.maximum(x, self.scale)) ** self.alpha)

    @property
    def spec(self):
        return f"pareto:{_num(self.scale)},{_num(self.alpha)}"


@dataclass(frozen=True)
class EmpiricalDelay(DelayModel):
    """Resample measured delays with replacement (e.g. arrival times logged by the runtime)."""

    path: str
    values: np.ndarray = field(compare=False, repr=False)

    def __post_init__(self):
        v = np.asarray(self.values, dtype=float)
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"empirical delays from {self.path!r}: no values")
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise ValueError(f"empirical delays from {self.path!r}: every delay must be finite and >= 0 "
                             f"(min {v.min()})")
        object.__setattr__(self, "values", np.sort(v))

    def __hash__(self):
        return hash(("empirical", self.path, self.values.size, float(self.values.sum())))

    def __eq__(self, other):
        return isinstance(other, EmpiricalDelay) and self.path == other.path and \
            np.array_equal(self.values, other.values)

    @classmethod
    def from_file(cls, path: str) -> "EmpiricalDelay":
        """Read one delay per line, or a CSV with a ``delay_s`` column; ``#`` lines are comments."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"empirical delay file {path!r} cannot be read: {e}") from None
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            raise ValueError(f"empirical delay file {path!r} holds no delays")
        first = lines[0]
        if "," in first or not _is_number(first.strip()):
            reader = csv.DictReader(io.StringIO("\n".join(lines)))
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "delay_s" not in fields:
                raise ValueError(f"empirical delay file {path!r}: CSV needs a column named delay_s, "
                                 f"found columns {fields}")
            reader.fieldnames = fields
            raw = [row["delay_s"] for row in reader]
        else:
            raw = lines
        try:
            values = np.array([float(x) for x in raw], dtype=float)
        except (TypeError, ValueError) as e:
            raise ValueError(f"empirical delay file {path!r}: not a number ({e})") from None
        return cls(str(path), values)

    def sample(self, rng, size=None):
        return _out(rng.choice(self.values, size), size)

    def mean(self):
        return float(self.values.mean())

    def cdf(self, x):
        return np.searchsorted(self.values, np.asarray(x, dtype=float), side="right") / self.values.size

    @property
    def spec(self):
        return f"empirical:{self.path}"


@dataclass(frozen=True)
class MixtureDelay(DelayModel):
    """With probability ``weights[i]`` (normalised) the delay is drawn from ``models[i]``.

    ``label`` overrides the spec (``wifi:C`` keeps its short name).
    """

    weights: tuple
    models: tuple
    label: str = field(default="", compare=False)

    def __post_init__(self):
        w = tuple(float(x) for x in self.weights)
        if len(w) != len(self.models) or not w:
            raise ValueError(f"mixture needs one weight per model, got {len(w)} weights and "
                             f"{len(self.models)} models")
        if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {w}")
        total = sum(w)
        object.__setattr__(self, "weights", tuple(x / total for x in w))
        object.__setattr__(self, "models", tuple(self.models))

    def sample(self, rng, size=None):
        if size is None:
            return float(self.models[rng.choice(len(self.models), p=self.weights)].sample(rng))
        which = rng.choice(len(self.models), size=size, p=self.weights)
        out = np.empty(which.shape, dtype=float)
        for i, model in enumerate(self.models):
            mask = which == i
            count = int(mask.sum())
            if count:
                out[mask] = model.sample(rng, count)
        return out

    def mean(self):
        return sum(w * m.mean() for w, m in zip(self.weights, self.models) if w > 0)

    def cdf(self, x):
        return sum(w * np.asarray(m.cdf(x), dtype=float) for w, m in zip(self.weights, self.models))

    @property
    def spec(self):
        if self.label:
            return self.label
        return "mix:" + "+".join(f"{w:.6g}*{m.spec}" for w, m in zip(self.weights, self.models))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _floats(spec: str, arg: str, count: int, names: str) -> list:
    parts = [p.strip() for p in arg.split(",")] if arg else []
    if len(parts) != count:
        raise _bad_delay(spec, f"expected {count} number(s) {names}, got {len(parts)}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise _bad_delay(spec, f"{names} must be numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise _bad_delay(spec, f"{names} must be finite")
    return values


_MIX_SPLIT = re.compile(r"\+(?=\s*[0-9.]+(?:[eE][-+]?\d+)?\s*\*)")


def parse_delay(spec) -> DelayModel:
    """Parse a delay spec (grammar in :data:`DELAY_HELP`); a :class:`DelayModel` passes through.

    Raises
    ------
    ValueError
        quoting the spec and showing the grammar, for any malformed or out-of-range spec.
    """
    if isinstance(spec, DelayModel):
        return spec
    if spec is None:
        return ConstDelay(0.0)
    if not isinstance(spec, str):
        raise TypeError(f"delay spec must be a string or DelayModel, got {type(spec).__name__}")
    text = spec.strip()
    kind, _, arg = text.partition(":")
    kind = kind.lower()
    try:
        if kind == "none" and not arg:
            return ConstDelay(0.0)
        if kind == "const":
            return ConstDelay(*_floats(spec, arg, 1, "T"))
        if kind == "shexp":
            return ShiftedExpDelay(*_floats(spec, arg, 2, "SHIFT,MEAN"))
        if kind == "pareto":
            return ParetoDelay(*_floats(spec, arg, 2, "SCALE,ALPHA"))
        if kind == "empirical":
            if not arg:
                raise _bad_delay(spec, "empirical needs a file path")
            return EmpiricalDelay.from_file(arg)
        if kind == "wifi":
            (compute,) = _floats(spec, arg, 1, "C")
            return paper_wifi_delay(compute)
        if kind == "mix":
            weights, models = [], []
            for term in _MIX_SPLIT.split(arg):
                w, star, sub = term.partition("*")
                if not star or not _is_number(w.strip()):
                    raise _bad_delay(spec, f"mixture term {term!r} is not WEIGHT*SPEC")
                weights.append(float(w))
                models.append(parse_delay(sub.strip()))
            return MixtureDelay(tuple(weights), tuple(models))
    except ValueError as e:
        if str(e).startswith("bad delay spec"):
            raise
        raise _bad_delay(spec, str(e)) from None
    raise _bad_delay(spec, f"unknown delay model {kind!r}")


# ---------------------------------------------------------------------------------------------
# failure injection


def _bad_injection(spec: str, why: str) -> ValueError:
    return ValueError(f"bad injection spec {spec!r}: {why}\n{INJECT_HELP}")


@dataclass(frozen=True)
class Injection:
    """One parsed ``--inject`` spec.

    Parameters
    ----------
    kind : ``"delay"``, ``"crash"``, ``"hang"``, ``"exit"`` or ``"corrupt"``.
    ranks : worker ranks it applies to; the empty tuple means every worker (``all``).
    request : 0-based request at which a crash/hang/exit fires (None for delays).
    layer : layer at which it fires (None: the rank's first layer of that request).
    delay : the delay model of a ``delay`` injection.
    exit_code : exit status of an ``exit`` injection.
    corruption : what a ``corrupt`` injection does to the reply (one of :data:`CORRUPTION_KINDS`).
    spec : the text it was parsed from (for messages).
    """

    kind: str
    ranks: tuple
    request: int | None = None
    layer: str | None = None
    delay: DelayModel | None = None
    exit_code: int = 3
    corruption: str | None = None
    spec: str = field(default="", compare=False)

    def applies_to(self, rank: int) -> bool:
        """Whether this injection targets ``rank`` (``all`` targets every rank but 0)."""
        return rank != 0 and (not self.ranks or rank in self.ranks)

    def fires(self, request: int, layer: str, first_layer_of_request: bool) -> bool:
        """Whether a crash/hang/exit fires on this job (see :meth:`Injections.action_for`)."""
        if self.kind in ("delay", "corrupt"):
            return False
        if request > self.request:
            return True
        if request < self.request:
            return False
        return layer == self.layer if self.layer is not None else bool(first_layer_of_request)


def _parse_ranks(spec: str, text: str) -> tuple:
    text = text.strip()
    if text.lower() == "all":
        return ()
    try:
        ranks = parse_ranges(text, "rank")
    except ValueError as exc:
        raise _bad_injection(spec, f"rank list {text!r} is not like 1, 1-3, 1,4 or all: {exc}") from None
    if min(ranks) < 1:
        raise _bad_injection(spec, f"rank {min(ranks)} cannot be injected: rank 0 is the master, "
                                   "workers are 1 and up")
    return tuple(sorted(set(ranks)))


def parse_injection(spec: str) -> Injection:
    """Parse one injection spec (grammar in :data:`INJECT_HELP`).

    Raises
    ------
    ValueError
        quoting the spec and showing the grammar.
    """
    if not isinstance(spec, str):
        raise TypeError(f"injection spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind not in INJECTION_KINDS:
        raise _bad_injection(spec, f"unknown kind {kind!r}; use one of {', '.join(INJECTION_KINDS)}")
    if kind == "delay":
        ranks_text, colon, model = rest.partition(":")
        if not colon or not model:
            raise _bad_injection(spec, "expected delay:RANKS:MODEL")
        try:
            delay = parse_delay(model)
        except ValueError as e:
            raise _bad_injection(spec, str(e).splitlines()[0]) from None
        return Injection("delay", _parse_ranks(spec, ranks_text), delay=delay, spec=text)
    exit_code, corruption = 3, ("bitflip" if kind == "corrupt" else None)
    if "=" in rest and kind == "corrupt":
        rest, _, corruption = rest.rpartition("=")
        corruption = corruption.strip().lower()
        if corruption not in CORRUPTION_KINDS:
            raise _bad_injection(spec, f"unknown corruption {corruption!r}; use one of {', '.join(CORRUPTION_KINDS)}")
    elif "=" in rest:
        if kind != "exit":
            raise _bad_injection(spec, f"only exit takes =CODE and corrupt =KIND, not {kind}")
        rest, _, code = rest.rpartition("=")
        try:
            exit_code = int(code)
        except ValueError:
            raise _bad_injection(spec, f"exit code {code!r} is not an integer") from None
        if not 0 <= exit_code <= 255:
            raise _bad_injection(spec, f"exit code {exit_code} is outside 0..255")
    ranks_text, at, when = rest.partition("@")
    if not at:
        raise _bad_injection(spec, f"expected {kind}:RANKS@REQ[:LAYER]")
    req_text, _, layer = when.partition(":")
    try:
        request = int(req_text)
    except ValueError:
        raise _bad_injection(spec, f"request {req_text!r} is not an integer") from None
    if request < 0:
        raise _bad_injection(spec, f"request {request} is negative (requests count from 0)")
    layer = layer.strip() or None
    return Injection(kind, _parse_ranks(spec, ranks_text), request=request, layer=layer,
                     exit_code=exit_code, corruption=corruption, spec=text)


class Injections:
    """All injections of one run, answering the runtime's and the simulator's questions.

    Parameters
    ----------
    injections : parsed :class:`Injection` objects, in command-line order.
    """

    def __init__(self, injections: Iterable[Injection] = ()):
        self._items = tuple(injections)
        for inj in self._items:
            if not isinstance(inj, Injection):
                raise TypeError(f"expected Injection objects, got {type(inj).__name__}")

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __bool__(self):
        return bool(self._items)

    def __repr__(self):
        return f"Injections({[i.spec for i in self._items]})"

    @property
    def specs(self) -> list:
        return [i.spec for i in self._items]

    def delay_for(self, rank: int) -> DelayModel | None:
        """The delay model injected for ``rank`` (the last matching spec wins), or None."""
        found = None
        for inj in self._items:
            if inj.kind == "delay" and inj.applies_to(rank):
                found = inj.delay
        return found

    def action_for(self, rank: int, request: int, layer: str,
                   first_layer_of_request: bool) -> Injection | None:
        """The crash/hang/exit that fires for ``rank`` on this job, or None.

        It fires on request ``REQ`` at layer ``LAYER`` (or at the rank's first layer
        of ``REQ`` when no layer was given), and on any job of a later request, so a
        rank that skipped request ``REQ`` altogether still fails at its next job.
        When several fire, the one with the earliest request (then the first given) wins.
        """
        firing = [inj for inj in self._items
                  if inj.kind in ("crash", "hang", "exit") and inj.applies_to(rank)
                  and inj.fires(request, layer, first_layer_of_request)]
        return min(firing, key=lambda inj: inj.request) if firing else None

    def corruption_for(self, rank: int, request: int, layer: str) -> Injection | None:
        """The corrupt injection altering ``rank``'s reply for this request and layer, or None.

        It fires on request ``REQ`` only, at ``LAYER`` or at every layer when none was given.
        """
        for inj in self._items:
            if inj.kind == "corrupt" and inj.applies_to(rank) and inj.request == request \
                    and inj.layer in (None, layer):
                return inj
        return None

    def failures(self) -> list:
        """Every crash/hang/exit injection, in the order given."""
        return [inj for inj in self._items if inj.kind in ("crash", "hang", "exit")]

    def validate(self, world_size: int, layers: Sequence[str] | None = None) -> "Injections":
        """Check every rank against a world of ``world_size`` ranks (and layers, when given).

        Raises
        ------
        ValueError
            for a rank outside ``1..world_size-1`` or an unknown layer name.
        """
        if world_size < 2 and self._items:
            raise ValueError(f"injections need at least one worker rank, but world_size={world_size}")
        for inj in self._items:
            bad = [r for r in inj.ranks if not 1 <= r <= world_size - 1]
            if bad:
                raise ValueError(f"injection {inj.spec!r}: rank(s) {bad} outside the workers "
                                 f"1..{world_size - 1} of a world of {world_size} ranks (rank 0, "
                                 "the master, cannot be injected)")
        if layers is not None:
            self.check_layers(layers)
        return self

    def check_layers(self, layers: Sequence[str]) -> "Injections":
        """Check that every injection's layer is one of ``layers`` (a misspelt layer would never fire)."""
        for inj in self._items:
            if inj.layer is not None and inj.layer not in layers:
                raise ValueError(f"injection {inj.spec!r}: unknown layer {inj.layer!r}; "
                                 f"layers: {', '.join(layers)}")
        return self


def corrupt_block(block: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    """Alter a computed float32 reply block in place the way a ``corrupt`` injection says.

    ``bitflip`` flips one of bits 20..23 (three high mantissa bits, lowest exponent bit) of
    the block's largest-magnitude value, so the value changes by 6% to 100% of itself: a flip
    in a value near zero would change nothing a consumer could see.
    """
    flat = block.reshape(-1)
    if kind == "bitflip":
        i = int(np.argmax(np.abs(flat)))
        flat.view(np.uint32)[i] ^= np.uint32(1 << int(rng.integers(20, 24)))
    elif kind == "scale":
        flat *= np.float32(1.5)
    elif kind == "noise":
        rms = float(np.sqrt(np.mean(np.square(flat, dtype=np.float64))))
        flat += (0.1 * rms * rng.standard_normal(flat.size)).astype(np.float32)
    elif kind == "const":
        flat[:] = np.float32(flat.mean(dtype=np.float64))
    else:
        raise ValueError(f"unknown corruption {kind!r}; use one of {', '.join(CORRUPTION_KINDS)}")


def parse_injections(specs: Sequence[str] | None) -> Injections:
    """Parse a list of injection specs (e.g. the repeated ``--inject`` options)."""
    if isinstance(specs, str):
        specs = [specs]
    return Injections(parse_injection(s) for s in (specs or ()))


# ---------------------------------------------------------------- the paper's WiFi straggler model

#: Compute time of the paper's 2048 fully connected layer on one Pi 3 (s).
PAPER_FC_COMPUTE_S = 0.050
#: Fraction of replies arrived by k times the compute time, read from the paper's Fig. 1.
PAPER_ARRIVALS = {2: 0.34, 3: 0.42}


def wifi_calibration(compute_time: float = PAPER_FC_COMPUTE_S,
                     arrivals: dict | None = None) -> tuple:
    """``(p_on_time, mean_exp)`` of the WiFi straggler model (derivation in :mod:`mpicdc.sim.devices`).

    Parameters
    ----------
    compute_time : the compute time c of the layer, seconds.
    arrivals : ``{2: F2, 3: F3}``, fractions of replies arrived by 2c and 3c
        (default: the paper's 0.34 and 0.42).
    """
    arrivals = PAPER_ARRIVALS if arrivals is None else arrivals
    if not compute_time > 0:
        raise ValueError(f"compute_time must be > 0, got {compute_time}")
    s1, s2 = 1.0 - arrivals[2], 1.0 - arrivals[3]
    if not 0 < s2 < s1 <= 1 or s1 * s1 / s2 > 1:
        raise ValueError(f"arrival fractions {arrivals} cannot be fitted: need F2 < F3 and "
                         "(1-F2)^2 <= 1-F3")
    mean = compute_time / math.log(s1 / s2)
    return 1.0 - s1 * s1 / s2, mean


def paper_wifi_delay(compute_time: float = PAPER_FC_COMPUTE_S) -> MixtureDelay:
    """Straggler delay reproducing the paper's Fig. 1 WiFi arrival fractions for compute time c.

    With probability ``w = 0.249`` the reply is not delayed; otherwise the delay is
    exponential with mean ``7.74 c``.  ``P(c + D <= 2c) = 0.34`` and
    ``P(c + D <= 3c) = 0.42`` hold exactly.  Its spec is ``wifi:C``.
    """
    w, mean = wifi_calibration(compute_time)
    return MixtureDelay((w, 1.0 - w), (ConstDelay(0.0), ShiftedExpDelay(0.0, mean)),
                        label=f"wifi:{compute_time!r}")
