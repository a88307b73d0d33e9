"""What a Pi cluster buys: modeled latency of coded inference against one device, per link rate.

Simulator numbers, not measurements: one request without stragglers through
:func:`mpicdc.sim.simulate` (send, compute, reply, decode per layer; the master's link shared),
on emulated devices (default ``rpi3``: 6 GFLOP/s, 2 GB/s, 1 GiB), for three plans: one device
doing everything (:func:`~mpicdc.core.plan.single_device_plan`), ``even`` (every conv and fc
layer split over the data workers, :func:`~mpicdc.core.plan.make_plan`), ``rows`` (the auto plan
with output splitting only) and ``auto`` (:func:`~mpicdc.sim.autoplan.auto_plan`: per layer the
master, output splitting or, for a conv, bands of its output height, :mod:`mpicdc.core.bands`, of
which the master may compute one itself while the workers compute theirs).
``bound`` is the best any output-splitting plan could do at that rate with any number of
workers: each layer at the smaller of its master time and its link floor (input sent once,
output returned once).  ``--wire float16`` models 2-byte values as the same link at twice the
rate (latency unchanged, conversion not modeled).  Then it checks the targets of issue 14
and says which term dominates where one is missed.

``--ranks K`` adds a measurement on real MPI ranks of this machine (not the simulator): K
requests of one emulated device (``run --workers 0 --master-device DEV``) against the even plan
and the auto plan for DEV's link (``prepare --plan auto``) with every rank emulated (``--device
DEV --master-device DEV``), with float32 and float16 on the wire.  Emulation pads each layer to the device model and each worker's transfers to its own
link (links in parallel, unlike the simulator's shared link); when the machine's cores are busy,
real compute can exceed the modeled time and the run says so.
"""
from __future__ import annotations

import argparse
import math

EPILOG = """\
examples:
  python -m mpicdc.bench speedup                              # AlexNet, VGG16; 100 and 20 Mbit/s
  python -m mpicdc.bench speedup --links 20mbit,100mbit,1gbit --workers 8
  python -m mpicdc.bench speedup --plot docs/img/speedup.png  # latency against link rate, per plan
  python -m mpicdc.bench speedup --check                      # exit 1 when a target is missed
  python -m mpicdc.bench speedup --wire float16               # 2-byte values on the wire
  python -m mpicdc.bench speedup --models alexnet --ranks 5   # also 5 requests on real emulated ranks
"""

TERMS = ("send", "compute", "reply", "decode")


def wire_link(link: str, wire: str = "float32") -> float:
    """The link rate in bytes/s that carries ``wire``'s values as the simulator's 4-byte ones: 2-byte
    values are the same link at twice the rate."""
    from mpicdc.core.wirefmt import get_format
    from mpicdc.sim.devices import parse_rate

    return parse_rate(link) * 4 / get_format(wire).itemsize


def measure(model, workers: int, code: str, device: str, link, wire: str = "float32") -> dict:
    """Modeled seconds of one request for one device, the even plan, the auto plan with output splitting
    only (``rows``) and with bands, the bound, the even plan's summed send/compute/reply/decode terms
    over its distributed layers and the auto plan's per band layer."""
    from mpicdc.core.plan import make_plan, single_device_plan
    from mpicdc.sim.autoplan import auto_plan, layer_costs, layer_terms

    link = wire_link(link, wire)
    alone_costs = layer_costs(model, single_device_plan(model), device, link)
    even = make_plan(model, workers, code=code)
    auto = auto_plan(model, workers, code, device, link)
    rows = auto_plan(model, workers, code, device, link, bands=False)
    terms = layer_terms(model, even, device, link)
    bound = sum(min(alone_costs[name], terms[name]["floor"]) if name in terms else cost
                for name, cost in alone_costs.items())
    auto_costs = layer_costs(model, auto, device, link)
    return {"alone": sum(alone_costs.values()),
            "even": sum(layer_costs(model, even, device, link).values()),
            "rows": sum(layer_costs(model, rows, device, link).values()),
            "auto": sum(auto_costs.values()),
            "bound": bound, "split": [lp.layer + ("(b+m)" if lp.master_rows else "(b)" if lp.banded else "")
                                     for lp in auto.layers],
            "terms": {t: sum(v[t] for v in terms.values()) for t in TERMS},
            "auto_costs": auto_costs, "alone_costs": alone_costs,
            "band_terms": {k: v for k, v in layer_terms(model, auto, device, link).items()
                           if auto.for_layer(k).banded}}


