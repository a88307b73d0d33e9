"""What a Pi cluster buys, measured on the namespace cluster: ``python -m mpicdc.bench speedup --cluster``.

Measurements, not the simulator: for each link rate one :class:`~mpicdc.cluster.Cluster` (a head
namespace for ``mpirun`` and the master, one namespace per worker, every link shaped with tbf at
that rate both ways) serves each model with

* one device: ``run --workers 0``, one rank on the head doing every layer;
* the ``even`` plan (every conv and fc layer split) and the ``auto`` plan (``prepare --plan auto
  --device rpi3 --link RATE``) over 4 data workers + 1 sum-parity worker (CDC on),
  each with float32 and float16 on the wire.

Every rank's compute is emulated as a Pi 3: the master pads each layer it runs to the device
model (``--master-device rpi3``), the workers pad their blocks to ``rpi3:compute``, the Pi 3's
compute with a free link, so the link time is the namespace's real one and is not also slept.
Request 0 is a warm-up; every output is checked against the serial forward (``--check``).  Next
to each measurement: the simulator's prediction for the same plan, device and rate (float16:
the rate doubled, as ``bench wire`` models it), which shares the master's link like the head's
single shaped veth does.  ``--stragglers-ranks K`` measures the straggler frontier on ranks
instead (:mod:`mpicdc.bench.frontier_ranks`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from mpicdc.sim.devices import COMPUTE_ONLY

EPILOG = """\
examples:
  python -m mpicdc.bench speedup --cluster --models alexnet --links 100mbit   # about 4 minutes
  python -m mpicdc.bench speedup --cluster --output speedup-cluster.json      # everything: about an hour
  python -m mpicdc.bench speedup --stragglers-ranks 100                       # the frontier on ranks: 35 min

The full run (AlexNet and VGG16 at 100 and 20 Mbit/s, 2 measured requests each) took 55 minutes
on a loaded 2-core machine, most of it VGG16's even plan at 20 Mbit/s: about 250 MB on the
master's link per float32 request (over 100 s each); --models, --links, --plans and --wires
run subsets.
"""

PLANS = ("even", "auto")
WIRES = ("float32", "float16")
#: (plan, wire format) of every distributed run; the one-device run comes first
RUNS = tuple((plan, wire) for plan in PLANS for wire in WIRES)
#: fewest measured requests for which a p99 is printed (below it, p99 is just the slowest request)
P99_MIN_REQUESTS = 20


def plans(model, workers: int, code: str, device: str, link: str) -> dict:
    """``{name: Plan}``: ``one`` (every layer on the master), ``even`` and ``auto`` at ``link``."""
    from mpicdc.core.plan import make_plan, single_device_plan
    from mpicdc.sim.autoplan import auto_plan

    return {"one": single_device_plan(model), "even": make_plan(model, workers, code=code),
            "auto": auto_plan(model, workers, code, device, link)}


def predicted(model, plan, device: str, link: str, wire: str) -> float:
    """The simulator's seconds for one request without stragglers (16-bit wire: the link rate doubled)."""
    from mpicdc.core.wirefmt import get_format
    from mpicdc.sim.autoplan import modeled_latency
    from mpicdc.sim.devices import parse_rate

    return modeled_latency(model, plan, device, parse_rate(link) * 4 / get_format(wire).itemsize)


def latency_stats(result: dict) -> dict:
    """Median and p99 (None below :data:`P99_MIN_REQUESTS`) of requests 1.. in seconds, the worst
    check error, and whether every request was served and matched the serial forward."""
    import numpy as np

    measured = result["requests"][1:]
    lat = np.array([r["latency_ms"] / 1e3 for r in measured if r["ok"]])
    errs = [r["check_rel_err"] for r in result["requests"] if r["ok"]]
    matched = (result.get("_returncode") == 0 and all(r["ok"] for r in result["requests"])
               and all(e is not None for e in errs))
    return {"requests": len(measured), "median_s": float(np.median(lat)) if lat.size else math.nan,
            "p99_s": float(np.percentile(lat, 99)) if lat.size >= P99_MIN_REQUESTS else None,
            "max_check_rel_err": max((e for e in errs if e is not None), default=None), "matched": matched,
            "worker_compute_fraction": result["summary"].get("emulation_worst_compute_fraction")}


