"""Fig. 5b: straggler mitigation on AlexNet, measured on real MPI ranks and simulated.

Three systems serve the same AlexNet requests (batch 1) with every worker an
emulated Raspberry Pi 3 (``--device rpi3``) whose replies are held back by the
paper's Fig. 1 WiFi straggler model (``wifi:C``, :func:`mpicdc.sim.devices.paper_wifi_delay`):

* **uncoded**: 4 data workers (5 ranks); every layer waits for all four replies;
* **2MR+1**: the same plus one replica of worker 1's blocks (``--code replication
  --parity 1``, 6 ranks): only worker 1 is covered;
* **CDC+1**: the same plus one sum-parity worker (``--code sum``, 6 ranks): any one
  straggler per layer is decoded around with one subtraction.

``C`` defaults to the mean modeled per-block GEMM time of AlexNet's eight linear
layers on the device (about 15 ms on ``rpi3``), i.e. the paper's arrival model scaled
to this workload's compute time.  The simulator (:mod:`mpicdc.sim`) runs the same
plans, device and delay model, configured like the emulation: independent links
(each worker's emulated sleep covers its own transfers), the delay keeps the worker
busy, and the master is this machine (``master_device="local"``).

``--cluster`` runs each system on a fresh cluster of network namespaces (master on the head, one
device per worker, every link shaped to ``--rate``, default the device's own 30 Mbit/s): workers
emulate only their compute (``--device rpi3:compute``) and every transfer crosses the real shaped
links, the master's one link carrying all its sends and replies; the simulator then uses a
``fair`` master link at that rate's TCP goodput (:meth:`~mpicdc.experiments.common.ClusterMode.sim_device`).

Outputs in ``--out``: ``requests.csv`` (every emulated request), ``layers.csv`` (the
master's wait and decode time per request and layer), ``stats.csv``
(mean/p50/p95/p99 per system, emulated and simulated), ``sensitivity.csv``
(simulator only: the CDC/uncoded ratios under other straggler tails),
``settings.json`` (``mode``: ``ranks`` or ``cluster``), ``fig5b.png`` and ``summary.txt``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mpicdc.experiments import common

MODEL = "alexnet"
DEVICE = "rpi3"
WORKERS = 4
#: where the emulated master runs: this machine (its ops are not padded to a device time)
MASTER_DEVICE = "local"
CDC_MEAN_TARGET = 1.3
CDC_P99_TARGET = 2.0


@dataclass(frozen=True)
class System:
    """One compared configuration: a label and the plan's code."""

    label: str
    code: str
    parity: int | None
    workers: int = WORKERS

    def plan(self, model):
        from mpicdc.core.plan import make_plan
        return make_plan(model, self.workers, self.parity, self.code)


SYSTEMS = (System("uncoded", "none", None), System("2MR+1", "replication", 1), System("CDC+1", "sum", None))


# ------------------------------------------------------------------ helpers shared by the experiments

def add_common_options(p) -> None:
    """``--hostfile`` and ``--weights-dir``, shared by the runtime experiments."""
    p.add_argument("--hostfile", default=None, help="Open MPI hostfile (Slurm jobs pass one; default: this machine)")
    p.add_argument("--weights-dir", default=None, metavar="DIR",
                   help="where prepared shards are kept and reused (default: weights/ next to --out); on a "
                        "cluster it must be on a file system every node sees")


def weights_root(args) -> Path:
    return Path(args.weights_dir) if args.weights_dir else Path(args.out).resolve().parent / "weights"


def ensure_weights(model, plan, root, seed: int = 0) -> Path:
    """Shards of ``model`` cut for ``plan``, random He-initialised weights from ``seed``: reused when
    already prepared, else prepared (:func:`mpicdc.store.ensure_prepared`, one folder per seed under
    ``root/seed<seed>``, so runs with other seeds keep theirs).  Local; no MPI.
    """
    from mpicdc import store

    return store.ensure_prepared(model, plan, Path(root) / f"seed{seed}", seed)


def mean_block_gemm_time(model, plan, device) -> float:
    """Mean over the plan's layers of one data block's modeled GEMM time (s) on ``device``."""
    from mpicdc.sim.devices import get_device

    dev = get_device(device)
    shapes, wshapes = model.shapes(), model.weight_shapes()
    times = [float(dev.gemm_time(lp.block_rows, wshapes[lp.layer][1], math.prod(shapes[lp.layer][1:])))
             for lp in plan.layers]
    return float(np.mean(times))


