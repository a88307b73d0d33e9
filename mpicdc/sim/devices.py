"""Raspberry-Pi-class device models: how long a block of work and a message take.

A :class:`DeviceModel` is a roofline with a network link:

* ``compute_time(flops, nbytes)`` = ``max(flops / gflops, nbytes / mem_GBps)``: batch-1
  convolutions are compute bound, batch-1 fully connected layers stream their
  weights once and are memory bound, and one number cannot serve both;
* ``transfer_time(nbytes)`` = ``latency_s + nbytes / bandwidth_MBps``: the master's
  link to the device (MB = 1e6 bytes); :func:`with_link` swaps in another rate
  (:func:`parse_rate`: ``100mbit``, ``20mbit``, ``1gbit``);
* ``memory_MB``: the device's RAM, which :mod:`mpicdc.sim.autoplan` budgets weights against.

The MPI runtime pads each worker's real compute time up to
``gemm_time(rows, cols, spatial)`` of its block and adds a sampled message delay,
so that a fast x86 machine behaves like a cluster of Pis; :mod:`mpicdc.sim`
uses the same numbers.

Numbers and where they come from
--------------------------------
Each number is tagged [spec] (vendor data sheet), [measured] (a public measurement,
named) or [estimate] (our reasoning from the spec; no measurement of that exact
quantity could be consulted offline).  Validate against your own boards with
``python -m mpicdc.bench`` and adjust; :meth:`DeviceModel.scaled` makes variants.

``rpi3`` (default) -- Raspberry Pi 3 Model B: BCM2837, 4 x Cortex-A53 at 1.2 GHz,
1 GB LPDDR2-900 on a 32-bit bus, BCM43438 802.11n 2.4 GHz single-stream WiFi,
10/100 Ethernet behind USB 2.0 [spec: Raspberry Pi Foundation product brief, 2016].

* ``memory_MB = 1073.7`` (1 GiB LPDDR2) [spec: same product brief]; the GPU split and
  the OS take part of it (see :mod:`mpicdc.sim.autoplan` for the budget).

* ``gflops = 6.0`` [estimate]: float32 peak is 4 cores x 1.2 GHz x 4 flop/cycle
  (one 128-bit NEON FMA per two cycles on the A53) = 19.2 GFLOP/s; a tuned
  sustained GEMM reaches about a third of peak on in-order cores, and thermal
  throttling of the passively cooled board pulls long runs lower still.
* ``mem_GBps = 2.0`` [estimate]: LPDDR2-900 x 32 bit peaks at 3.6 GB/s; streaming
  reads sustain a little over half.
* ``bandwidth_MBps = 3.75`` (30 Mbit/s), ``latency_s = 2 ms`` [estimate]: the
  single-stream 20 MHz 802.11n PHY tops out at 72 Mbit/s; TCP through an access
  point gets well under half, and a LAN ping over WiFi takes a few ms round trip.
* Check against the paper (Hadidi et al., DAC 2019): one fully connected layer
  "of size 2048" took 50 ms on one Pi 3 with the authors' software stack.  This
  model gives 8.4 ms for a 2048 x 2048 layer and 38 ms for the 2048 x 9216 half
  of AlexNet's fc6 (both memory bound), so the paper's layer was most likely
  the latter.  ``rpi3-paper`` is ``rpi3`` slowed (x0.168) until the 2048 x 2048
  layer takes 50 ms: the pessimistic reading of the paper's time scale.

``rpi3-eth`` -- the same board on its Ethernet: 11.8 MB/s [measured: 94.4 Mbit/s
iperf on the same USB 2.0 LAN9514 10/100 port of the Pi 2 and B+, J. Geerling,
"Getting Gigabit Networking on a Raspberry Pi 2, 3 and B+"], 0.3 ms [estimate].

``rpi4`` -- Raspberry Pi 4 Model B: BCM2711, 4 x Cortex-A72 at 1.5 GHz, LPDDR4-3200,
802.11ac 2.4/5 GHz WiFi, Gigabit Ethernet [spec].  ``memory_MB = 4295`` (the 4 GiB
board; 1, 2 and 8 GiB boards exist) [spec].

* ``gflops = 13.0``: about 8 GFLOP/s double-precision HPL on a stock Pi 4
  [measured: W. Feiereisen, "Benchmarking the Raspberry Pi 4 with Raspberry Pi
  OS64", 2022]; float32 doubles the NEON lanes, throttling keeps sustained float32
  GEMM well below twice the HPL figure [estimate].
* ``mem_GBps = 4.0`` [estimate]: LPDDR4-3200 x 32 bit peaks at 12.8 GB/s.
* ``bandwidth_MBps = 12.5`` (100 Mbit/s), ``latency_s = 1.5 ms`` [estimate]: 5 GHz
  802.11ac single stream through an access point.

``rpi4-eth`` -- Pi 4 on Gigabit Ethernet: 117.6 MB/s [measured: 941 Mbit/s iperf3,
mpr-projects.com, "RPi NAS: Part 3 Network Connections", 2024], 0.2 ms [estimate].

``local`` -- this development machine [measured: ``shared/design.md``, "Facts"]:
float32 GEMM about 100 GFLOP/s on one thread; a 12.8 MB broadcast among 4 ranks
over shared memory in 3-4 ms (about 3.5 GB/s per copy); memory 10 GB/s and 5 us
latency [estimate]; ``memory_MB`` unbounded.  :func:`measure_local` re-measures GEMM and copy speed.

The paper's WiFi arrival times and :func:`paper_wifi_delay`
------------------------------------------------------------
Fig. 1 of the paper: a master sends work to three Pi 3s over WiFi, each computes a
2048 FC layer (c = 50 ms); about 34 % of the replies arrive within 100 ms (2c) and
42 % within 150 ms (3c).  Write the arrival time as ``c + D``.  Then
``P(D > c) = S1 = 0.66`` and ``P(D > 2c) = S2 = 0.58``.  A shifted exponential
cannot fit (it would need a negative shift) and a Pareto fit has alpha = 0.19
(infinite mean).  The two-parameter family "on time with probability w, else an
exponential delay of mean m", ``P(D > x) = (1 - w) exp(-x / m)``, fits both
points exactly::

    exp(-c / m) = S2 / S1     ->  m = c / ln(S1 / S2) = 7.74 c  (387 ms for c = 50 ms)
    (1 - w) exp(-c / m) = S1  ->  1 - w = S1**2 / S2  = 0.751

so a quarter of the replies come right after the compute and three quarters
straggle with an exponential tail (mean delay 5.8 c).  The model scales with
``c``: pass the compute time of the layer you emulate, or keep the paper's 50 ms
to reuse its absolute WiFi time scale.  Everything after the compute is charged
to D, so a simulator that also models transfer times lands a few ms later.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, replace

import numpy as np

from mpicdc.core.faults import (  # noqa: F401 (re-exported)
    PAPER_ARRIVALS,
    PAPER_FC_COMPUTE_S,
    paper_wifi_delay,
    wifi_calibration,
)

__all__ = ["DeviceModel", "DEVICES", "DEFAULT_DEVICE", "get_device", "device_names",
           "paper_wifi_delay", "wifi_calibration", "measure_local", "parse_rate", "with_link", "format_rate",
           "compute_only",
           "PAPER_FC_COMPUTE_S", "PAPER_ARRIVALS"]

@dataclass(frozen=True)
class DeviceModel:
    """Speed of one device and of its network link to the master.

    Parameters
    ----------
    name : registry name.
    gflops : sustained float32 GEMM throughput of the whole device, GFLOP/s.
    bandwidth_MBps : effective throughput of the link to the master, MB/s (1e6 bytes).
    latency_s : one-way latency of one message, seconds.
    mem_GBps : sustained memory bandwidth, GB/s (roofline; ``inf`` ignores memory).
    description : one line for ``--help`` and the docs.
    memory_MB : RAM of the device, MB (1e6 bytes; ``inf``: unbounded).
    """

    name: str
    gflops: float
    bandwidth_MBps: float
    latency_s: float
    mem_GBps: float = math.inf
    description: str = field(default="", compare=False)
    memory_MB: float = math.inf

    def __post_init__(self):
        for key in ("gflops", "bandwidth_MBps", "mem_GBps", "memory_MB"):
            value = getattr(self, key)
            if not value > 0:
                raise ValueError(f"device {self.name!r}: {key} must be > 0, got {value}")
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"device {self.name!r}: latency_s must be finite and >= 0, got {self.latency_s}")

    def compute_time(self, flops, nbytes=0.0):
        """Seconds to do ``flops`` floating-point operations touching ``nbytes`` of memory.

        Works elementwise on arrays.  ``nbytes`` defaults to 0 (compute bound).
        """
        return np.maximum(np.asarray(flops, dtype=float) / (self.gflops * 1e9),
                          np.asarray(nbytes, dtype=float) / (self.mem_GBps * 1e9))[()]

    def transfer_time(self, nbytes):
        """Seconds to move one message of ``nbytes`` over the link (latency + size / bandwidth)."""
        return (self.latency_s + np.asarray(nbytes, dtype=float) / (self.bandwidth_MBps * 1e6))[()]

    def gemm_time(self, rows, cols, spatial=1):
        """Seconds for one float32 block ``W (rows x cols) @ X (cols x spatial)``.

        FLOPs are ``2 rows cols spatial``; memory traffic is the weight block, the
        lowered input and the output once each (``4 (rows cols + cols spatial + rows spatial)``).
        This is what the runtime pads each worker's block to.
        """
        rows, cols, spatial = (np.asarray(v, dtype=float) for v in (rows, cols, spatial))
        return self.compute_time(2.0 * rows * cols * spatial,
                                 4.0 * (rows * cols + cols * spatial + rows * spatial))

    def scaled(self, speed: float, name: str | None = None) -> "DeviceModel":
        """The same device with compute and memory ``speed`` times faster (0.5: half speed)."""
        if not speed > 0:
            raise ValueError(f"speed factor must be > 0, got {speed}")
        return replace(self, name=name or f"{self.name}x{speed:g}", gflops=self.gflops * speed,
                       mem_GBps=self.mem_GBps * speed)


_RPI3 = DeviceModel("rpi3", 6.0, 3.75, 0.002, 2.0,
                    "Raspberry Pi 3 Model B (4x Cortex-A53 1.2 GHz) on 2.4 GHz 802.11n WiFi",
                    memory_MB=1073.7)


def _paper_scale() -> float:
    return float(_RPI3.gemm_time(2048, 2048)) / PAPER_FC_COMPUTE_S


DEVICES = {d.name: d for d in (
    _RPI3,
    replace(_RPI3.scaled(_paper_scale(), "rpi3-paper"),
            description="Raspberry Pi 3 slowed to the paper's 50 ms per 2048x2048 FC layer"),
    replace(_RPI3, name="rpi3-eth", bandwidth_MBps=11.8, latency_s=0.0003,
            description="Raspberry Pi 3 Model B on its 10/100 Ethernet (USB 2.0)"),
    DeviceModel("rpi4", 13.0, 12.5, 0.0015, 4.0,
                "Raspberry Pi 4 Model B (4x Cortex-A72 1.5 GHz) on 5 GHz 802.11ac WiFi", memory_MB=4295.0),
    DeviceModel("rpi4-eth", 13.0, 117.6, 0.0002, 4.0,
                "Raspberry Pi 4 Model B on Gigabit Ethernet", memory_MB=4295.0),
    DeviceModel("local", 100.0, 3500.0, 5e-6, 10.0,
                "this machine: one core of float32 GEMM, ranks talking over shared memory"),
)}

DEFAULT_DEVICE = "rpi3"


def device_names() -> list:
    return sorted(DEVICES)


#: ``NAME:compute`` names NAME's compute with a free link (:func:`compute_only`)
COMPUTE_ONLY = ":compute"


def get_device(device: "str | DeviceModel" = DEFAULT_DEVICE) -> DeviceModel:
    """Look up a device by name (a :class:`DeviceModel` passes through); ``NAME:compute`` is
    :func:`compute_only` of ``NAME``."""
    if isinstance(device, DeviceModel):
        return device
    if isinstance(device, str) and device.endswith(COMPUTE_ONLY):
        return compute_only(get_device(device[:-len(COMPUTE_ONLY)]))
    try:
        return DEVICES[device]
    except KeyError:
        raise ValueError(f"unknown device {device!r}; known devices: {', '.join(device_names())} "
                         f"(NAME{COMPUTE_ONLY}: its compute only)") from None


def compute_only(device: "str | DeviceModel") -> DeviceModel:
    """``device`` with a free link (no latency, unbounded bandwidth): a worker emulating it pads only its
    compute, and its transfers take what a real network takes (the namespace cluster's shaped links,
    ``--device rpi3:compute``)."""
    device = get_device(device)
    return replace(device, name=f"{device.name}{COMPUTE_ONLY}", bandwidth_MBps=math.inf, latency_s=0.0)


_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmg])(bit/s|bit|bps|B/s|B)\s*$", re.IGNORECASE)


def parse_rate(text: str) -> float:
    """A link rate in bytes per second: ``100mbit`` (or ``100Mbit/s``, ``100mbps``), ``20mbit``,
    ``1gbit``, ``500kbit``; a capital B counts bytes: ``12.5MB/s``."""
    match = _RATE.match(str(text))
    bytes_unit = match is not None and match[3] in ("B", "B/s")
    if not match or not float(match[1]) > 0 or (match[3].lower() in ("b", "b/s") and not bytes_unit):
        raise ValueError(f"link rate {text!r}: expected a positive number and a unit, e.g. 100mbit, 20mbit, "
                         f"1gbit, 500kbit (bits) or 12.5MB/s (bytes)")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}[match[2].lower()]
    return float(match[1]) * scale / (1 if bytes_unit else 8)


def with_link(device: "str | DeviceModel", rate=None) -> DeviceModel:
    """``device`` with its link's bandwidth set to ``rate`` (bytes/s or a :func:`parse_rate` text);
    ``None`` keeps the device's own link.  The message latency stays the device's."""
    device = get_device(device)
    if rate is None:
        return device
    bps = parse_rate(rate) if isinstance(rate, str) else float(rate)
    if not bps > 0:
        raise ValueError(f"link rate must be > 0 bytes/s, got {rate!r}")
    return replace(device, name=f"{device.name}@{format_rate(bps)}", bandwidth_MBps=bps / 1e6)


def format_rate(bps: float) -> str:
    """Bytes/s as the link rate people say: ``12.5e6`` -> ``"100Mbit/s"``."""
    bits = 8 * bps
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit/s"


def measure_local(seconds: float = 0.2, size: int = 512) -> DeviceModel:
    """Measure this machine's GEMM and copy speed with numpy (one short benchmark each).

    Network numbers are those of ``local`` (shared memory).  Takes about ``2 * seconds``.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)

    def rate(fn, work):
        fn()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            count += 1
        return work * count / (time.perf_counter() - start)

    gflops = rate(lambda: a @ b, 2.0 * size ** 3) / 1e9
    src = np.ones(8 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    mem = rate(lambda: np.copyto(dst, src), 2.0 * src.nbytes) / 1e9
    return replace(DEVICES["local"], name="local-measured", gflops=gflops, mem_GBps=mem)
