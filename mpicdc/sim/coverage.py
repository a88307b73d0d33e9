"""Device coverage of one failure: 2MR against CDC+2MR (the paper's Fig. 3).

A *distribution* assigns every device of a cluster one *part* of a model: a run
of consecutive layers.  A part on one device is **solo**: only a full replica of
that device (2MR, dual modular redundancy) survives its loss.  A part on
``m > 1`` devices is **split** by output rows: with 2MR each member needs its own
replica (``m`` extra devices), with CDC one parity device holding the summed
weights of all ``m`` members survives the loss of any one of them.

With equal failure probability per device, the *coverage* after ``k`` additional
devices is the probability that a single device failure is survived.  Extra
devices are added greedily, the one that covers the most devices first (a
parity of the largest split part, ..., then replicas of solo devices), which is
optimal here because the options are independent and each costs one device.

``population`` says which devices can fail: ``"original"`` (default) counts the
cluster's own devices, coverage ``covered / N``; ``"all"`` lets the added
devices fail too (their loss is always survived), coverage
``(covered + k) / (N + k)``.  Both reach 1 with the same number of devices.

The five distributions of the paper's Fig. 3 come from its references (Hadidi et
al., "Distributed perception by collaborative robots", RA-L 2018, and
"Collaborative execution of deep neural networks on IoT devices", arXiv 2018),
which could not be consulted offline.  :data:`DISTRIBUTIONS` holds **our
reconstruction** from the FLOPs and weight sizes of the zoo models (see
``docs/coverage.md`` for the per-device numbers): convolution runs split over a
group when one Pi would be the bottleneck, fully connected layers split when
their weights would crowd a 1 GB Pi, small runs alone.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field

__all__ = ["Part", "Distribution", "DISTRIBUTIONS", "METHODS", "coverage_curve",
           "devices_for_full_coverage", "additions", "part_loads", "main"]

METHODS = ("2mr", "cdc+2mr")
POPULATIONS = ("original", "all")


@dataclass(frozen=True)
class Part:
    """Consecutive linear layers (with the nonlinear layers between them) run by ``devices``."""

    layers: tuple
    devices: tuple

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.layers:
            raise ValueError("a part needs at least one layer")
        if not self.devices:
            raise ValueError(f"part {self.layers} has no devices")

    @property
    def split(self) -> bool:
        """True when several devices share the part by output rows."""
        return len(self.devices) > 1


@dataclass(frozen=True)
class Distribution:
    """How one model is spread over ``devices`` devices (numbered 1..devices)."""

    name: str
    model: str
    devices: int
    parts: tuple
    title: str = ""
    note: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "parts", tuple(self.parts))
        seen: dict = {}
        for part in self.parts:
            for d in part.devices:
                if not 1 <= d <= self.devices:
                    raise ValueError(f"distribution {self.name!r}: device {d} outside 1..{self.devices}")
                if d in seen:
                    raise ValueError(f"distribution {self.name!r}: device {d} runs both {seen[d]} and "
                                     f"{part.layers}; each device runs exactly one part")
                seen[d] = part.layers
        idle = sorted(set(range(1, self.devices + 1)) - set(seen))
        if idle:
            raise ValueError(f"distribution {self.name!r}: devices {idle} run nothing")


def _d(name, model, devices, title, note, *parts) -> Distribution:
    return Distribution(name, model, devices, tuple(Part(tuple(l), tuple(d)) for l, d in parts), title, note)


DISTRIBUTIONS = {d.name: d for d in (
    _d("alexnet-5", "alexnet", 5, "(a) AlexNet on 5 devices",
       "all convolutions on one device; fc6 split in two 2048-row halves (the paper's 'FC layer of "
       "size 2048'); fc7+fc8 split over two more",
       (["conv1", "conv2", "conv3", "conv4", "conv5"], [1]),
       (["fc6"], [2, 3]),
       (["fc7", "fc8"], [4, 5])),
    _d("actionrec-8", "actionrec", 8, "(b) Action recognition on 8 devices",
       "conv2 (the heaviest layer) split over four devices, conv3 over two, conv1 and the fc "
       "layers alone",
       (["conv1"], [1]),
       (["conv2"], [2, 3, 4, 5]),
       (["conv3"], [6, 7]),
       (["fc4", "fc5", "fc6"], [8])),
    _d("c3d-7", "c3d", 7, "(c) C3D on 7 devices",
       "conv1a-conv2a split over two devices, conv3a-conv3b over three, conv4a-conv4b alone, "
       "conv5a-fc8 alone",
       (["conv1a", "conv2a"], [1, 2]),
       (["conv3a", "conv3b"], [3, 4, 5]),
       (["conv4a", "conv4b"], [6]),
       (["conv5a", "conv5b", "fc6", "fc7", "fc8"], [7])),
    _d("c3d-9", "c3d", 9, "(d) C3D on 9 devices",
       "conv1a-conv2a split over three devices, conv3a-conv3b over three, conv4a-conv4b over two, "
       "conv5a-fc8 alone",
       (["conv1a", "conv2a"], [1, 2, 3]),
       (["conv3a", "conv3b"], [4, 5, 6]),
       (["conv4a", "conv4b"], [7, 8]),
       (["conv5a", "conv5b", "fc6", "fc7", "fc8"], [9])),
    _d("vgg16-8", "vgg16", 8, "(e) VGG16 on 8 devices",
       "conv block 1 alone, conv block 2 alone, block 3 split over two, blocks 4-5 split over two, "
       "fc6-fc8 split over two",
       (["conv1_1", "conv1_2"], [1]),
       (["conv2_1", "conv2_2"], [2]),
       (["conv3_1", "conv3_2", "conv3_3"], [3, 4]),
       (["conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"], [5, 6]),
       (["fc6", "fc7", "fc8"], [7, 8])),
)}


def _distribution(distribution) -> Distribution:
    if isinstance(distribution, Distribution):
        return distribution
    try:
        return DISTRIBUTIONS[distribution]
    except KeyError:
        raise ValueError(f"unknown distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}") from None


def _method(method: str) -> str:
    key = method.lower().replace(" ", "")
    key = {"cdc": "cdc+2mr", "2mr+cdc": "cdc+2mr"}.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return key


def additions(distribution, method: str) -> list:
    """The extra devices in greedy order: ``[(what, devices covered)]``.

    ``what`` is ``"replica of device d"`` or ``"parity of devices (a, b, ...)"``.
    """
    dist, method = _distribution(distribution), _method(method)
    options = []
    for part in dist.parts:
        if method == "cdc+2mr" and part.split:
            options.append((f"parity of devices {part.devices}", part.devices))
        else:
            options.extend((f"replica of device {d}", (d,)) for d in part.devices)
    return sorted(options, key=lambda o: -len(o[1]))  # stable: ties keep the part order


def devices_for_full_coverage(distribution, method: str) -> int:
    """Additional devices needed until every single-device failure is survived."""
    return len(additions(distribution, method))


def coverage_curve(distribution, method: str, extra: int | None = None,
                   population: str = "original") -> list:
    """Coverage of one failure after 0, 1, ..., ``extra`` additional devices.

    Parameters
    ----------
    distribution : a :class:`Distribution` or a key of :data:`DISTRIBUTIONS`.
    method : ``"2mr"`` or ``"cdc+2mr"``.
    extra : last number of additional devices (default: the cluster size, which is
        what 2MR needs, so both methods give curves of the same length).
    population : ``"original"`` or ``"all"`` (see the module docstring).
    """
    dist = _distribution(distribution)
    if population not in POPULATIONS:
        raise ValueError(f"unknown population {population!r}; use one of {', '.join(POPULATIONS)}")
    extra = dist.devices if extra is None else extra
    if extra < 0:
        raise ValueError(f"extra must be >= 0, got {extra}")
    gains = [len(covered) for _, covered in additions(dist, method)]
    n, covered, curve = dist.devices, 0, []
    for k in range(extra + 1):
        if k:
            covered += gains[k - 1] if k <= len(gains) else 0
        curve.append(covered / n if population == "original" else (covered + k) / (n + k))
    return curve


def part_loads(distribution) -> list:
    """Per part: layers, devices, GFLOP and MB of float32 weights *per device* (from the zoo)."""
    from mpicdc.core.models import get_model
    dist = _distribution(distribution)
    model = get_model(dist.model)
    flops, shapes = model.flops(), model.weight_shapes()
    rows = []
    for part in dist.parts:
        unknown = [l for l in part.layers if l not in flops]
        if unknown:
            raise ValueError(f"distribution {dist.name!r}: {unknown} are not linear layers of {dist.model}")
        m = len(part.devices)
        rows.append({"layers": list(part.layers), "devices": list(part.devices),
                     "gflop_per_device": sum(flops[l] for l in part.layers) / m / 1e9,
                     "weights_MB_per_device": sum(4 * math.prod(shapes[l]) for l in part.layers) / m / 1e6})
    return rows


def _table(population: str) -> list:
    out = []
    for dist in DISTRIBUTIONS.values():
        out.append({"name": dist.name, "title": dist.title, "devices": dist.devices,
                    "full_2mr": devices_for_full_coverage(dist, "2mr"),
                    "full_cdc_2mr": devices_for_full_coverage(dist, "cdc+2mr"),
                    "curve_2mr": coverage_curve(dist, "2mr", population=population),
                    "curve_cdc_2mr": coverage_curve(dist, "cdc+2mr", population=population),
                    "parts": part_loads(dist)})
    return out


def main(argv=None) -> int:
    """``python -m mpicdc.sim.coverage [--json] [--population original|all] [--parts]``."""
    p = argparse.ArgumentParser(
        prog="python -m mpicdc.sim.coverage", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Coverage of one device failure against additional devices, 2MR vs CDC+2MR "
                    "(the paper's Fig. 3), for our reconstruction of its five distributions.",
        epilog="coverage = fraction of single-device failures survived, equal failure probability per\n"
               "device; extra devices added greedily (most devices covered first).")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--population", choices=POPULATIONS, default="original",
                   help="which devices can fail: the original ones (default) or also the added ones")
    p.add_argument("--parts", action="store_true", help="also list each distribution's parts and loads")
    args = p.parse_args(argv)
    table = _table(args.population)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'distribution':<38} {'2MR':>4} {'CDC+2MR':>8}   coverage (%) after 0,1,2,... extra devices")
    for row in table:
        print(f"{row['title']:<38} {row['full_2mr']:>4} {row['full_cdc_2mr']:>8}")
        for label, key in (("2MR", "curve_2mr"), ("CDC+2MR", "curve_cdc_2mr")):
            print(f"    {label:<8} " + " ".join(f"{100 * c:5.1f}" for c in row[key]))
        if args.parts:
            for part in row["parts"]:
                print(f"      devices {','.join(map(str, part['devices'])):<9} {'+'.join(part['layers']):<48}"
                      f" {part['gflop_per_device']:7.2f} GFLOP  {part['weights_MB_per_device']:7.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