def _why(name: str, link: str, m: dict) -> str:
    """Which term of the even plan dominates, the bound of any output-splitting plan, and where the
    auto plan's time goes (its band layers' link terms, the rest)."""
    t = m["terms"]
    top = max(TERMS, key=t.get)
    share = ", ".join(f"{k} {1e3 * t[k]:.0f} ms" for k in TERMS)
    bands = m["band_terms"]
    spent = sum(m["auto_costs"][k] for k in bands)
    detail = "; ".join(f"{k} {1e3 * m['auto_costs'][k]:.0f} ms (one device {1e3 * m['alone_costs'][k]:.0f}: "
                       f"send {1e3 * v['send']:.0f}, reply {1e3 * v['reply']:.0f}, compute {1e3 * v['compute']:.0f}"
                       + (f", master's band {1e3 * v['master']:.0f}" if v["master"] else "") + ")"
                       for k, v in bands.items())
    return (f"    why: in the even plan {top} dominates ({share} summed over its split layers); with any number "
            f"of workers, each layer's input sent once and output returned once bound {name} at "
            f"{m['alone'] / m['bound']:.2f}x one device at {link}"
            + (f"\n    auto plan: {1e3 * m['auto']:.0f} ms, of which band layers {1e3 * spent:.0f} ms: {detail}; the "
               f"replies (each worker band's output, plus the parity's) are what the link cannot shrink"
               if bands else ""))


def check(results: dict) -> list:
    """``[(target, met, detail)]`` for the targets of issue 14 that ``results`` covers."""
    out = []
    a = results.get(("alexnet", "100mbit"))
    if a:
        best = max(a["alone"] / a["even"], a["alone"] / a["auto"], a["alone"] / a["rows"])
        out.append(("AlexNet >= 2x one device at 100 Mbit/s, CDC on", best >= 2,
                    f"{best:.2f}x" + ("" if best >= 2 else "\n" + _why("alexnet", "100mbit", a))))
    v = results.get(("vgg16", "100mbit"))
    if v:
        ok = v["auto"] < v["even"] and v["auto"] < v["alone"]
        out.append(("VGG16 auto faster than even and one device at 100 Mbit/s", ok,
                    f"auto {v['auto']:.2f} s, even {v['even']:.2f} s, one device {v['alone']:.2f} s"
                    + ("" if ok else "\n" + _why("vgg16", "100mbit", v))))
    v = results.get(("vgg16", "20mbit"))
    if v:
        ok = v["auto"] <= v["alone"] * (1 + 1e-9)
        out.append(("VGG16 auto never slower than one device at 20 Mbit/s", ok,
                    f"auto {v['auto']:.2f} s, one device {v['alone']:.2f} s"))
    return out


