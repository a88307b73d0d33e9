"""Discrete-event simulator of the coded inference protocol, vectorised over requests.

It runs the same :class:`~mpicdc.core.plan.Plan`, codes and delay models as the MPI
runtime, but with time computed instead of spent, so it scales to thousands of
devices and requests.  For every request, layer by layer in graph order:

1. **send** -- the master sends the layer input (``4 * prod(input shape)`` bytes) to
   every rank of the layer it does not know to be dead (a band split,
   :mod:`mpicdc.core.bands`: each rank its band of the input, halo included, after the
   master spent ``prepare`` cutting the bands and encoding the parity inputs).  On a ``shared`` link the
   sends leave one after another in block order (the k-th arrives after
   ``latency + k * size / bandwidth``); on a ``fair`` link they share it equally
   (concurrent TCP flows through one shaped port) and all arrive after
   ``latency + m * size / bandwidth`` for ``m`` sends; on a ``parallel`` link all take
   ``latency + size / bandwidth``.
2. **compute** -- each rank starts when the input is there and it is free, and takes
   ``device.gemm_time(rows, cols, spatial)`` for its block (parity blocks have the
   padded ``block_rows``), times its ``slowdown``.  A rank still busy with an older
   layer skips that older job if the new one arrived before it could start it
   (the runtime's stale-work rule).
3. **straggle** -- the reply is held back by a sample of the rank's delay model
   (per-rank ``delay:`` injections override the default).
4. **reply** -- ``4 * rows * spatial`` bytes back; on a ``shared`` or ``fair`` link replies queue
   first-come first-served at the master's link.
5. **decode** -- the master takes replies in arrival order until the set in hand is
   decodable (closed forms for uncoded, sum, MDS, groups and replication codes;
   ``code_obj.decodable`` otherwise), then spends
   ``missing * master.compute_time(2 n E, 4 (n + 1) E)`` decoding, with ``E`` the
   elements of one block: each missing block is a combination of up to ``n``
   received blocks (an upper bound for sum and group codes; scaled by
   ``SimConfig.decode_scale``).
6. **master work** -- nonlinear layers (ReLU, pools, LRN, softmax, ...) and linear
   layers without a layer plan run on the master's device, costed by the same
   roofline (:func:`nonlinear_work`).

A layer whose replies never become decodable fails the request (``ok = False``,
latency NaN).  Dead ranks come from ``failures`` (dead from the start, known to
the master), ``fail_prob`` (each worker independently unavailable for a whole
request, unknown to the master) and crash/hang/exit injections (firing at the
request and layer the runtime would fire them; crashed and exited ranks are
known dead from the next request on, hung ranks never).

Simplifications, stated: requests are independent (each starts on an idle
cluster), links are full duplex (sends and replies do not contend), late replies
of an earlier layer do not occupy the link, and the master's own compute does not
overlap with its sends.  Randomness comes from ``numpy.random.SeedSequence(seed)``
spawned per chunk of ``SimConfig.chunk`` requests, so a seed reproduces a run
exactly (for the same chunk size).

Run ``python -m mpicdc.sim --help`` for the command line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

import numpy as np

from mpicdc.core import bands as band_split
from mpicdc.core.decodability import Decodability, decode_structure
from mpicdc.core.faults import (
    DELAY_HELP,
    INJECT_HELP,
    Injections,
    parse_delay,
    parse_injections,
)
from mpicdc.core.graph import LayerExecutor, walk
from mpicdc.core.grouped import stored_cols
from mpicdc.core.models import Model, get_model, model_names
from mpicdc.sim.devices import DEFAULT_DEVICE, DeviceModel, device_names, get_device


__all__ = ["Link", "SimConfig", "SimResult", "Decodability", "decode_structure", "simulate",
           "nonlinear_work", "main"]


class Link(Enum):
    """How the master's network link is shared."""

    SHARED = "shared"      # one radio / port: sends serialise, replies queue FIFO
    PARALLEL = "parallel"  # every transfer independent (ideal switch)
    FAIR = "fair"          # one shaped port whose concurrent sends share it equally (TCP flows); replies FIFO


