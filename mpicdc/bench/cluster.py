"""``python -m mpicdc.bench cluster``: what each fault of a real device costs a job on the namespace cluster.

Per fault kind (crash, freeze then thaw, power-off, link cut, loud node death), on a fresh cluster
of a head plus 5 devices (network namespaces, every link shaped to ``--rate`` both ways; needs
root), a job of ``--model`` with sum parity 4+1 (master on the head, one worker per device) serves
``--requests`` requests with ``--check``; device 2 (rank 3, a data worker) takes the fault once
``--fault-after`` requests are answered.  ``--arrangement head`` keeps every Open MPI daemon on the
head, so no device's death can end the job; ``--arrangement device`` has a daemon per device (a
real cluster's layout) and runs the job under ``launch --supervise``, so when the runtime ends it
(a loud node death does) the supervisor relaunches on the devices still reachable.  Measured, per
run (mpicdc.experiments.cluster_recovery does the runs):

* requests lost: never answered, in the job or after a relaunch (target 0), and wrong: an answer
  not matching the serial forward (target 0);
* time to detect: from the fault to the master's ``rank 3 failed`` line;
* the hit request: the slowest request in flight between the fault and its detection, against
  the median latency of the run (target at most 1.2x when CDC absorbs the fault in the job: it
  never waits for the detector); "noise" is the slowest fault-free request before the fault
  against the same median, what the machine alone does to a request;
* when the job ended instead: the relaunch delay, from the fault to the relaunched job's first
  answer, and how late the hit request was (first submission to answer).

Prints one row per fault kind (ranges over ``--trials``), writes every run with ``--output``, and
with ``--check`` exits 1 when a target is missed (2: no namespaces here, or bad options).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mpicdc.experiments import cluster_recovery as cr

RATIO_TARGET = 1.2
SYSTEM = {"head": "cdc-head", "device": "cdc-device"}  # arrangement -> cluster_recovery's system

EPILOG = """\
examples:
  sudo python -m mpicdc.bench cluster                                 # tiny, daemons on the head, 100 Mbit/s
  sudo python -m mpicdc.bench cluster --model alexnet --trials 3      # real layers, three runs per fault
  sudo python -m mpicdc.bench cluster --arrangement device            # a daemon per device, supervised
  sudo python -m mpicdc.bench cluster --faults power_off,loud_death --rate 20mbit --check
  sudo python -m mpicdc.bench cluster --output cluster.json           # every run's numbers as JSON