def plot(path: str, models: list, workers: int, code: str, device: str) -> None:
    """Modeled latency against link rate, one panel per model, one line per plan."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rates = np.geomspace(5, 1000, 25)  # Mbit/s
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [measure(model, workers, code, device, f"{r:g}mbit") for r in rates]
        for key, label, style in (("alone", "one device", "k--"), ("even", "even plan", "C1-"),
                                  ("rows", "auto plan, output splitting only", "C3-."),
                                  ("auto", "auto plan with bands (and master bands)", "C0-"),
                                  ("bound", "bound of output splitting", "C2:")):
            ax.plot(rates, [r[key] for r in rows], style, label=label)
        for mark in (20, 100):
            ax.axvline(mark, color="0.8", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="master's link, Mbit/s", ylabel="modeled latency, s",
               title=f"{model.name}: {workers} data + {code} parity workers, {device} (simulator)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_frontier(rows: list) -> int:
    """Print the frontier and its target (MDS +2 p99 at least 2x better than uncoded under WiFi); 1 if missed."""
    print("\nstraggler frontier (simulator, AlexNet, 4 data workers + r extra):")
    print(f"{'delay':<30}{'system':<17}{'mean ms':>9}{'p99 ms':>9}{'p99 gain':>10}")
    base = {}
    for label, name, mean, p99 in rows:
        base.setdefault(label, p99)
        print(f"{label:<30}{name:<17}{1e3 * mean:>9.1f}{1e3 * p99:>9.1f}{base[label] / p99:>9.2f}x")
    wifi = {name: p99 for label, name, _, p99 in rows if label.startswith("paper WiFi")}
    calm = {name: p99 for label, name, _, p99 in rows if label == "no stragglers"}
    gain = wifi["uncoded"] / wifi["MDS +2"]
    print(f"  {'met   ' if gain >= 2 else 'MISSED'} MDS with 2 extra devices >= 2x better p99 than uncoded "
          f"(paper WiFi): {gain:.2f}x")
    if gain < 2:
        late = {k: wifi[k] - calm[k] for k in ("uncoded", "MDS +2")}
        print(f"    why: the straggling part of p99 shrinks {late['uncoded'] / late['MDS +2']:.2f}x "
              f"({1e3 * late['uncoded']:.0f} -> {1e3 * late['MDS +2']:.0f} ms: the 4th of 6 replies instead of the "
              f"last of 4), but sends and compute without stragglers ({1e3 * calm['uncoded']:.0f} ms uncoded, "
              f"{1e3 * calm['MDS +2']:.0f} ms MDS +2 on the device's own link) do not shrink")
    return int(gain < 2)


def frontier(requests: int = 4000, device: str = "rpi3", seed: int = 0) -> list:
    """Straggler frontier on AlexNet over 4 data workers: uncoded, then for r = 1..3 extra devices
    MDS (any r late replies decoded around) against replication of blocks 1..r (2MR when r = 4),
    under the paper's WiFi model ``wifi:C`` and a Pareto tail (alpha 2) of the same mean delay.
    Simulated like Fig. 5b (independent links, delays keep the worker busy).
    Returns ``[(delay name, system, mean s, p99 s)]``."""
    from mpicdc.core.faults import parse_delay
    from mpicdc.core.models import get_model
    from mpicdc.core.plan import make_plan
    from mpicdc.experiments.fig5b import default_delay_c, sim_config
    from mpicdc.sim import simulate

    model = get_model("alexnet")
    c = default_delay_c(device)
    mean = parse_delay(f"wifi:{c}").mean()
    systems = [("uncoded", make_plan(model, 4, code="none"))]
    for r in (1, 2, 3):
        systems += [(f"MDS +{r}", make_plan(model, 4, r, "mds")),
                    (f"replication +{r}", make_plan(model, 4, r, "replication"))]
    rows = []
    for label, spec in (("no stragglers", "none"), (f"paper WiFi wifi:{c}", f"wifi:{c}"),
                        ("Pareto alpha 2, same mean", f"pareto:{mean / 2:.6g},2")):
        for name, plan in systems:
            s = simulate(model, plan, requests=requests, device=device, delay=spec, seed=seed,
                         config=sim_config()).summary()
            rows.append((label, name, s["mean"], s["p99"]))
    return rows


def _job(np_ranks: int, args: list, timeout: float = 600.0) -> dict:
    """One ``python -m mpicdc.launch`` job with a hard timeout; its JSON results (or an error)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mpicdc-speedup-") as tmp:
        out = os.path.join(tmp, "run.json")
        cmd = [sys.executable, "-m", "mpicdc.launch", "-np", str(np_ranks), *args, "-q", "--output", out]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"did not end within {timeout:g} s: {' '.join(cmd)}"}
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-2000:]}"}
        with open(out) as f:
            return json.load(f)