def default_delay_c(device: str = DEVICE) -> float:
    """The Fig. 5b straggler scale: mean per-block GEMM time of AlexNet on 4 workers, rounded to 0.1 ms."""
    from mpicdc.core.models import get_model

    model = get_model(MODEL)
    return round(mean_block_gemm_time(model, SYSTEMS[0].plan(model), device), 4)


def sim_config(cluster=None):
    """Simulator settings that mirror the emulating runtime (see the module docstring); on a cluster
    (:class:`~mpicdc.experiments.common.ClusterMode`) the master's link is one shaped link whose
    concurrent sends share it equally and whose replies queue (``fair``: TCP flows through one tbf)."""
    from mpicdc.sim import SimConfig
    return SimConfig(link="fair" if cluster else "parallel", delay_blocks_worker=True)


def check_job(result: dict, label: str) -> list:
    """Problems of one MPI job's JSON: failed requests, outputs off the reference, a bad exit code."""
    problems = []
    bad = [r["request"] for r in result["requests"] if not r["ok"]]
    if bad:
        problems.append(f"{label}: requests {bad} failed")
    errs = [r["check_rel_err"] for r in result["requests"] if r["ok"]]
    if any(e is None for e in errs):
        problems.append(f"{label}: some outputs were not checked")
    elif errs and max(errs) > 1e-4:
        problems.append(f"{label}: output off the serial reference by {max(errs):.2e} (> 1e-4)")
    if result.get("_returncode", 0) != 0:
        problems.append(f"{label}: job exit code {result['_returncode']}")
    return problems


def compute_fractions(result: dict) -> tuple:
    """(median, worst) of real compute / modeled device time over all layer records of a job."""
    fr = [rec["compute_ms"] / rec["modeled_ms"] for r in result["requests"] for rec in r["layers"]
          if rec.get("modeled_ms", 0) > 0]
    return (float(np.median(fr)), float(np.max(fr))) if fr else (math.nan, math.nan)


def latency_stats(lat_ms) -> dict:
    lat = np.asarray(lat_ms, dtype=float)
    lat = lat[np.isfinite(lat)]
    if not lat.size:
        return {k: math.nan for k in ("mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms")}
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    return {"mean_ms": float(lat.mean()), "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99),
            "max_ms": float(lat.max())}


# ------------------------------------------------------------------ the experiment

def run_emulation(systems, *, requests: int, delay: str, device: str, seed: int, root: Path,
                  hostfile: str | None = None, cluster=None, log=print) -> dict:
    """Run every system on real MPI ranks (on a fresh namespace cluster each with ``cluster``); returns
    ``{label: job JSON}`` (plus ``_wall_s``)."""
    from mpicdc.core.models import get_model

    model = get_model(MODEL)
    out = {}
    for sys_ in systems:
        plan = sys_.plan(model)
        folder = ensure_weights(model, plan, root, seed).resolve()
        worker_device = cluster.worker_device(device) if cluster else device
        args = [MODEL, "--weights", str(folder), "--device", worker_device, "--inject", f"delay:all:{delay}",
                "--repeat", str(requests), "--check", "--seed", str(seed)]
        where = f" on a namespace cluster ({cluster.rate} links)" if cluster else ""
        log(f"fig5b: {sys_.label}: {plan.world_size} ranks{where}, {requests} requests ...")
        t0 = time.perf_counter()
        result = common.run_job(plan.world_size, args, timeout=300 + 30 * requests, hostfile=hostfile,
                                cluster=cluster)
        result["_wall_s"] = time.perf_counter() - t0
        out[sys_.label] = result
    return out


def simulate_systems(systems, *, requests: int, delay, device, seed: int, config=None, cluster=None,
                     breakdown: bool = False) -> dict:
    """``{label: SimResult}`` for every system under the Fig. 5b settings (on ``cluster``'s links when given)."""
    from mpicdc.core.models import get_model
    from mpicdc.sim import simulate

    model = get_model(MODEL)
    device = cluster.sim_device(device) if cluster else device
    return {s.label: simulate(model, s.plan(model), requests=requests, device=device, master_device=MASTER_DEVICE,
                              delay=delay, seed=seed, config=config or sim_config(cluster), breakdown=breakdown)
            for s in systems}


def request_rows(jobs: dict) -> list:
    rows = []
    for label, res in jobs.items():
        for r in res["requests"]:
            rows.append({"system": label, "request": r["request"], "ok": int(bool(r["ok"])),
                         "latency_ms": round(r["latency_ms"], 3),
                         "check_rel_err": "" if r["check_rel_err"] is None else f"{r['check_rel_err']:.3e}",
                         "decoded_layers": sum(1 for rec in r["layers"] if rec["decoded_blocks"])})
    return rows