@dataclass(frozen=True)
class SimConfig:
    """Knobs of the timing model (defaults follow the module docstring).

    Parameters
    ----------
    link : :class:`Link` or its value.
    nonlinear : charge the master for nonlinear layers.
    decode_scale : multiplier on the decode-time model (0 makes decoding free).
    delay_blocks_worker : if True the straggler delay keeps the worker busy (as a
        worker that sleeps before replying would); by default it is network time.
    chunk : requests simulated together (memory is about ``12 * chunk * world_size``
        float64); part of the random stream, so keep it fixed to reproduce a run.
    verify : random erasure patterns on which a closed-form decodability rule is
        checked against ``code_obj.decodable`` before it is trusted.
    """

    link: Link = Link.SHARED
    nonlinear: bool = True
    decode_scale: float = 1.0
    delay_blocks_worker: bool = False
    chunk: int = 1024
    verify: int = 200

    def __post_init__(self):
        object.__setattr__(self, "link", Link(self.link))
        if not self.decode_scale >= 0:
            raise ValueError(f"decode_scale must be >= 0, got {self.decode_scale}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")


# ---------------------------------------------------------------------------------------------
# static costs of every step


def nonlinear_work(op: str, in_shapes: Sequence[tuple], out_shape: tuple, attrs: dict) -> tuple:
    """``(flops, bytes)`` of one nonlinear layer on the master (float32 roofline inputs).

    Elementwise ops read and write each element once (clip and hard-sigmoid 2
    flops, hard-swish 4); pooling reads its window; LRN sums ``size`` squares;
    channel shuffle, pad, slice and concat are copies; views (flatten,
    identity) are free.
    """
    out = math.prod(out_shape)
    inn = sum(math.prod(s) for s in in_shapes)
    if op in ("flatten", "identity"):
        return 0.0, 0.0
    if op in ("maxpool", "avgpool"):
        return float(out * math.prod(attrs.get("kernel", [1]))), 4.0 * (inn + out)
    if op == "lrn":
        return float(out * (attrs.get("size", 5) + 4)), 8.0 * out
    if op == "softmax":
        return 4.0 * out, 8.0 * out
    if op in ("batchnorm",):
        return 2.0 * out, 8.0 * out
    if op in ("concat", "channel_shuffle", "pad", "slice"):
        return 0.0, 8.0 * out   # copies
    if op in ("clip", "hardsigmoid"):
        return 2.0 * out, 8.0 * out
    if op == "hardswish":
        return 4.0 * out, 8.0 * out
    return float(inn), 4.0 * (inn + out)  # relu, add (any number of inputs), gap, gmp


@dataclass
class _MasterStep:
    name: str
    seconds: float


@dataclass
class _DistStep:
    name: str
    n: int
    ranks: np.ndarray        # (m,) rank of each block
    latency: float           # one-way latency of every message
    send: float              # size / bandwidth of the layer input
    reply: np.ndarray        # (m,) size / bandwidth of each reply
    compute: np.ndarray      # (m,) seconds per block before slowdown
    decode_cost: float       # master seconds per missing block
    rule: Decodability
    prepare: float = 0.0     # master seconds before the first send (band split: cut bands, encode parity inputs)
    banded: bool = False     # a band split: ``send`` is one block's band, not the whole input
    master: float = 0.0      # master seconds on its own band, between posting the sends and waiting
    compute_slow: np.ndarray = None   # compute times the rank's slowdown (set by simulate)
    columns: object = None            # ranks as a slice when contiguous (views, not copies)
    delay_groups: list = None         # [(DelayModel, block indices)] (set by simulate)


class _StepExecutor(LayerExecutor):
    """A graph walk whose values are shapes: each layer appends its step to ``steps``.

    Linear layers with a layer plan go to ``distributed(layer, lp, in_shape,
    out_shape)``; the others, and nonlinear layers, become master steps costed
    on ``master``.  No ReLU fusion: the master's ReLU steps are costed too.
    """

    def __init__(self, model: Model, plan, master: DeviceModel, config: SimConfig, distributed):
        self.shapes, self.wshapes = model.shapes(), model.weight_shapes()
        self.plan, self.master, self.config, self.distributed = plan, master, config, distributed
        self.steps: list = []

    def linear(self, layer, x, *, relu=False):
        out_shape = self.shapes[layer.name]
        lp = self.plan.for_layer(layer.name)
        if lp is not None:
            self.steps.append(self.distributed(layer, lp, x, out_shape))
            return out_shape
        rows, cols = self.wshapes[layer.name]
        self.steps.append(_MasterStep(layer.name, float(self.master.gemm_time(rows, cols,
                                                                             math.prod(out_shape[1:])))))
        return out_shape

    def nonlinear(self, layer, inputs):
        out_shape = self.shapes[layer.name]
        seconds = 0.0
        if self.config.nonlinear:
            seconds = float(self.master.compute_time(*nonlinear_work(layer.op, inputs, out_shape,
                                                                     layer.attrs)))
        self.steps.append(_MasterStep(layer.name, seconds))
        return out_shape