def _prepare_auto(model, workers: int, code: str, device: str, folder: str, wire: str) -> str | None:
    """``prepare --plan auto`` for ``device``'s own link (as ``wire`` carries it) into ``folder``; an error or None."""
    import subprocess
    import sys

    from mpicdc.sim.devices import get_device

    rate = wire_link(f"{get_device(device).bandwidth_MBps * 8:g}mbit", wire)
    cmd = [sys.executable, "-m", "mpicdc.prepare", model.name, "--workers", str(workers), "--code", code,
           "--plan", "auto", "--device", device, "--link", f"{rate * 8 / 1e6:g}mbit", "--dir", folder, "-q"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return f"did not end within 600 s: {' '.join(cmd)}"
    return None if proc.returncode == 0 else f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-2000:]}"


def on_ranks(model, workers: int, code: str, device: str, requests: int) -> list:
    """``[(label, median latency s of requests 1.., worst real/modeled compute, error)]`` measured on
    ranks: one emulated device, then the even plan and the auto plan (bands where they pay) in float32
    and float16 (request 0 is a warm-up)."""
    import tempfile

    from mpicdc.core.plan import parity_count

    world = 1 + workers + parity_count(code, None)
    emulate = ["--master-device", device, "--repeat", str(requests + 1)]
    runs = [("one device", 1, ["--workers", "0"])]
    for wire in ("float32", "float16"):
        runs.append((f"even, {wire}", world, ["--code", code, "--device", device, "--wire", wire]))
        runs.append((f"auto, {wire}", world, ["--device", device, "--wire", wire, "--weights", wire]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpicdc-speedup-auto-") as tmp:
        for label, np_ranks, extra in runs:
            if "--weights" in extra:  # the auto plan for this wire format, prepared first
                folder = f"{tmp}/{extra[-1]}"
                extra = extra[:-1] + [folder]
                problem = _prepare_auto(model, workers, code, device, folder, extra[3])
                if problem:
                    rows.append((label, float("nan"), float("nan"), problem))
                    continue
            rows.append(_ranks_row(label, _job(np_ranks, [model.name, *emulate, *extra])))
    return rows


def _ranks_row(label: str, res: dict) -> tuple:
    """One row of :func:`on_ranks` from a job's JSON results."""
    if "error" in res:
        return label, float("nan"), float("nan"), res["error"]
    lat = sorted(r["latency_ms"] / 1e3 for r in res["requests"][1:] if r["ok"])
    worst = res["summary"].get("emulation_worst_compute_fraction", float("nan"))
    return label, lat[len(lat) // 2] if lat else float("nan"), worst, None


def _print_ranks(model, rows: list) -> None:
    base = rows[0][1]
    for label, seconds, worst, error in rows:
        if error:
            print(f"{model.name:<9}{label:<16}  FAILED: {error}")
            continue
        note = "" if math.isnan(worst) else f"  (worker compute {worst:.0%} of modeled" + \
            ("; cores busy: distorted)" if worst >= 0.5 else ")")
        print(f"{model.name:<9}{label:<16}{seconds:>9.3f}{base / seconds:>8.2f}x{note}")


def main(argv=None) -> int:
    from mpicdc.core.models import get_model
    from mpicdc.sim.devices import get_device

    if argv is not None and {"--cluster", "--stragglers-ranks"} & {a.split("=")[0] for a in argv}:
        from mpicdc.bench import speedup_cluster  # measured, with options of its own
        return speedup_cluster.main(argv)
    p = argparse.ArgumentParser(prog="python -m mpicdc.bench speedup", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="alexnet,vgg16", help="zoo models, comma separated (default alexnet,vgg16)")
    p.add_argument("--links", default="100mbit,20mbit", help="link rates, comma separated (default 100mbit,20mbit)")
    p.add_argument("--workers", type=int, default=4, help="data workers (default 4)")
    p.add_argument("--code", default="sum", help="code of the even and auto plans (default sum: 1 parity worker)")
    p.add_argument("--device", default="rpi3", help="device model of every rank (default rpi3)")
    p.add_argument("--plot", metavar="PNG", help="also plot modeled latency against link rate, per plan")
    p.add_argument("--stragglers", type=int, metavar="K", default=0,
                   help="also simulate K requests of the straggler frontier: MDS against replication for "
                        "r = 1..3 extra devices, mean and p99 (default 0: skip)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--ranks", type=int, metavar="K", default=0,
                   help="also measure K requests on real MPI ranks of this machine, every rank emulating "
                        "--rank-device: one device (--workers 0) against the even plan, float32 and float16 "
                        "on the wire (default 0: skip)")
    p.add_argument("--wire", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="values on the wire of the modeled plans: 2-byte formats are the link at twice the rate "
                        "(default float32)")
    p.add_argument("--cluster", action="store_true",
                   help="measure instead on the namespace cluster, links shaped at each rate (needs root; "
                        "--cluster --help for its options: mpicdc.bench.speedup_cluster)")
    p.add_argument("--stragglers-ranks", type=int, metavar="K",
                   help="measure the straggler frontier instead on real ranks, K requests per system")
    p.add_argument("--rank-device", default="rpi3-eth",
                   help="device the ranks emulate, with its own link (default rpi3-eth: about 94 Mbit/s)")
    args = p.parse_args(argv)
    models = [get_model(x.strip()) for x in args.models.split(",") if x.strip()]
    links = [x.strip() for x in args.links.split(",") if x.strip()]
    dev = get_device(args.device)
    print(f"speedup (simulator: one request, no stragglers, shared link): {args.workers} data + {args.code} parity "
          f"workers of {dev.name} ({dev.gflops:g} GFLOP/s, {dev.mem_GBps:g} GB/s, {dev.memory_MB:g} MB), "
          f"{args.wire} on the wire")
    print(f"{'model':<9}{'link':>9}{'one dev s':>11}{'even s':>9}{'rows s':>9}{'auto s':>9}{'even x':>8}"
          f"{'rows x':>8}{'auto x':>8}{'bound x':>9}  auto splits ((b): bands, (b+m): and the master's band)")
    results = {}
    for model in models:
        for link in links:
            m = results[(model.name, link)] = measure(model, args.workers, args.code, args.device, link, args.wire)
            split = ",".join(m["split"]) if len(m["split"]) <= 6 else f"{len(m['split'])} layers"
            print(f"{model.name:<9}{link:>9}{m['alone']:>11.3f}{m['even']:>9.3f}{m['rows']:>9.3f}{m['auto']:>9.3f}"
                  f"{m['alone'] / m['even']:>8.2f}{m['alone'] / m['rows']:>8.2f}{m['alone'] / m['auto']:>8.2f}"
                  f"{m['alone'] / m['bound']:>9.2f}  {split or '-'}")
    missed = 0
    targets = check(results)
    if targets:
        print("\ntargets (issue 14):")
    for name, ok, detail in targets:
        missed += not ok
        print(f"  {'met   ' if ok else 'MISSED'} {name}: {detail}")
    if args.stragglers:
        missed += _print_frontier(frontier(args.stragglers, args.device))
    if args.ranks:
        print(f"\nmeasured on MPI ranks of this machine (not simulated), every rank emulating {args.rank_device} "
              f"on its own link; median of {args.ranks} requests:")
        print(f"{'model':<9}{'run':<16}{'latency s':>9}{'vs one':>9}")
        for model in models:
            _print_ranks(model, on_ranks(model, args.workers, args.code, args.rank_device, args.ranks))
    if args.plot:
        plot(args.plot, models, args.workers, args.code, args.device)
        print(f"\nwrote {args.plot}")
    return 1 if args.check and missed else 0