def run_on_cluster(cluster, model, plan, folder: Path, *, wire: str, device: str, link: str,
                   requests: int, timeout: float) -> dict:
    """One job of ``requests + 1`` requests (0: warm-up) on ``cluster``; its JSON plus ``_returncode``
    and ``_output``, or ``{"error": ...}`` when it wrote none."""
    with tempfile.TemporaryDirectory(prefix="mpicdc-speedcluster-") as tmp:
        out = Path(tmp) / "run.json"
        args = [model.name, "--weights", str(folder), "--master-device", device, "--repeat", str(requests + 1),
                "--check", "--wire", wire, "--link", link, "--layer-timeout", str(timeout), "-q", "--output", str(out)]
        if plan.world_size == 1:
            args += ["--workers", "0"]
        else:
            args += ["--device", f"{device}{COMPUTE_ONLY}"]
        done = cluster.launch(plan.world_size, args, timeout=timeout).finish()
        if not out.exists():
            return {"error": f"no results ({done.explain()[-1500:]})"}
        result = json.loads(out.read_text())
    result["_returncode"] = done.returncode
    return result


def job_timeout(model, plan, device: str, link: str, requests: int) -> float:
    """A bound for one job: start-up plus each request at 8x its float32 prediction (at least 60 s each):
    on a loaded machine VGG16's even plan at 20 Mbit/s took longer than 4x (measured)."""
    return 120.0 + (requests + 1) * max(60.0, 8 * predicted(model, plan, device, link, "float32"))


def measure_row(cluster, model, name: str, plan, wire: str, *, device: str, link: str, requests: int,
                weights_root: Path) -> dict:
    """One row: ``plan`` (named ``name``) prepared under ``weights_root``, run on ``cluster``, predicted."""
    from mpicdc import store

    folder = store.ensure_prepared(model, plan, weights_root / (f"auto-{link}" if name == "auto" else name))
    res = run_on_cluster(cluster, model, plan, folder, wire=wire, device=device, link=link, requests=requests,
                         timeout=job_timeout(model, plan, device, link, requests))
    row = {"mode": "cluster", "model": model.name, "link": link, "plan": name, "wire": wire,
           "ranks": plan.world_size, "split": [lp.layer for lp in plan.layers],
           "predicted_s": predicted(model, plan, device, link, wire)}
    row.update({"error": res["error"]} if "error" in res else latency_stats(res))
    return row


def measure(models: list, links: list, *, workers: int, code: str, device: str, requests: int,
            weights_root: Path, runs=RUNS, prefix: str | None = None, log=print) -> list:
    """Rows of measured and predicted latency, one cluster per link rate (see the module docstring):
    one device, then each ``(plan, wire)`` of ``runs``; ``prefix`` names the clusters' namespaces
    (default ``cdc<pid>``)."""
    from mpicdc.cluster import Cluster
    from mpicdc.core.plan import parity_count

    rows = []
    for link in links:
        with Cluster(workers + parity_count(code, None), rate=link, prefix=prefix) as cluster:
            for model in models:
                ps = plans(model, workers, code, device, link)
                base = None
                for name, wire in (("one", "float32"), *runs):
                    log(f"  {model.name} {link} {name} {wire}: {ps[name].world_size} ranks ...")
                    row = measure_row(cluster, model, name, ps[name], wire, device=device, link=link,
                                      requests=requests, weights_root=weights_root)
                    base = base or row
                    row["vs_one_device"] = base.get("median_s", math.nan) / row.get("median_s", math.nan)
                    row["predicted_vs_one_device"] = base["predicted_s"] / row["predicted_s"]
                    rows.append(row)
    return rows


def print_rows(rows: list) -> None:
    """The table: measured (cluster) median and p99, ratio to one device, and the simulator's."""
    print(f"{'mode':<8}{'model':<9}{'link':>8}  {'plan':<5}{'wire':<8}{'median s':>9}{'p99 s':>8}{'vs one':>8}"
          f"{'sim s':>8}{'sim vs one':>11}  check")
    for r in rows:
        head = f"{r['mode']:<8}{r['model']:<9}{r['link']:>8}  {r['plan']:<5}{r['wire']:<8}"
        if "error" in r:
            print(f"{head}  FAILED: {r['error']}")
            continue
        p99 = "-" if r["p99_s"] is None else f"{r['p99_s']:.4g}"
        check = "matched" if r["matched"] else "NOT MATCHED"
        if r["max_check_rel_err"] is not None:
            check += f" (rel err {r['max_check_rel_err']:.1e})"
        print(f"{head}{r['median_s']:>9.4g}{p99:>8}{r['vs_one_device']:>7.2f}x{r['predicted_s']:>8.4g}"
              f"{r['predicted_vs_one_device']:>10.2f}x  {check}")