def _steps(model: Model, plan, device: DeviceModel, master: DeviceModel, config: SimConfig) -> list:
    bw = device.bandwidth_MBps * 1e6

    def distributed(layer, lp, in_shape, out_shape) -> _DistStep:
        if lp.banded:
            return banded(layer, lp)
        spatial = math.prod(out_shape[1:])
        block_rows = np.array([b - a for a, b in lp.rows] + [lp.block_rows] * lp.r, dtype=float)
        block_cols = np.array([stored_cols(model, lp, i) for i in range(lp.n + lp.r)], dtype=float)  # grouped parity
        elems = lp.block_rows * spatial
        dec_flops, dec_bytes = 2.0 * lp.n * elems, 4.0 * (lp.n + 1) * elems
        return _DistStep(
            name=layer.name, n=lp.n, ranks=np.asarray(lp.ranks, dtype=np.intp),
            latency=device.latency_s,
            send=4.0 * math.prod(in_shape) / bw,
            reply=4.0 * block_rows * spatial / bw,
            compute=np.asarray(device.gemm_time(block_rows, block_cols, spatial), dtype=float),
            decode_cost=config.decode_scale * float(master.compute_time(dec_flops, dec_bytes)),
            rule=lp.code_obj.decodability(config.verify))

    def banded(layer, lp) -> _DistStep:
        geo = band_split.layer_geometry(model, lp)
        m = lp.n + lp.r
        rows, cols = model.weight_shapes()[layer.name]
        band_in, elems = math.prod(geo.input_shape), math.prod(geo.block_shape)
        spatial = elems // rows
        dec_flops, dec_bytes = 2.0 * lp.n * elems, 4.0 * (lp.n + 1) * elems
        out = math.prod(geo.out_shape)
        # cut n bands (copies), encode r parity inputs from them, add the bias to the assembled output
        prep_flops = lp.r * lp.n * band_in + out
        prep_bytes = 4.0 * (2 * lp.n * band_in + lp.r * (lp.n + 1) * band_in + 2 * out)
        own = 0.0
        if geo.master is not None:  # its band's input copied out, then the conv of its rows
            own = float(master.compute_time(0.0, 8.0 * geo.in_shape[0] * geo.in_shape[2] * (
                (lp.master_rows - 1) * geo.stride + geo.kernel)))
            own += float(master.gemm_time(rows, cols, lp.master_rows * geo.out_shape[2]))
        return _DistStep(
            name=layer.name, n=lp.n, ranks=np.asarray(lp.ranks, dtype=np.intp),
            latency=device.latency_s,
            send=4.0 * band_in / bw,
            reply=np.full(m, 4.0 * elems / bw),
            compute=np.full(m, float(device.gemm_time(rows, cols, spatial))),
            decode_cost=config.decode_scale * float(master.compute_time(dec_flops, dec_bytes)),
            rule=lp.code_obj.decodability(config.verify),
            prepare=float(master.compute_time(prep_flops, prep_bytes)), banded=True, master=own)

    executor = _StepExecutor(model, plan, master, config, distributed)
    walk(model, tuple(model.input_shape), executor)
    return executor.steps


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class SimResult:
    """Per-request outcome of :func:`simulate`.

    Attributes
    ----------
    latency : seconds per request (NaN where the request failed).
    ok : True where every layer decoded.
    failed_layer : name of the layer that failed each request ("" when ok).
    layer_times : ``{layer: seconds per request}`` when ``breakdown=True``.
    layer_missing : ``{distributed layer: data blocks decoded per request}`` when ``breakdown=True``.
    meta : what was simulated (model, plan tag, device, delay spec, seed, ...).
    """

    latency: np.ndarray
    ok: np.ndarray
    failed_layer: np.ndarray
    layer_times: dict | None = None
    layer_missing: dict | None = None
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Mean, std, p50, p95, p99, min and max latency over the successful requests (s), and success rate."""
        good = self.latency[self.ok]
        stats = {"requests": int(self.ok.size), "succeeded": int(self.ok.sum()),
                 "success_rate": float(self.ok.mean()) if self.ok.size else math.nan}
        if good.size:
            p50, p95, p99 = np.percentile(good, [50, 95, 99])
            stats.update(mean=float(good.mean()), std=float(good.std()), p50=float(p50),
                         p95=float(p95), p99=float(p99), min=float(good.min()), max=float(good.max()))
        else:
            stats.update({k: math.nan for k in ("mean", "std", "p50", "p95", "p99", "min", "max")})
        return stats

    def breakdown_means(self) -> dict:
        """Mean seconds per layer over successful requests (needs ``breakdown=True``)."""
        if self.layer_times is None:
            raise ValueError("run simulate(..., breakdown=True) to get per-layer times")
        return {name: float(np.mean(v[self.ok])) if self.ok.any() else math.nan
                for name, v in self.layer_times.items()}


# ---------------------------------------------------------------------------------------------
# the simulation


@dataclass
class _Faults:
    """Per-rank failure schedule: rank -> (request, step) from which it no longer replies."""

    silent_from: dict      # rank -> (request, step index)
    known_after: dict      # rank -> request after which the master knows it is dead
    persistent: np.ndarray  # bool (world,) dead from the start, known


def _fault_schedule(steps, world: int, failures, injections: Injections, layer_names) -> _Faults:
    persistent = np.zeros(world, dtype=bool)
    for rank in failures:
        if not 1 <= int(rank) < world:
            raise ValueError(f"failed rank {rank} is outside the workers 1..{world - 1}")
        persistent[int(rank)] = True
    injections.validate(world, layer_names)
    first_step: dict = {}
    step_of: dict = {}
    for si, st in enumerate(steps):
        if isinstance(st, _DistStep):
            step_of[st.name] = si
            for rank in st.ranks.tolist():
                first_step.setdefault(rank, si)
    silent, known = {}, {}
    for inj in injections.failures():
        for rank in (inj.ranks or range(1, world)):
            if rank not in first_step:
                continue  # never given a job, so never fires
            req, si = inj.request, first_step[rank]
            if inj.layer is not None:
                s = step_of.get(inj.layer)
                if s is not None and rank in steps[s].ranks:
                    si = s
                else:
                    req += 1  # fires at the rank's first job of the next request
            if rank not in silent or (req, si) < silent[rank]:
                silent[rank] = (req, si)
                if inj.kind in ("crash", "exit"):
                    known[rank] = req
                else:
                    known.pop(rank, None)
    return _Faults(silent, known, persistent)


def _resolve_slowdown(slowdown, world: int) -> np.ndarray:
    out = np.ones(world)
    if slowdown is None:
        return out
    if isinstance(slowdown, dict):
        for rank, factor in slowdown.items():
            if not 1 <= int(rank) < world:
                raise ValueError(f"slowdown for rank {rank}: outside the workers 1..{world - 1}")
            out[int(rank)] = float(factor)
    else:
        values = np.asarray(slowdown, dtype=float)
        if values.shape != (world,):
            raise ValueError(f"slowdown needs one factor per rank ({world}), got shape {values.shape}")
        out = values.copy()
    if not np.all(out > 0):
        raise ValueError(f"slowdown factors must be > 0, got {out[~(out > 0)]}")
    return out


def simulate(model, plan, *, requests: int, device="rpi3", delay=None, failures=(),
             fail_prob: float = 0.0, injections=None, slowdown=None, master_device=None,
             seed: int = 0, config: SimConfig | None = None, breakdown: bool = False) -> SimResult:
    """Simulate ``requests`` independent inference requests of ``model`` under ``plan``.

    Local, pure computation (no MPI).

    Parameters
    ----------
    model : :class:`~mpicdc.core.models.Model` or zoo name; must be the plan's model.
    plan : :class:`~mpicdc.core.plan.Plan` (``make_plan``); its codes give decodability.
    requests : number of requests.
    device : worker :class:`~mpicdc.sim.devices.DeviceModel` or registry name; its link
        is the network between master and workers.
    delay : default straggler :class:`~mpicdc.core.faults.DelayModel` or spec (None: no delay).
    failures : worker ranks dead from the start (the master knows and skips them).
    fail_prob : probability that a worker is unavailable for a whole request, i.i.d.
    injections : :class:`~mpicdc.core.faults.Injections` or list of ``--inject`` specs
        (per-rank delays; crash/hang/exit at a request and layer).
    slowdown : ``{rank: factor}`` or one factor per rank multiplying compute time.
    master_device : the master's device (default: ``device``).
    seed : seed of the random stream.
    config : :class:`SimConfig`.
    breakdown : also record per-layer times and decoded-block counts.
    """
    config = config or SimConfig()
    model = get_model(model) if isinstance(model, str) else model
    plan.validate(model)
    if requests < 0:
        raise ValueError(f"requests must be >= 0, got {requests}")
    if not 0 <= fail_prob <= 1:
        raise ValueError(f"fail_prob must be in [0, 1], got {fail_prob}")
    device = get_device(device)
    master = get_device(master_device) if master_device is not None else device
    default_delay = parse_delay(delay)
    if not isinstance(injections, Injections):
        injections = parse_injections(list(injections or ()))
    world = plan.world_size
    steps = _steps(model, plan, device, master, config)
    faults = _fault_schedule(steps, world, failures, injections, [l.name for l in model.layers])
    slow = _resolve_slowdown(slowdown, world)
    delays = [injections.delay_for(r) or default_delay for r in range(world)]
    for st in steps:  # group the blocks of each step by delay model, once
        if isinstance(st, _DistStep):
            groups: dict = {}
            for b, rank in enumerate(st.ranks.tolist()):
                groups.setdefault(delays[rank], []).append(b)
            st.delay_groups = [(m, np.array(bs, dtype=np.intp)) for m, bs in groups.items()]
            st.compute_slow = st.compute * slow[st.ranks]
            lo = int(st.ranks[0])
            contiguous = np.array_equal(st.ranks, np.arange(lo, lo + st.ranks.size))
            st.columns = slice(lo, lo + st.ranks.size) if contiguous else st.ranks

    latency = np.empty(requests)
    failed_step = np.full(requests, -1, dtype=np.intp)
    times = {st.name: np.empty(requests) for st in steps} if breakdown else None
    missing = {st.name: np.zeros(requests, dtype=np.int32) for st in steps
               if isinstance(st, _DistStep)} if breakdown else None
    chunks = range(0, requests, config.chunk)
    seeds = np.random.SeedSequence(seed).spawn(len(chunks))
    with np.errstate(invalid="ignore"):
        for ss, lo in zip(seeds, chunks):
            hi = min(lo + config.chunk, requests)
            _run_chunk(steps, np.arange(lo, hi), np.random.default_rng(ss), world, fail_prob,
                       faults, config, latency[lo:hi], failed_step[lo:hi],
                       {k: v[lo:hi] for k, v in times.items()} if breakdown else None,
                       {k: v[lo:hi] for k, v in missing.items()} if breakdown else None)
    ok = np.isfinite(latency)
    latency[~ok] = np.nan
    names = np.array([st.name for st in steps] + [""], dtype=object)
    meta = {"model": model.name, "plan": plan.tag, "world_size": world, "workers": plan.workers,
            "parity": plan.parity, "code": plan.code, "device": device.name, "master_device": master.name,
            "delay": default_delay.spec, "injections": injections.specs, "failures": sorted(map(int, failures)),
            "fail_prob": fail_prob, "seed": seed, "link": config.link.value,
            "rules": {st.name: st.rule.kind for st in steps if isinstance(st, _DistStep)}}
    return SimResult(latency, ok, names[failed_step], times, missing, meta)


def _run_chunk(steps, req, rng, world, fail_prob, faults: _Faults, config: SimConfig,
               latency_out, failed_out, times_out, missing_out):
    R = req.size
    t = np.zeros(R)
    drop = rng.random((R, world)) < fail_prob if fail_prob > 0 else None
    if drop is not None:
        drop[:, 0] = False
    busy_start = np.full((R, world), -np.inf)  # start of each rank's latest job
    busy_end = np.zeros((R, world))            # and when that job frees the rank
    shared = config.link in (Link.SHARED, Link.FAIR)
    fair = config.link is Link.FAIR
    for si, st in enumerate(steps):
        t_before = t
        if isinstance(st, _MasterStep):
            t = t + st.seconds
        else:
            cols = st.columns
            m = st.ranks.size
            t = t + st.prepare
            known, silent = _masks(st, si, req, faults, drop)
            if not shared:
                arrive = t[:, None] + (st.latency + st.send)
            elif fair:  # every send shares the link until all are through
                sent = m if known is None else np.count_nonzero(~known, axis=1)[:, None]
                arrive = t[:, None] + st.latency + sent * st.send + np.zeros((1, m))
            elif known is None:
                arrive = t[:, None] + (st.latency + st.send * np.arange(1, m + 1))
            else:
                arrive = t[:, None] + st.latency + np.cumsum(~known, axis=1) * st.send
            bs, be = busy_start[:, cols], busy_end[:, cols]
            # a rank still busy starts when free; an older job not yet started is skipped
            start = np.maximum(arrive, np.where(arrive <= bs, bs, be))
            done = start + st.compute_slow
            ready = np.empty((R, m))
            for model, blocks in st.delay_groups:
                ready[:, blocks] = model.sample(rng, (R, blocks.size))
            ready += done
            if silent is not None:
                ready[silent] = np.inf
            arrival = _fifo(ready, st.reply) if shared else ready + st.reply
            arrival += st.latency
            tstar = st.rule.time(arrival)
            if st.master:  # the master's own band, computed after posting the sends
                tstar = np.maximum(tstar, t + st.master)
            lost = np.count_nonzero(arrival[:, :st.n] > tstar[:, None], axis=1)
            t = tstar + lost * st.decode_cost
            end = ready if config.delay_blocks_worker else done
            if silent is None:
                busy_start[:, cols], busy_end[:, cols] = start, end
            else:
                ran = ~(silent | known)
                busy_start[:, cols] = np.where(ran, start, bs)
                busy_end[:, cols] = np.where(ran, end, be)
            if missing_out is not None:
                missing_out[st.name][:] = lost
        newly = ~np.isfinite(t) & (failed_out < 0)
        failed_out[newly] = si
        if times_out is not None:
            times_out[st.name][:] = t - t_before
    latency_out[:] = t


def _masks(st: _DistStep, si: int, req: np.ndarray, faults: _Faults, drop):
    """``(known, silent)`` block masks of one step: not sent to / never replies (None: no faults)."""
    ranks = st.ranks
    hit = [(b, r) for b, r in enumerate(ranks.tolist())
           if r in faults.silent_from or r in faults.known_after]
    persistent = faults.persistent[ranks]
    if not hit and not persistent.any() and drop is None:
        return None, None
    R, m = req.size, ranks.size
    known = np.broadcast_to(persistent, (R, m)).copy()
    silent = known.copy()
    for b, rank in hit:
        if rank in faults.silent_from:
            q, s0 = faults.silent_from[rank]
            silent[:, b] |= (req > q) | ((req == q) & (si >= s0))
        if rank in faults.known_after:
            known[:, b] |= req > faults.known_after[rank]
    if drop is not None:
        silent |= drop[:, st.columns]
    return known, silent | known


def _fifo(ready: np.ndarray, service: np.ndarray) -> np.ndarray:
    """Departure times of a FIFO single server: jobs arrive at ``ready``, job b needs ``service[b]``.

    In arrival order, ``finish_k = max(ready_k, finish_{k-1}) + s_k``, which unrolls to
    ``C_k + max_{j <= k} (ready_j - C_{j-1})`` with ``C`` the cumulative service.
    """
    order = np.argsort(ready, axis=1, kind="stable")
    r_sorted = np.take_along_axis(ready, order, axis=1)
    s_sorted = service[order]
    c = np.cumsum(s_sorted, axis=1)
    finish_sorted = c + np.maximum.accumulate(r_sorted - (c - s_sorted), axis=1)
    out = np.empty_like(ready)
    np.put_along_axis(out, order, finish_sorted, axis=1)
    return out


# ---------------------------------------------------------------------------------------------
# command line

_EPILOG = f"""\
what it does:
  Builds the plan of `python -m mpicdc.run` (every conv/dense layer split by output rows over
  N data workers, plus R parity workers of CODE), then simulates K requests: the master sends
  each layer's input, workers compute their block at the device's speed, replies are delayed by
  the straggler model, and the master decodes from the first decodable set of replies.
  Prints latency statistics over successful requests and the success rate.

