"""The straggler frontier measured on MPI ranks of this machine: ``bench speedup --stragglers-ranks K``.

The simulator's frontier (:func:`mpicdc.bench.speedup.frontier`) on real ranks: uncoded 4 data
workers, then for r = 1..3 extra devices an MDS code (any r late replies decoded around) against
replication of blocks 1..r, under the paper's WiFi delay ``wifi:C`` and a Pareto tail (alpha 2)
of the same mean, injected on every worker as Fig. 5b does (``--inject delay:all:MODEL``: the
worker sleeps the sampled delay after its block, so the delay keeps it busy).  Every rank
emulates a Pi 3 (``--device``/``--master-device rpi3``, each worker on its own modeled link),
``C`` is AlexNet's Fig. 5b scale (about 15 ms), and every output is checked against the serial
forward.  Next to each: the simulator's mean and p99 over 4000 requests of the same model,
plans, device and delays, configured like the emulation
(:func:`mpicdc.experiments.fig5b.sim_config`).

The model is LeNet, not AlexNet: AlexNet's requests take 1.4-2.4 s under these delays, so 14
systems x 100 requests would take about 45 minutes; LeNet's take 0.5-1 s (its compute is 25 ms,
so nearly all of its latency is the injected delays: the frontier of the straggling part).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

MODEL = "lenet"
WORKERS = 4
SIM_REQUESTS = 4000
#: failure detector for ranks sharing a busy machine: no fault is injected here, and CPU starvation
#: past the default 2 s timeout made ranks count each other dead at start-up (measured at load 47)
LOADED_DETECTOR = {"OMPI_MCA_mpi_ft_detector_period": "1", "OMPI_MCA_mpi_ft_detector_timeout": "10"}


def systems(model) -> list:
    """``[(name, Plan)]``: uncoded, then MDS +r and replication +r for r = 1..3."""
    from mpicdc.core.plan import make_plan

    out = [("uncoded", make_plan(model, WORKERS, code="none"))]
    for r in (1, 2, 3):
        out += [(f"MDS +{r}", make_plan(model, WORKERS, r, "mds")),
                (f"replication +{r}", make_plan(model, WORKERS, r, "replication"))]
    return out


def delays(device: str) -> list:
    """``[(label, delay spec)]``: the paper's WiFi model at Fig. 5b's scale and a Pareto tail of its mean."""
    from mpicdc.core.faults import parse_delay
    from mpicdc.experiments.fig5b import default_delay_c

    c = default_delay_c(device)
    return [(f"paper WiFi wifi:{c}", f"wifi:{c}"),
            ("Pareto alpha 2, same mean", f"pareto:{parse_delay(f'wifi:{c}').mean() / 2:.6g},2")]


def measure_one(model, plan, delay: str, device: str, requests: int, weights_root: Path) -> dict:
    """Mean and p99 (s) of ``requests`` requests on ranks, and whether all matched the serial forward."""
    from mpicdc.experiments import common
    from mpicdc.experiments.fig5b import check_job, ensure_weights, latency_stats

    folder = ensure_weights(model, plan, weights_root)
    args = [model.name, "--weights", str(folder), "--device", device, "--master-device", device,
            "--inject", f"delay:all:{delay}", "--repeat", str(requests), "--check"]
    try:
        res = common.run_mpi_job(plan.world_size, args, timeout=120 + 10 * requests)
    except RuntimeError as exc:
        return {"error": str(exc)[-1500:]}
    stats = latency_stats([r["latency_ms"] for r in res["requests"] if r["ok"]])
    problems = check_job(res, plan.code)
    return {"mean_s": stats["mean_ms"] / 1e3, "p99_s": stats["p99_ms"] / 1e3, "matched": not problems,
            "problems": problems}


def simulated(model, plan, delay: str, device: str) -> tuple:
    """The simulator's (mean s, p99 s) over :data:`SIM_REQUESTS` requests, configured like the ranks."""
    from mpicdc.experiments.fig5b import sim_config
    from mpicdc.sim import simulate

    s = simulate(model, plan, requests=SIM_REQUESTS, device=device, delay=delay, seed=0,
                 config=sim_config()).summary()
    return s["mean"], s["p99"]


def run(requests: int, device: str, weights_root: Path, log=print) -> list:
    """Measure and simulate every (delay, system); print the table; return its rows."""
    from mpicdc.core.models import get_model

    model = get_model(MODEL)
    for key, value in LOADED_DETECTOR.items():  # the jobs inherit it; an exported value wins
        os.environ.setdefault(key, value)
    log(f"\nstraggler frontier measured on MPI ranks of this machine ('ranks', not simulated): {MODEL}, "
        f"{WORKERS} data workers + r extra, every rank emulating {device}, {requests} requests per system; "
        f"'sim' is the simulator over {SIM_REQUESTS} requests")
    log(f"{'delay':<28}{'system':<17}{'mean s':>8}{'p99 s':>8}{'p99 gain':>9}{'sim mean':>9}{'sim p99':>8}"
        f"{'sim gain':>9}  check")
    rows, start = [], time.monotonic()
    for label, spec in delays(device):
        base = None
        for name, plan in systems(model):
            row = {"mode": "ranks", "model": MODEL, "delay": label, "system": name, "requests": requests}
            row.update(measure_one(model, plan, spec, device, requests, weights_root))
            row["sim_mean_s"], row["sim_p99_s"] = simulated(model, plan, spec, device)
            base = base or row
            rows.append(row)
            gain = base.get("p99_s", math.nan) / row.get("p99_s", math.nan)
            sim_gain = base["sim_p99_s"] / row["sim_p99_s"]
            head = f"{label:<28}{name:<17}"
            if "error" in row:
                log(f"{head}  FAILED: {row['error']}")
                continue
            check = "matched" if row["matched"] else "NOT MATCHED: " + "; ".join(row["problems"])
            log(f"{head}{row['mean_s']:>8.3f}{row['p99_s']:>8.3f}{gain:>8.2f}x{row['sim_mean_s']:>9.3f}"
                f"{row['sim_p99_s']:>8.3f}{sim_gain:>8.2f}x  {check}")
    log(f"({time.monotonic() - start:.0f} s; this machine's load average {os.getloadavg()[0]:.1f} at the end, "
        f"on {os.cpu_count()} cores)")
    return rows