def layer_rows(jobs: dict) -> list:
    """Per request and distributed layer: the master's wait and decode time (for per-layer comparisons)."""
    rows = []
    for label, res in jobs.items():
        for r in res["requests"]:
            if not r["ok"]:
                continue
            for rec in r["layers"]:
                rows.append({"system": label, "request": r["request"], "layer": rec["layer"],
                             "wait_ms": round(rec["wait_ms"], 3), "decode_ms": round(rec["decode_ms"], 3),
                             "modeled_ms": round(rec["modeled_ms"], 3), "decoded": len(rec["decoded_blocks"]),
                             "late": len(rec["late"])})
    return rows


def read_requests(path) -> dict:
    """``{system: [latency_ms of ok requests]}`` from a ``requests.csv``."""
    out: dict = {}
    for row in common.read_csv(path):
        if int(row["ok"]):
            out.setdefault(row["system"], []).append(float(row["latency_ms"]))
    return out


SENSITIVITY = (
    ("paper WiFi, C = 50 ms (paper's absolute scale)", "wifi:0.05"),
    ("shifted exponential, same mean delay", "shexp:0,{mean}"),
    ("Pareto alpha=3, same mean delay", "pareto:{p3},3"),
    ("Pareto alpha=2, same mean delay", "pareto:{p2},2"),
    ("paper WiFi + 1% of replies stalled 2 s", "mix:0.99*wifi:{c}+0.01*const:2"),
)


def sensitivity(delay_c: float, *, requests: int, device: str, seed: int, cluster=None) -> list:
    """Simulator only: CDC+1 vs uncoded under other straggler tails of the same mean (where stated)."""
    from mpicdc.core.faults import parse_delay

    mean = parse_delay(f"wifi:{delay_c}").mean()
    rows = []
    for name, spec in (("paper WiFi, C as above", f"wifi:{delay_c}"),) + SENSITIVITY:
        spec = spec.format(c=delay_c, mean=round(mean, 6), p3=round(mean * 2 / 3, 6), p2=round(mean / 2, 6))
        res = simulate_systems((SYSTEMS[0], SYSTEMS[2]), requests=requests, delay=spec, device=device, seed=seed,
                               cluster=cluster)
        un, cdc = (latency_stats(1e3 * res[k].latency[res[k].ok]) for k in ("uncoded", "CDC+1"))
        rows.append({"straggler_model": name, "delay_spec": spec,
                     "uncoded_mean_ms": round(un["mean_ms"], 1), "uncoded_p99_ms": round(un["p99_ms"], 1),
                     "cdc_mean_ms": round(cdc["mean_ms"], 1), "cdc_p99_ms": round(cdc["p99_ms"], 1),
                     "mean_ratio": round(un["mean_ms"] / cdc["mean_ms"], 3),
                     "p99_ratio": round(un["p99_ms"] / cdc["p99_ms"], 3)})
    return rows


