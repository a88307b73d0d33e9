"""What a plan puts on the links: link rates and the bytes that can queue ahead of a heartbeat.

Pure (no MPI).  The failure detector's heartbeats travel on the same TCP connections as the
data (``runtime/mpienv.py``), so one may wait behind whatever is queued on the busiest link, the
master's: during a distributed layer the master sends the layer's whole input to every rank of
the layer at once (each connection gets ``1/ranks`` of the link), and all their replies come back
over the same link.  :func:`link_backlog_bytes` is the larger of the two, for the worst layer.
"""
from __future__ import annotations

import math
import re

from mpicdc.core.bands import layer_geometry

_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "kibit": 1024, "mibit": 1 << 20, "gibit": 1 << 30}
WIRE_ITEMSIZE = 4  # float32 payloads (a narrower wire format only shortens the queue)


def rate_bits(rate: str) -> float:
    """``"20mbit"`` -> 20e6 bits per second (tc's units; a bare number is bits per second)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-z]*)\s*", str(rate).lower())
    if not m or (m.group(2) or "bit") not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"bad rate {rate!r}: use e.g. 20mbit, 500kbit, 1gbit")
    return float(m.group(1)) * _UNITS[m.group(2) or "bit"]


def link_backlog_bytes(model, plan, itemsize: int = WIRE_ITEMSIZE) -> int:
    """Bytes that can be queued on the master's link during the worst distributed layer of ``plan``:
    ``max(ranks x input bytes, sum of reply bytes)``."""
    shapes = model.shapes()
    worst = 0
    for layer in model.linear_layers:
        lp = plan.for_layer(layer.name)
        if lp is None:
            continue
        if lp.banded:  # each rank its band of the input, its band of the output
            geo = layer_geometry(model, lp)
            job, reply = math.prod(geo.input_shape), math.prod(geo.block_shape)
        else:
            out = shapes[layer.name]
            job, reply = math.prod(shapes[layer.inputs[0]]), lp.block_rows * (math.prod(out[1:]) if len(out) > 1 else 1)
        jobs, replies = len(lp.ranks) * job * itemsize, len(lp.ranks) * reply * itemsize
        worst = max(worst, jobs, replies)
    return worst
