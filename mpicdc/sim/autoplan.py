"""Network-aware planning: distribute a layer only where the compute saved beats the bytes moved.

Output splitting sends a layer's whole input to every worker, so on a slow link a
conv layer with a large input is faster on the master alone (VGG16's conv1_2 reads
12.8 MB: four workers on a shared 100 Mbit/s link spend 4 s receiving it).
:func:`auto_plan` costs every linear layer every way -- on the master, split by output
rows, and for a 2-D conv split into bands of its output height, which sends each rank only
its band of the input (:mod:`mpicdc.core.bands`) -- with the simulator's own timing model
(:func:`layer_costs`: one request, no stragglers) and keeps each layer where it is
fastest, then repairs memory:

* the weights the master keeps must fit its budget: over it, the layers that lose
  least per byte moved are distributed instead (a layer larger than the master's
  whole budget is always distributed);
A band layer may also give the master a band of its own (``LayerPlan.master_rows``, the last
output rows), which it computes between posting the sends and waiting for the replies: no
parity covers it (the master cannot fail alone), so it takes work and reply bytes off the
link.  Its size is chosen per layer among :func:`master_band_choices` (the master also cuts
bands, encodes and decodes, so its best share may differ from a worker's); it costs no memory
(the master already holds a band layer's whole kernel).

* each worker's shard must fit its budget: over it, band layers (every rank holds the
  whole kernel) are split by rows instead, then distributed layers move back to the
  master while it has room, and a plan that still does not fit is refused.

A device's budget for weights is its RAM (``DeviceModel.memory_MB``) less
:data:`OS_RESERVE_MB` and the model's largest layer workspace (the lowered input
and the output of one GEMM); ``memory_limit`` overrides it for every device.
Per-layer choices add up because requests see an idle cluster at every layer
(the simulator's workers have finished before the master decodes), so the auto
plan models no slower than the even plan or one device; ``tests/test_autoplan.py``
checks this against :func:`~mpicdc.sim.engine.simulate`.
"""
from __future__ import annotations

import math

from mpicdc.core.bands import band_problem
from mpicdc.core.models import Model, get_model
from mpicdc.core.plan import Plan, make_plan, parity_count, rank_bytes, single_device_plan
from mpicdc.sim.devices import DeviceModel, format_rate, get_device, with_link

__all__ = ["MAX_MASTER_CHOICES", "MAX_MASTER_SHARE", "OS_RESERVE_MB", "auto_plan", "format_costs", "layer_costs",
           "layer_terms", "master_band_choices", "memory_budget", "modeled_latency", "weight_bytes"]

#: RAM not available for weights [estimate]: Raspberry Pi OS Lite after boot (about 100 MB),
#: the default 76 MB GPU split, and Python with numpy, h5py and mpi4py loaded (about 70 MB).
OS_RESERVE_MB = 250.0

#: The largest master band :func:`auto_plan` tries, in units of an even share ``H / (n + 1)`` (``H``
#: the output height, ``n`` data workers): the master also runs every other layer, cuts the bands and
#: decodes, and larger shares change which layers leave the master on slow links (not explored yet).
MAX_MASTER_SHARE = 2.0

#: At most this many master band sizes per layer besides 0 (each is one simulation of the model).
MAX_MASTER_CHOICES = 8