fault kinds (done to device 2, rank 3; docs/cluster.md, "Faults"):
  crash        SIGKILL of the rank; its daemon lives
  freeze       SIGSTOP of the rank, SIGCONT 4 s later (past the 2 s failure detector)
  power_off    the device's link down, then everything in its namespace killed
  link_cut     the device's link down; everything alive, cut off
  loud_death   everything in the namespace killed, link up (ends the job with a daemon per device)"""


def _span(values: list, fmt: str, unit: str = "") -> str:
    """``1.02-1.10x`` or ``1.05x`` for the values present; ``-`` when there are none."""
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    low, high = min(got), max(got)
    return (f"{low:{fmt}}" if f"{low:{fmt}}" == f"{high:{fmt}}" else f"{low:{fmt}}-{high:{fmt}}") + unit


def judge(rows: list) -> list:
    """The targets these runs miss, one sentence each (empty: every target met)."""
    missed = []
    for r in rows:
        where = f"{r['fault']} (trial {r['trial'] + 1})"
        if r["answered"] < r["requests"]:
            missed.append(f"{where}: {r['requests'] - r['answered']} of {r['requests']} requests lost (target 0)")
        if r["answered"] and not r["matched"]:
            missed.append(f"{where}: an answer did not match the serial forward (target 0 wrong)")
        if r["hit_in_job"] and r["hit_over_median"] is not None and r["hit_over_median"] > RATIO_TARGET:
            missed.append(f"{where}: the hit request took {r['hit_over_median']:.2f}x the median in the job "
                          f"(target at most {RATIO_TARGET}x; noise {_noise(r) or '-'})")
    return missed


def _noise(r: dict) -> str | None:
    return f"{r['max_before_fault_ms'] / r['median_ms']:.2f}x" if r["max_before_fault_ms"] and r["median_ms"] else None


def _outcome(runs: list) -> str:
    """What became of the job in these runs of one fault kind: absorbed in it, relaunched, or ended."""
    kinds = []
    for r in runs:
        if r["attempts"] > 1:
            kinds.append("relaunched by the supervisor")
        elif r["answered"] < r["requests"]:
            kinds.append("the job ended")
        elif r["runtime_ended_s"] is not None:  # a daemon per device: PRRTE gives up on the lost one at the end
            kinds.append("absorbed in the job (the runtime lost the daemon at its end)")
        else:
            kinds.append("absorbed in the job")
    return "; ".join(f"{kinds.count(k)}/{len(kinds)} {k}" if len(set(kinds)) > 1 else k
                     for k in dict.fromkeys(kinds))


def table(rows: list) -> str:
    """One line per fault kind, ranges over its trials."""
    head = (f"{'fault':<11}{'lost':>6}{'wrong':>6}{'detect s':>12}{'hit/median':>13}{'hit ms':>14}{'median ms':>14}"
            f"{'noise':>13}{'relaunch s':>12}{'late s':>12}  outcome")
    lines = [head]
    for fault in cr.FAULTS:
        mine = [r for r in rows if r["fault"] == fault]
        if not mine:
            continue
        in_job = [r for r in mine if r["hit_in_job"]]
        later = [r for r in mine if not r["hit_in_job"]]
        outcome = _outcome(mine)
        lost = sum(r["requests"] - r["answered"] for r in mine)
        wrong = sum(1 for r in mine if r["answered"] and not r["matched"])
        lines.append(
            f"{fault:<11}{lost:>6}{wrong:>6}{_span([r['detect_s'] for r in mine], '.2f'):>12}"
            f"{_span([r['hit_over_median'] for r in in_job], '.2f', 'x'):>13}"
            f"{_span([r['hit_ms'] for r in in_job], '.0f'):>14}{_span([r['median_ms'] for r in mine], '.0f'):>14}"
            f"{_span([r['max_before_fault_ms'] / r['median_ms'] for r in mine if r['max_before_fault_ms'] and r['median_ms']], '.2f', 'x'):>13}"
            f"{_span([r['relaunch_first_answer_s'] for r in later], '.2f'):>12}"
            f"{_span([r['hit_ms'] / 1e3 for r in later if r['hit_ms'] is not None], '.2f'):>12}  {outcome}")
    return "\n".join(lines)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m mpicdc.bench cluster", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="zoo model (default tiny; alexnet for real layers, slower)")
    p.add_argument("--rate", default="100mbit", help="every link's rate, both ways, e.g. 20mbit (default 100mbit)")
    p.add_argument("--arrangement", choices=sorted(SYSTEM), default="head",
                   help="head: every daemon on the head (no device death ends the job; default); device: a daemon "
                        "per device, the job under launch --supervise")
    p.add_argument("--faults", default=",".join(cr.FAULTS), help=f"comma-separated (default {','.join(cr.FAULTS)})")
    p.add_argument("--trials", type=int, default=1, help="runs per fault kind, each on a fresh cluster (default 1)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per run (default 300 for tiny/lenet, 20 for other models)")
    p.add_argument("--fault-after", type=int, default=None,
                   help="answers before the fault (default 20 for tiny/lenet, 5 for other models)")
    p.add_argument("--timeout", type=float, default=None, help="bound on each run, s (default 150, 400 for "
                                                               "models other than tiny/lenet)")
    p.add_argument("--weights-dir", default=None, metavar="DIR",
                   help="where shards are prepared and reused (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed (default 0)")
    p.add_argument("--output", default=None, metavar="JSON", help="write every run's numbers and the verdict here")
    p.add_argument("--check", action="store_true", help=f"exit 1 when a target is missed: a request lost or wrong, "
                                                       f"or an absorbed fault's request over {RATIO_TARGET}x the median")
    args = p.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    bad = [f for f in faults if f not in cr.FAULTS]
    if bad or not faults:
        p.error(f"--faults: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(cr.FAULTS)}")
    requests, fault_after = cr.DEFAULTS.get(args.model, cr.OTHER_DEFAULT)
    args.requests = args.requests or requests
    args.fault_after = fault_after if args.fault_after is None else args.fault_after
    if not 1 <= args.fault_after < args.requests:
        p.error(f"--fault-after must be in 1..{args.requests - 1} (--requests {args.requests})")
    if args.trials < 1:
        p.error("--trials must be at least 1")
    args.timeout = args.timeout or (150.0 if args.model in cr.DEFAULTS else 400.0)
    args.faults = faults
    try:
        from mpicdc.core.models import get_model
        args.model_spec = get_model(args.model)
    except (KeyError, ValueError) as exc:
        p.error(f"--model: {exc}")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    from mpicdc.cluster import ClusterUnavailable, check_available
    try:
        check_available()
    except ClusterUnavailable as exc:
        print(f"bench cluster: cannot make network namespaces here: {exc}", file=sys.stderr)
        return 2
    from mpicdc.core.plan import make_plan
    from mpicdc.experiments.fig5b import ensure_weights

    system = SYSTEM[args.arrangement]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mpicdc-bench-") as tmp:
        root = Path(args.weights_dir or tmp)
        print(f"bench cluster: preparing {args.model} shards (sum 4+1) in {root} ...", flush=True)
        weights = {"sum": ensure_weights(args.model_spec, make_plan(args.model_spec, 4, 1, "sum"), root,
                                         args.seed).resolve()}
        cells = [(trial, fault, system) for trial in range(args.trials) for fault in args.faults]
        rows, problems, _start_failures = cr.run_all(
            cells, "bench cluster", model=args.model, weights=weights, rate=args.rate, requests=args.requests,
            fault_after=args.fault_after, timeout=args.timeout, supervise=args.arrangement == "device")
    missed = judge(rows) + problems + [f"{f}: no run finished" for f in args.faults
                                       if not any(r["fault"] == f for r in rows)]
    print(f"\ncluster: {args.model}, sum parity 4+1, head + {cr.DEVICES} devices at {args.rate}, daemons on the "
          f"{args.arrangement}{' (supervised)' if args.arrangement == 'device' else ''}; fault on device {cr.DEVICE} "
          f"(rank {cr.RANK}) after {args.fault_after} of {args.requests} answers; {args.trials} trial(s), "
          f"{time.perf_counter() - started:.0f} s")
    print(table(rows))
    print("lost: never answered; wrong: not matching the serial forward; detect: fault -> 'rank 3 failed'; "
          "hit: slowest request in flight until detection; noise: slowest request before the fault; both against "
          "the run's median; relaunch: fault -> first answer after the relaunch; late: the hit request's lateness")
    print("targets: " + ("all met" if not missed else f"{len(missed)} missed\n  " + "\n  ".join(missed)))
    if args.output:
        document = {"model": args.model, "rate": args.rate, "arrangement": args.arrangement, "code": "sum 4+1",
                    "devices": cr.DEVICES, "requests": args.requests, "fault_after": args.fault_after,
                    "trials": args.trials, "targets": {"lost": 0, "wrong": 0, "hit_over_median": RATIO_TARGET},
                    "missed": missed, "runs": rows}
        Path(args.output).write_text(json.dumps(document, indent=1) + "\n")
        print(f"written to {args.output}")
    return 1 if args.check and missed else 0