codes: sum (default, as python -m mpicdc.run and prepare) | none | replication | groups:G | mds
models: {', '.join(model_names())}
devices: {', '.join(device_names())}

{DELAY_HELP}

{INJECT_HELP}

examples:
  python -m mpicdc.sim alexnet --workers 4 --requests 10000 --delay wifi:0.05   # sum code, 1 parity
  python -m mpicdc.sim vgg16 --workers 8 --code none --delay shexp:0.01,0.05 --fail-prob 0.01
  python -m mpicdc.sim vgg16 --workers 990 --parity 10 --code groups:10 --requests 10000 \\
      --delay pareto:0.002,2 --link parallel --json out.json
  python -m mpicdc.sim alexnet --workers 4 --code sum --inject crash:2@100 --breakdown
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpicdc.sim", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Simulate coded distributed DNN inference on many devices and requests.",
        epilog=_EPILOG)
    p.add_argument("model", help=f"zoo model ({', '.join(model_names())})")
    p.add_argument("--workers", "-n", type=int, required=True, help="data workers N (ranks 1..N)")
    p.add_argument("--parity", "-r", type=int, default=None,
                   help="parity workers R (implied by sum, groups:G, none)")
    p.add_argument("--code", default="sum", help="code spec (default: sum, as run and prepare; see below)")
    p.add_argument("--requests", "-k", type=int, default=1000, help="requests to simulate (default 1000)")
    p.add_argument("--delay", default="none", help="straggler delay model of every worker (see below)")
    p.add_argument("--device", default=DEFAULT_DEVICE, help=f"worker device (default {DEFAULT_DEVICE})")
    p.add_argument("--master-device", default=None, help="master device (default: --device)")
    p.add_argument("--link", choices=[l.value for l in Link], default=Link.SHARED.value,
                   help="shared: the master's link serialises transfers (WiFi); fair: its concurrent sends "
                        "share it equally (TCP through one shaped port), replies queue; parallel: independent")
    p.add_argument("--fail-prob", type=float, default=0.0,
                   help="probability a worker is unavailable for a whole request")
    p.add_argument("--fail", default="", help="ranks dead from the start, e.g. 3 or 2,5")
    p.add_argument("--inject", action="append", default=[], metavar="SPEC",
                   help="fault injection (repeatable; see below)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random stream: straggler delays and --fail-prob draws (default 0); the same seed "
                        "and options give the same numbers")
    p.add_argument("--breakdown", action="store_true", help="print mean time per layer")
    p.add_argument("--json", metavar="PATH", help="write summary (and per-layer means) as JSON")
    return p


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    from mpicdc.core.plan import make_plan
    try:
        model = get_model(args.model)
        plan = make_plan(model, args.workers, args.parity, args.code)
        try:
            failures = [int(x) for x in args.fail.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--fail {args.fail!r}: expected rank numbers like 3 or 2,5") from None
        result = simulate(model, plan, requests=args.requests, device=args.device, delay=args.delay,
                          failures=failures, fail_prob=args.fail_prob, injections=args.inject,
                          master_device=args.master_device, seed=args.seed,
                          config=SimConfig(link=args.link), breakdown=args.breakdown)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = result.summary()
    meta = result.meta
    print(f"{meta['model']} plan {meta['plan']} (world {meta['world_size']}), device {meta['device']}, "
          f"link {meta['link']}, delay {meta['delay']}, {s['requests']} requests, seed {meta['seed']}")
    print(f"success {100 * s['success_rate']:.2f}%  mean {1e3 * s['mean']:.2f} ms  p50 {1e3 * s['p50']:.2f}"
          f"  p95 {1e3 * s['p95']:.2f}  p99 {1e3 * s['p99']:.2f}  max {1e3 * s['max']:.2f} ms")
    out = {"summary": s, "meta": meta}
    if args.breakdown:
        means = result.breakdown_means()
        out["layer_means_s"] = means
        for name, value in means.items():
            if value > 0:
                print(f"  {name:<14} {1e3 * value:10.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