def master_band_choices(model: Model, name: str, n: int) -> list:
    """Master band sizes worth modelling for band layer ``name`` over ``n`` data workers: 0, and for
    each worker band height ``h`` the smallest master band that leaves every worker ``h`` rows or
    fewer, ``H - n h`` (every band is as tall as the tallest, so rows in between buy nothing), up
    to :data:`MAX_MASTER_SHARE` even shares; at most :data:`MAX_MASTER_CHOICES` of them, spread
    evenly, the largest kept."""
    H = model.shapes()[name][1]
    cap = min(H - n, MAX_MASTER_SHARE * H / (n + 1))
    sizes = [k for k in (H - n * h for h in range(-(-H // n) - 1, 0, -1)) if k <= cap]
    if len(sizes) > MAX_MASTER_CHOICES:
        step = len(sizes) / MAX_MASTER_CHOICES
        sizes = [sizes[len(sizes) - 1 - int(i * step)] for i in range(MAX_MASTER_CHOICES)][::-1]
    return [0] + sizes


def weight_bytes(model: Model, layer: str) -> int:
    """float32 bytes of one linear layer's weights and bias."""
    rows, cols = model.weight_shapes()[layer]
    return 4 * rows * (cols + 1)


def _workspace_bytes(model: Model) -> float:
    """Largest float32 GEMM workspace of one layer: lowered input (cols x spatial) and output."""
    shapes = model.shapes()
    return max((4.0 * (rows + cols) * math.prod(shapes[name][1:])
                for name, (rows, cols) in model.weight_shapes().items()), default=0.0)


def memory_budget(model: Model, device: DeviceModel, memory_limit: float | None = None) -> float:
    """Bytes of weights one device may hold: ``memory_limit`` when given, else its RAM less
    :data:`OS_RESERVE_MB` and the model's largest layer workspace (``inf`` for unbounded RAM)."""
    if memory_limit is not None:
        if not memory_limit > 0:
            raise ValueError(f"memory_limit must be > 0 bytes, got {memory_limit}")
        return float(memory_limit)
    return device.memory_MB * 1e6 - OS_RESERVE_MB * 1e6 - _workspace_bytes(model)


def layer_costs(model: Model, plan: Plan, device, link=None, master=None, speeds=None) -> dict:
    """``{layer: seconds}`` of one request under ``plan``: every layer of the graph, linear ones
    distributed (send, compute, reply, decode) or on the master, the others on the master.

    The simulator's deterministic case (no stragglers, shared link); ``link`` is a rate
    (``100mbit`` or bytes/s, :func:`~mpicdc.sim.devices.with_link`), None: the device's own;
    ``speeds`` gives data worker ``i`` (rank ``i + 1``) ``speeds[i]`` times the device's speed.
    """
    from mpicdc.sim.engine import simulate

    device = with_link(device, link)
    master_device = device if master is None else get_device(master)
    slowdown = None if speeds is None else {rank: 1.0 / s for rank, s in enumerate(speeds, 1)}
    result = simulate(model, plan, requests=1, device=device, master_device=master_device,
                      slowdown=slowdown, breakdown=True)
    return {name: float(v[0]) for name, v in result.layer_times.items()}


def layer_terms(model: Model, plan: Plan, device, link=None, master=None) -> dict:
    """``{distributed layer: {"send", "compute", "reply", "decode", "master", "floor"}}`` seconds: the
    terms of :func:`layer_costs` for one request without stragglers.  ``send`` is the input to every
    block's rank in turn, ``compute`` the slowest block, ``reply`` every block's output, ``decode`` one
    lost block, ``master`` the master's own band (overlapping the rest); ``floor`` (input once, output
    once, two latencies) bounds the layer over any number of workers, so a layer whose ``floor``
    exceeds its master time cannot gain from splitting (unless the master computes a band)."""
    from mpicdc.sim.engine import SimConfig, _DistStep, _steps

    device = with_link(device, link)
    master_device = device if master is None else get_device(master)
    out = {}
    for st in _steps(model, plan, device, master_device, SimConfig()):
        if isinstance(st, _DistStep):
            once = st.n * st.send if st.banded else st.send  # the input sent once (bands: with halos)
            out[st.name] = {"send": st.ranks.size * st.send, "compute": float(st.compute.max()),
                            "reply": float(st.reply.sum()), "decode": st.decode_cost + st.prepare, "master": st.master,
                            "floor": 2 * st.latency + once + float(st.reply[:st.n].sum())}
    return out


def modeled_latency(model: Model, plan: Plan, device, link=None, master=None) -> float:
    """Seconds of one request under ``plan`` (the sum of :func:`layer_costs`)."""
    return sum(layer_costs(model, plan, device, link, master).values())


def auto_plan(model, workers: int, code: str = "sum", device="rpi3", link=None, master=None,
              memory_limit: float | None = None, *, parity: int | None = None, speeds=None,
              bands: bool = True) -> Plan:
    """The plan minimising modeled request latency: each linear layer on the master, split by output
    rows over all ``workers`` data workers (plus the code's parity workers) or, for a 2-D conv, split
    into bands of its output height (``bands``, :mod:`mpicdc.core.bands`), under every device's memory.

    Parameters
    ----------
    model : :class:`~mpicdc.core.models.Model` or zoo name.
    workers, code, parity : as :func:`~mpicdc.core.plan.make_plan`.
    device : worker :class:`~mpicdc.sim.devices.DeviceModel` or registry name.
    link : the master's link rate (``"100mbit"``, ``"20mbit"``, ``"1gbit"`` or bytes/s);
        None keeps the device's own.
    master : the master's device (default: ``device``).
    memory_limit : bytes of weights each device may hold (default: :func:`memory_budget`).
    speeds : relative compute speed of each data worker (rows split in proportion; default equal).
    bands : whether conv layers may be split into bands (False: output splitting only, as before).

    Raises ``ValueError`` when no plan fits: a worker's shard over its budget even with the
    master holding all it can, or layers the master must keep over the master's budget.
    """
    model = get_model(model) if isinstance(model, str) else model
    device = with_link(device, link)
    master_device = device if master is None else get_device(master)
    r = parity_count(code, parity)
    even = make_plan(model, workers, parity, code, speeds=speeds)
    cost = {"master": layer_costs(model, single_device_plan(model), device, None, master_device),
            "rows": layer_costs(model, even, device, None, master_device, speeds)}
    banded = {lp.layer for lp in even.layers if not band_problem(model, lp.layer)} if bands else set()
    own = {}  # (band option, layer) -> the master's rows; option j gives each layer its j-th choice
    choices = {x: master_band_choices(model, x, workers) for x in banded}
    for j in range(max(map(len, choices.values()), default=0)):
        key = "bands" if j == 0 else f"bands+{j}"
        rows = {x: c[j] for x, c in choices.items() if j < len(c)}
        own.update({(key, x): k for x, k in rows.items()})
        cost[key] = layer_costs(model, make_plan(model, workers, parity, code, speeds=speeds, bands=sorted(banded),
                                                 master_rows={x: k for x, k in rows.items() if k}),
                                device, None, master_device, speeds)
    size = {name: weight_bytes(model, name) for name in model.weight_shapes()}
    split = {lp.layer for lp in even.layers}
    options = {name: ["master"] + (["rows"] if name in split else [])
               + [key for key, x in own if x == name] for name in size}
    choice = {name: min(opts, key=lambda k: cost[k][name]) for name, opts in options.items()}
    master_cap = memory_budget(model, master_device, memory_limit)
    worker_cap = memory_budget(model, device, memory_limit)

    def loss(name, to):  # seconds lost per byte freed by moving a layer to ``to``
        return (cost[to][name] - cost[choice[name]][name]) / size[name]

    def master_held():  # the master holds the layers it computes and those split into bands (it adds their bias)
        return sum(size[x] for x in size if choice[x] != "rows")

    # master over budget: split by rows the layers it holds that lose least per byte freed
    for name in sorted((x for x in size if choice[x] != "rows" and x in split), key=lambda x: loss(x, "rows")):
        if master_held() <= master_cap:
            break
        choice[name] = "rows"
    if master_held() > master_cap:
        fixed = sum(size[x] for x in size if x not in split)
        raise ValueError(f"{model.name}: the master must hold {master_held() / 1e6:.1f} MB of weights (layers with "
                         f"fewer rows than workers: {fixed / 1e6:.1f} MB) but its budget is {master_cap / 1e6:.1f} MB "
                         f"({master_device.name}); use a master with more memory")

    def build():
        return make_plan(model, workers, parity, code, speeds=speeds,
                         keep_on_master=sorted(x for x in size if choice[x] == "master" and x in split),
                         bands=sorted(x for x in size if choice[x].startswith("bands")),
                         master_rows={x: own[choice[x], x] for x in size
                                      if choice[x].startswith("bands") and own[choice[x], x]})

    def worst_shard(plan):
        return max((b for rank, b in rank_bytes(plan, model).items() if rank), default=0)

    plan = build()
    # a worker over budget: band layers (whole kernels on every worker) go to row blocks first, then
    # row-split layers come back to the master while it has room, least loss per byte first
    for name in sorted((x for x in size if choice[x].startswith("bands")), key=lambda x: loss(x, "rows")):
        if worst_shard(plan) <= worker_cap:
            break
        choice[name] = "rows"
        plan = build()
    for name in sorted((x for x in size if choice[x] == "rows"), key=lambda x: loss(x, "master")):
        if worst_shard(plan) <= worker_cap:
            break
        if master_held() + size[name] <= master_cap:
            choice[name] = "master"
            plan = build()
    shards = {rank: b for rank, b in rank_bytes(plan, model).items() if rank}
    worst_rank = max(shards, key=shards.get, default=None)
    if worst_rank is not None and shards[worst_rank] > worker_cap:
        biggest = max((lp for lp in plan.layers if worst_rank in lp.ranks),
                      key=lambda lp: lp.block_rows * model.weight_shapes()[lp.layer][1])
        raise ValueError(
            f"{model.name} over {workers} data + {r} parity workers: rank {worst_rank}'s shard is "
            f"{shards[worst_rank] / 1e6:.1f} MB (largest block: {biggest.layer}) but a worker ({device.name}) may "
            f"hold {worker_cap / 1e6:.1f} MB of weights, and the master ({master_cap / 1e6:.1f} MB) has no room "
            f"for more layers; use more workers or devices with more memory")
    return plan


def format_costs(model: Model, plan: Plan, device, link=None, master=None) -> tuple:
    """``({linear layer: "ms"}, summary line)`` for the plan table of ``prepare --show``/``--dry-run``."""
    linked = with_link(device, link)
    costs = layer_costs(model, plan, linked, None, master)
    one = layer_costs(model, single_device_plan(model), linked, None, master)
    total, alone = sum(costs.values()), sum(one.values())
    where = (f"{get_device(device).name} devices" + ("" if master is None else f", master {get_device(master).name}")
             + f", {format_rate(linked.bandwidth_MBps * 1e6)} shared link")
    line = (f"modeled latency (simulator, no stragglers; {where}): {1e3 * total:.1f} ms per request, of which "
            f"{1e3 * sum(costs[x] for x in model.weight_shapes()):.1f} ms in linear layers; "
            f"one device alone: {1e3 * alone:.1f} ms ({alone / total:.2f}x)")
    return {name: f"{1e3 * costs[name]:.1f}" for name in model.weight_shapes()}, line