def _names(parser, option: str, text: str, known: tuple) -> list:
    """The comma-separated names of ``text``, each one of ``known`` (else a usage error)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    wrong = [x for x in names if x not in known]
    if wrong or not names:
        parser.error(f"{option} {text!r}: choose from {', '.join(known)}")
    return names


def main(argv=None) -> int:
    from mpicdc.cluster import ClusterUnavailable
    from mpicdc.core.models import get_model

    p = argparse.ArgumentParser(prog="python -m mpicdc.bench speedup --cluster",
                                description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", action="store_true", help="measure on the namespace cluster (needs root)")
    p.add_argument("--stragglers-ranks", type=int, metavar="K", default=0,
                   help="measure the straggler frontier on K requests per system on ranks of this machine")
    p.add_argument("--models", default="alexnet,vgg16", help="zoo models, comma separated (default alexnet,vgg16)")
    p.add_argument("--links", default="100mbit,20mbit", help="link rates, comma separated (default 100mbit,20mbit)")
    p.add_argument("--workers", type=int, default=4, help="data workers (default 4)")
    p.add_argument("--code", default="sum", help="code of the even and auto plans (default sum: 1 parity worker)")
    p.add_argument("--device", default="rpi3", 
                   help="device every rank emulates (default rpi3; the workers its compute only, NAME:compute)")
    p.add_argument("--plans", default=",".join(PLANS), help="distributed plans to run (default even,auto)")
    p.add_argument("--wires", default=",".join(WIRES), help="wire formats to run (default float32,float16)")
    p.add_argument("--requests", type=int, default=2, metavar="K",
                   help=f"measured requests per run after one warm-up (default 2; p99 printed from "
                        f"{P99_MIN_REQUESTS})")
    p.add_argument("--weights-dir", default="weights/speedup", metavar="DIR",
                   help="where the prepared shards are kept and reused (default weights/speedup)")
    p.add_argument("--output", metavar="JSON", help="also write every row to this JSON file")
    p.add_argument("--prefix", help="names of the cluster's namespaces and links (default cdc<pid>)")
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error(f"--requests must be >= 1, got {args.requests}")
    runs = [(plan, wire) for plan in _names(p, "--plans", args.plans, PLANS)
            for wire in _names(p, "--wires", args.wires, WIRES)]
    models = [get_model(x.strip()) for x in args.models.split(",") if x.strip()]
    links = [x.strip() for x in args.links.split(",") if x.strip()]
    doc = {"device": args.device, "workers": args.workers, "code": args.code}
    if args.cluster:
        print(f"speedup measured on the namespace cluster (mode 'cluster'): head + {args.workers} data + {args.code} "
              f"parity devices, links shaped with tbf; every rank's compute emulated as {args.device} (workers "
              f"{args.device}{COMPUTE_ONLY}: no link padding); median of {args.requests} requests after a warm-up; "
              f"'sim' is the simulator's prediction", flush=True)
        try:
            rows = measure(models, links, workers=args.workers, code=args.code, device=args.device,
                           requests=args.requests, weights_root=Path(args.weights_dir).resolve(), runs=runs,
                           prefix=args.prefix,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
        except ClusterUnavailable as exc:
            print(f"speedup --cluster: cannot make namespaces here: {exc}", file=sys.stderr)
            return 2
        print_rows(rows)
        print(f"(this machine's load average {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores)")
        doc["cluster"] = rows
    if args.stragglers_ranks:
        from mpicdc.bench import frontier_ranks
        doc["stragglers_ranks"] = frontier_ranks.run(args.stragglers_ranks, args.device,
                                                     Path(args.weights_dir).resolve())
    if args.output:
        Path(args.output).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.output}")
    failed = [r for r in doc.get("cluster", []) if "error" in r or not r["matched"]]
    return 1 if failed else 0