def plot(path, stats: list, emulated: dict, simulated: dict, title: str) -> None:
    plt = common.pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [s.label for s in SYSTEMS]
    colors = dict(zip(labels, ("tab:red", "tab:orange", "tab:blue")))
    metrics = ("mean_ms", "p95_ms", "p99_ms")
    width = 0.26
    for i, label in enumerate(labels):
        emu = next((r for r in stats if r["system"] == label and r["source"] == "emulated"), None)
        sim = next((r for r in stats if r["system"] == label and r["source"] == "simulated"), None)
        x = np.arange(len(metrics)) + (i - 1) * width
        if emu:
            bars = ax.bar(x, [emu[m] for m in metrics], width, color=colors[label], label=f"{label} (MPI, emulated)")
            for b, m in zip(bars, metrics):
                ax.annotate(f"{emu[m]:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
        if sim:
            ax.plot(x, [sim[m] for m in metrics], "k_", markersize=18, mew=2,
                    label="simulator" if i == 0 else None)
    ax.set_xticks(np.arange(len(metrics)), ["mean", "p95", "p99"])
    ax.set_ylabel("latency per request (ms)")
    ax.set_title("AlexNet latency, straggling WiFi Pis")
    ax.legend(fontsize=8, loc="upper left")
    for label in labels:
        if label in emulated and len(emulated[label]):
            v = np.sort(emulated[label])
            ax2.plot(v, np.arange(1, v.size + 1) / v.size, color=colors[label], label=f"{label} (MPI)")
        if label in simulated:
            v = np.sort(simulated[label])
            ax2.plot(v, np.arange(1, v.size + 1) / v.size, color=colors[label], ls="--", lw=1,
                     label=f"{label} (simulator)")
    ax2.set_xlabel("latency per request (ms)")
    ax2.set_ylabel("fraction of requests")
    ax2.set_title("latency CDF")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    common.save_figure(fig, path, title)


def main(argv=None) -> int:
    p = common.parser("fig5b", "Fig. 5b: straggler mitigation on AlexNet (uncoded vs 2MR+1 vs CDC+1), real MPI "
                               "ranks emulating Raspberry Pi 3s, plus the simulator.")
    add_common_options(p)
    p.add_argument("--requests", type=int, default=None, help="requests per system (default 120, quick 5)")
    p.add_argument("--sim-requests", type=int, default=None, help="simulated requests (default 20000, quick 2000)")
    p.add_argument("--delay-c", type=float, default=None, metavar="C",
                   help="compute time C of the wifi:C straggler model (default: mean block GEMM time, ~0.015)")
    p.add_argument("--device", default=DEVICE, help=f"device emulated by the workers (default {DEVICE})")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the simulator-only sensitivity table")
    common.add_cluster_options(p, "default: the device's own link, 30mbit for rpi3")
    args = p.parse_args(argv)
    cluster = common.cluster_mode(args, p, default_rate=common.device_rate(args.device))
    requests = args.requests or (5 if args.quick else 120)
    sim_requests = args.sim_requests or (2000 if args.quick else 20000)
    delay_c = args.delay_c if args.delay_c is not None else default_delay_c(args.device)
    delay = f"wifi:{delay_c}"
    folder = common.out_dir(args.out)
    started = time.perf_counter()
    settings = {"model": MODEL, "device": args.device, "master_device": MASTER_DEVICE, "delay": delay,
                "requests": requests, "sim_requests": sim_requests, "seed": args.seed,
                "systems": [asdict(s) for s in SYSTEMS], "mode": "cluster" if cluster else "ranks",
                "cluster": cluster.as_dict() if cluster else None,
                "sim_config": {"link": sim_config(cluster).link.value, "delay_blocks_worker": True}}
    (folder / "settings.json").write_text(json.dumps(settings, indent=1))

    jobs = run_emulation(SYSTEMS, requests=requests, delay=delay, device=args.device, seed=args.seed,
                         root=weights_root(args), hostfile=args.hostfile, cluster=cluster)
    common.write_csv(folder / "requests.csv", request_rows(jobs))
    common.write_csv(folder / "layers.csv", layer_rows(jobs))
    problems = [msg for label, res in jobs.items() for msg in check_job(res, label)]
    sims = simulate_systems(SYSTEMS, requests=sim_requests, delay=delay, device=args.device, seed=args.seed,
                            cluster=cluster)

    stats, emulated, simulated = [], {}, {}
    for s in SYSTEMS:
        res = jobs[s.label]
        lat = [r["latency_ms"] for r in res["requests"] if r["ok"]]
        emulated[s.label] = np.array(lat)
        med, worst = compute_fractions(res)
        errs = [r["check_rel_err"] for r in res["requests"] if r["check_rel_err"] is not None]
        stats.append({"system": s.label, "source": "emulated", "ranks": res["plan"]["world_size"],
                      "requests": len(res["requests"]), "ok": len(lat), **latency_stats(lat),
                      "worst_check_rel_err": max(errs) if errs else math.nan,
                      "median_compute_fraction": med, "worst_compute_fraction": worst,
                      "wall_s": res["_wall_s"]})
        sim = sims[s.label]
        simulated[s.label] = 1e3 * sim.latency[sim.ok]
        stats.append({"system": s.label, "source": "simulated", "ranks": sim.meta["world_size"],
                      "requests": int(sim.ok.size), "ok": int(sim.ok.sum()), **latency_stats(simulated[s.label])})
    fields = ["system", "source", "ranks", "requests", "ok", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms",
              "worst_check_rel_err", "median_compute_fraction", "worst_compute_fraction", "wall_s"]
    common.write_csv(folder / "stats.csv", [{k: (round(v, 4) if isinstance(v, float) else v)
                                              for k, v in row.items()} for row in stats], fields)
    sens = []
    if not args.no_sensitivity:
        sens = sensitivity(delay_c, requests=sim_requests, device=args.device, seed=args.seed, cluster=cluster)
        common.write_csv(folder / "sensitivity.csv", sens)
    where = f"on a namespace cluster ({cluster.rate} links, compute emulated)" if cluster else "on MPI ranks"
    title = (f"AlexNet on {WORKERS} emulated {args.device} workers (+1 for 2MR/CDC), straggler {delay} on every "
             f"worker; {requests} requests per system {where}, {sim_requests} simulated")
    plot(folder / "fig5b.png", stats, emulated, simulated, title)

    def get(label, source, key):
        return next(r[key] for r in stats if r["system"] == label and r["source"] == source)

    def ratios(source):
        return {k: get("uncoded", source, k) / get("CDC+1", source, k) for k in ("mean_ms", "p95_ms", "p99_ms")} | \
               {"2mr_" + k: get("2MR+1", source, k) / get("CDC+1", source, k) for k in ("mean_ms", "p99_ms")}

    e, sm = ratios("emulated"), ratios("simulated")

    def verdict(value, target):
        return "met" if value >= target else f"MISSED by {100 * (1 - value / target):.0f}%"

    lines = [f"Fig. 5b: AlexNet, {WORKERS} data workers emulating {args.device} Pis, straggler model {delay} "
             f"(the paper's Fig. 1 WiFi arrivals scaled to C = {1e3 * delay_c:.1f} ms, the mean per-block GEMM "
             f"time) on every worker; {requests} requests per system on real MPI ranks"
             + (f" on a cluster of network namespaces, every link shaped to {cluster.rate} (transfers real, "
                f"compute emulated)." if cluster else ".")]
    for s in SYSTEMS:
        lines.append(f"{s.label}: mean {get(s.label, 'emulated', 'mean_ms'):.0f} ms, p95 "
                     f"{get(s.label, 'emulated', 'p95_ms'):.0f}, p99 {get(s.label, 'emulated', 'p99_ms'):.0f} "
                     f"(simulator {get(s.label, 'simulated', 'mean_ms'):.0f} / {get(s.label, 'simulated', 'p95_ms'):.0f}"
                     f" / {get(s.label, 'simulated', 'p99_ms'):.0f}).")
    lines.append(f"CDC+1 vs uncoded: mean {e['mean_ms']:.2f}x (target >= {CDC_MEAN_TARGET}: "
                 f"{verdict(e['mean_ms'], CDC_MEAN_TARGET)}), p95 {e['p95_ms']:.2f}x, p99 {e['p99_ms']:.2f}x "
                 f"(target >= {CDC_P99_TARGET}: {verdict(e['p99_ms'], CDC_P99_TARGET)}); simulator mean "
                 f"{sm['mean_ms']:.2f}x, p99 {sm['p99_ms']:.2f}x.")
    better = e["2mr_mean_ms"] > 1 and e["2mr_p99_ms"] > 1
    lines.append(f"CDC+1 vs 2MR+1: mean {e['2mr_mean_ms']:.2f}x, p99 {e['2mr_p99_ms']:.2f}x faster "
                 f"(target: CDC better: {'met' if better else 'MISSED'}; simulator {sm['2mr_mean_ms']:.2f}x / "
                 f"{sm['2mr_p99_ms']:.2f}x).")
    if sens:
        best = [r for r in sens if r["p99_ratio"] >= CDC_P99_TARGET]
        lines.append("Why p99 stays below 2x with this model: a sum parity hides one straggler per layer, but "
                     "75% of replies straggle with an exponential tail and the 8 layers' delays add up, so the "
                     "ratio of tails approaches the ratio of means; the simulator reaches p99 "
                     f"{sens[0]['p99_ratio']:.2f}x here" +
                     (f" and >= 2x only under heavier or rarer tails ({'; '.join(r['straggler_model'] + ': ' + str(r['p99_ratio']) + 'x' for r in best)})."
                      if best else "; none of the tails in sensitivity.csv reaches 2x."))
    worst_err = max(get(s.label, "emulated", "worst_check_rel_err") for s in SYSTEMS)
    fr_med = max(get(s.label, "emulated", "median_compute_fraction") for s in SYSTEMS)
    fr_worst = max(get(s.label, "emulated", "worst_compute_fraction") for s in SYSTEMS)
    lines.append(f"Every output checked against the serial reference (worst relative error {worst_err:.1e}); real "
                 f"compute was {100 * fr_med:.0f}% of the modeled Pi time in the median layer (worst single layer "
                 f"{100 * fr_worst:.0f}%, machine shared). Run time {time.perf_counter() - started:.0f} s.")
    if problems:
        lines.append("PROBLEMS: " + "; ".join(problems))
    common.summary(" ".join(lines), folder)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
