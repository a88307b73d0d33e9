"""Recovery per fault kind on the network-namespace cluster: in-job decoding against supervisor relaunch.

``python -m mpicdc.experiments.recovery --cluster`` (or ``bash jobs/recovery.sh --cluster``) runs
this.  On a cluster of a head + 5 devices (:class:`mpicdc.cluster.Cluster`, every link shaped to
``--rate``), for each fault kind done to device 2 (rank 3, a data worker) once ``--fault-after``
requests have been answered, three systems serve the same ``--requests`` requests with ``--check``:

* ``cdc-device``: sum parity 4+1 (6 ranks), one Open MPI daemon per device (a real cluster's
  layout): the master decodes around the lost rank inside the job;
* ``cdc-head``: the same job with every daemon on the head and each device's rank behind a relay
  (``daemons="head"``), so no device's death can end the job;
* ``relaunch``: the classic alternative, automated: an uncoded job (4 data workers, 5 ranks, one
  daemon per device) under ``python -m mpicdc.launch --supervise`` with the whole hostfile, so the
  fifth device is free for the relaunch.  Every fault ends this job (an uncoded request cannot be
  served without rank 3), and the supervisor relaunches on the devices still reachable and
  replays the unanswered requests.

Per run: the request hit by the fault (the one in flight when it was done), its latency (in-job)
or lateness (from its first submission to its answer, when it straddled a relaunch) against the
median latency of every answered request; whether every request was answered and matched the
serial reference; the detection time (fault -> the master's ``rank 3 failed`` line); the exit code.
Outputs in ``--out`` (default ``results/recovery-cluster``): ``runs.csv`` (one row per run),
``recovery.png`` (or ``--plot PNG``: the hit request per fault kind and system, every trial) and
``summary.txt`` (the table and the paragraph it prints).  Needs root (network namespaces).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

from mpicdc.experiments import common

FAULTS = ("crash", "power_off", "link_cut", "loud_death", "freeze")
SYSTEMS = ("cdc-device", "cdc-head", "relaunch")
DEVICES = 5
DEVICE = 2          # the device faulted: runs rank 3, a data worker
RANK = DEVICE + 1
THAW_S = 4.0        # a frozen rank is thawed this long after the freeze (past the 2 s detector)
DEFAULTS = {"tiny": (300, 20), "lenet": (300, 20)}  # model -> (requests, fault after this many answers)
OTHER_DEFAULT = (20, 5)


class DidNotStart(RuntimeError):
    """The job ended before answering anything, before the fault was done (e.g. mpirun's PMIx listener
    failed to start): a start-up failure, not an outcome of the fault; the run is retried once."""


def _wait_answers(journal: Path, count: int, job, timeout: float) -> int:
    """Wait (bounded) until the journal holds ``count`` answers or the job ended; how many it holds."""
    from mpicdc.runtime.journal import read_journal

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        have = sum(len(r.answers) for r in read_journal(journal).runs)
        if have >= count or job.proc.poll() is not None:
            return have
        time.sleep(0.02)
    return sum(len(r.answers) for r in read_journal(journal).runs)


def hit_request(journal: Path, fault_unix: float, detected_unix: float | None) -> dict:
    """The request hit by the fault, from the journal: the slowest of those the first run had in flight
    between the fault and its detection (``detected_unix``; None: until the first run's last answer),
    and of those that straddled a relaunch (lateness: first submission -> answer, as the supervisor
    counts it).  The one in flight at the fault may already hold the lost rank's replies, so the
    window, not that one request, is what shows whether a request waited for the detector.
    Returns ``{"id", "in_job", "ms"}``; ``ms`` None when a request of the window was never answered."""
    from mpicdc.runtime.journal import read_journal
    from mpicdc.runtime.supervisor import lateness

    state = read_journal(journal)
    if not state.runs:
        return {"id": None, "in_job": False, "ms": None}
    first = state.runs[0]
    answers = [a for a in first.answers if a.get("ok")]
    until = detected_unix if detected_unix is not None else max([first.started] + [a["t"] for a in answers])
    until = max(until, fault_unix)
    hit = [(a["latency_ms"], a["id"], True) for a in answers
           if a["t"] >= fault_unix and a["t"] - a["latency_ms"] / 1e3 <= until]
    hit += [(1e3 * s, i, False) for i, s in lateness(first.ids, str(journal)).items()]
    done = {a["id"] for a in answers if a["t"] <= fault_unix}
    missing = [i for i in first.ids if i not in done and i not in state.answers]
    if missing:  # never answered: worse than any late answer
        return {"id": missing[0], "in_job": False, "ms": None}
    if not hit:
        return {"id": None, "in_job": False, "ms": None}
    ms, rid, in_job = max(hit)
    return {"id": rid, "in_job": in_job, "ms": float(ms)}


def launch_supervised(c, ranks: int, run_args: list, timeout: float):
    """``python -m mpicdc.launch --supervise`` from the head of cluster ``c`` with its whole hostfile (a
    daemon per device), so a job the runtime ends is relaunched on the devices still reachable."""
    from mpicdc.cluster import ROOT, ClusterJob, mpirun_extra

    cmd = ["ip", "netns", "exec", c.head.netns, sys.executable, "-m", "mpicdc.launch", "--supervise",
           "--probe-timeout", "1", "-np", str(ranks), "--hostfile", c.hostfile,
           *(f"--mpirun-arg={a}" for a in mpirun_extra(c)), *run_args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    job = ClusterJob(c, cmd, env, timeout=timeout)
    c._jobs = [*getattr(c, "_jobs", []), job]
    return job


def one_run(system: str, fault: str, *, model: str, weights: dict, rate: str, requests: int,
            fault_after: int, timeout: float, trial: int, supervise: bool = False) -> tuple:
    """One fault done to one system on a fresh cluster; returns (row, problems, prefix).  ``supervise``
    runs a ``cdc-device`` job under ``launch --supervise`` too (``relaunch`` always is)."""
    from mpicdc.cluster import Cluster
    from mpicdc.run import CHECK_RTOL
    from mpicdc.runtime.journal import read_journal

    prefix = f"cr{random.randrange(10 ** 6)}"
    daemons = "head" if system == "cdc-head" else "device"
    code = "none" if system == "relaunch" else "sum"
    ranks = 5 if system == "relaunch" else 6
    problems = []
    with Cluster(DEVICES, rate=rate, prefix=prefix, daemons=daemons) as c:
        journal, out = c.state / "journal.jsonl", c.state / "run.json"
        run_args = [model, "--weights", str(weights[code]), "--repeat", str(requests), "--check", "-q",
                    "--journal", str(journal), "--output", str(out), "--link", rate]
        if system == "relaunch" or (supervise and daemons == "device"):
            job = launch_supervised(c, ranks, run_args, timeout)
        else:
            job = c.launch(ranks, run_args, timeout=timeout)
        have = _wait_answers(journal, fault_after, job, timeout=min(timeout, 120))
        if have < fault_after:
            ended = job.proc.poll() is not None
            job.kill()
            done = job.finish()
            raise (DidNotStart if ended and have == 0 else RuntimeError)(f"{system}/{fault}: only {have} of {fault_after} requests answered before the "
                               f"fault was due (job {'ended' if job.proc.poll() is not None else 'too slow'})\n"
                               f"{done.explain()}")
        fault_unix = time.time()
        at = getattr(c, fault)(DEVICE)
        if fault == "freeze":
            time.sleep(THAW_S)
            try:
                c.thaw(DEVICE)
            except LookupError:  # the frozen rank is gone already (its job ended)
                pass
        done = job.finish()
        results = json.loads(out.read_text()) if out.exists() else None
        state = read_journal(journal)
        seen = done.first(f"rank {RANK} failed")
        hit = hit_request(journal, fault_unix, None if seen is None else fault_unix + (seen - at))
        ended = done.first("PRTE has lost communication")
    if done.timed_out:
        problems.append(f"{system}/{fault}: timed out after {timeout:g} s")
    answered = len([i for i in range(requests) if i in state.answers])
    latencies = [a["latency_ms"] for a in state.answers.values()]
    errs = [a.get("check_rel_err") for a in state.answers.values()]
    first = state.runs[0].answers if state.runs else []
    before = [a["latency_ms"] for a in first[1:] if a.get("ok") and a["t"] <= fault_unix]  # [0] warms up
    rtol = CHECK_RTOL[code]
    matched = bool(errs) and all(e is not None and e <= rtol for e in errs)
    if answered and not matched:
        problems.append(f"{system}/{fault}: an answered output did not match the reference")
    median = float(np.median(latencies)) if latencies else None
    row = {"trial": trial, "fault": fault, "system": system, "daemons": daemons, "code": code, "ranks": ranks,
           "requests": requests, "answered": answered, "matched": int(matched),
           "hit_request": hit["id"], "hit_in_job": int(hit["in_job"]),
           "hit_ms": None if hit["ms"] is None else round(hit["ms"], 2),
           "median_ms": None if median is None else round(median, 2),
           "hit_over_median": None if hit["ms"] is None or not median else round(hit["ms"] / median, 2),
           "max_before_fault_ms": round(max(before), 2) if before else None,
           "detect_s": None if seen is None else round(seen - at, 3),
           "runtime_ended_s": None if ended is None else round(ended - at, 3),
           "attempts": len(state.runs), "exit_code": done.returncode, "seconds": round(done.seconds, 1)}
    if results and results.get("supervised"):
        rec = (results["summary"].get("recoveries") or [{}])[0]
        row["relaunch_ready_s"] = None if rec.get("ready_s") is None else round(rec["ready_s"], 2)
    else:
        row["relaunch_ready_s"] = None
    relaunched = [a["t"] for run in state.runs[1:] for a in run.answers if a.get("ok")]
    row["relaunch_first_answer_s"] = round(min(relaunched) - fault_unix, 2) if relaunched else None  # fault -> it
    return row, problems, prefix


def run_retrying(system: str, fault: str, **run) -> tuple:
    """:func:`one_run` (keywords ``run``), once more on a fresh cluster when the job did not start.
    Returns (row or None, problems, prefix or None, start failures as ``"system/fault (why)"``)."""
    problems, start_failures = [], []
    for attempt in (1, 2):
        try:
            row, pr, prefix = one_run(system, fault, **run)
        except DidNotStart as exc:
            print(f"  the job did not start (retried once, on a fresh cluster): {exc}", file=sys.stderr, flush=True)
            why = next((x.strip() for x in str(exc).splitlines()[1:] if "fail" in x or "error" in x.lower()),
                       "no answer, no reason printed")
            start_failures.append(f"{system}/{fault} ({why})")
            if attempt == 2:
                problems.append(str(exc).splitlines()[0])
            continue
        except RuntimeError as exc:
            problems.append(str(exc).splitlines()[0])
            print(f"  {exc}", file=sys.stderr, flush=True)
            break
        row["start_retries"] = attempt - 1
        return row, problems + pr, prefix, start_failures
    return None, problems, None, start_failures


def run_all(cells: list, label: str, on_row=None, **run) -> tuple:
    """Every ``(trial, fault, system)`` of ``cells`` through :func:`run_retrying` (keywords ``run``), each on a
    fresh cluster, said as it goes; ``on_row(rows)`` after every run (an interrupted session keeps its rows).
    Returns (rows, problems, start failures); a namespace left is a problem."""
    from mpicdc.cluster.netns import list_netns

    rows, problems, prefixes, start_failures = [], [], [], []
    trials = max((trial for trial, _, _ in cells), default=0) + 1
    for trial, fault, system in cells:
        print(f"{label}: trial {trial + 1}/{trials}: {fault} on {system} ...", flush=True)
        row, pr, prefix, failed = run_retrying(system, fault, trial=trial, **run)
        problems += pr
        start_failures += failed
        if row is None:
            continue
        rows.append(row)
        prefixes.append(prefix)
        if on_row is not None:
            on_row(rows)
        print(f"  {cell(row)}; exit {row['exit_code']}, {row['seconds']:.0f} s", flush=True)
    left = [ns for ns in list_netns() if any(ns.startswith(pf + "-") for pf in prefixes)]
    if left:
        problems.append(f"namespaces left behind: {left}")
    return rows, problems, start_failures


def cell(row: dict) -> str:
    """``1.05x (21 ms), 300/300, det 1.85 s`` for the printed table: the hit request against the median
    (its latency in the job, or its lateness when it straddled a relaunch), requests answered, detection."""
    if row["hit_ms"] is None and row["hit_request"] is None:
        hit = "no request in flight"
    elif row["hit_ms"] is None:
        hit = f"request {row['hit_request']} never answered"
    else:
        hit = (f"{row['hit_over_median']:.2f}x ({row['hit_ms']:.0f} ms)" if row["hit_in_job"]
               else f"late {row['hit_ms'] / 1e3:.2f} s ({row['hit_over_median']:.0f}x)")
    det = ("-" if row["runtime_ended_s"] is None else f"- (runtime ended the job {row['runtime_ended_s']:.2f} s)") \
        if row["detect_s"] is None else f"{row['detect_s']:.2f} s"
    return f"{hit}, {row['answered']}/{row['requests']}, det {det}"


def table(rows: list) -> str:
    faults = [f for f in FAULTS if any(r["fault"] == f for r in rows)]
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    width = max([len(cell(r)) for r in rows] + [10]) + 2
    lines = [f"{'fault':<11}" + "".join(f"{s:<{width}}" for s in systems)]
    for f in faults:
        for trial in sorted({r["trial"] for r in rows}):
            by = {r["system"]: r for r in rows if r["fault"] == f and r["trial"] == trial}
            lines.append(f"{f:<11}" + "".join(f"{(cell(by[s]) if s in by else '-'):<{width}}" for s in systems).rstrip())
    return "\n".join(lines)


#: how each system is drawn in :func:`plot`
STYLE = {"cdc-device": ("tab:blue", "o", "CDC 4+1 in the job, daemon per device"),
         "cdc-head": ("tab:green", "s", "CDC 4+1 in the job, daemons on the head"),
         "relaunch": ("tab:red", "^", "uncoded, supervisor relaunch (lateness)")}


def plot(path, rows: list, title: str) -> None:
    """Per fault kind, every run's hit request (its latency in the job, or its lateness across a relaunch) on
    a log scale, with each run's median latency as a dash; a run that lost requests is a cross at the top."""
    plt = common.pyplot()
    faults = [f for f in FAULTS if any(r["fault"] == f for r in rows)]
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    known = [r["hit_ms"] for r in rows if r["hit_ms"]] + [r["median_ms"] for r in rows if r["median_ms"]]
    top = 3 * max(known) if known else 1e4
    width = 0.8 / max(1, len(systems))
    for j, system in enumerate(systems):
        color, marker, label = STYLE[system]
        for i, fault in enumerate(faults):
            mine = [r for r in rows if r["system"] == system and r["fault"] == fault]
            for k, r in enumerate(mine):
                x = i + (j - (len(systems) - 1) / 2) * width + (k - (len(mine) - 1) / 2) * width / (len(mine) + 1)
                lost = r["answered"] < r["requests"] or (r["hit_ms"] is None and r["hit_request"] is not None)
                if r["hit_ms"] is None and not lost:
                    pass  # no request was in flight between the fault and its detection: nothing hit
                elif lost:
                    ax.plot(x, top, "x", color=color, ms=10, mew=2)
                    ax.annotate(f"{r['answered']}/{r['requests']}", (x, top), textcoords="offset points",
                                xytext=(0, -14 - 10 * k), ha="center", fontsize=7, color=color)
                else:
                    ax.plot(x, r["hit_ms"], marker, color=color, ms=7, mfc=color if r["hit_in_job"] else "white")
                if r["median_ms"]:
                    ax.plot([x - width / 3, x + width / 3], [r["median_ms"]] * 2, "-", color="k", lw=1)
        ax.plot([], [], marker, color=color, label=label)
    ax.plot([], [], "-", color="k", label="the run's median request latency")
    ax.plot([], [], "x", color="gray", mew=2, label="requests lost (answered/requested)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(faults)), [f.replace("_", " ") for f in faults])
    ax.set_ylabel("hit request: latency in the job / lateness (ms)")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    common.save_figure(fig, path, title)


def _names(text: str, allowed: tuple, what: str, p) -> list:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        p.error(f"--{what}: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(allowed)}")
    return names


def main(argv=None) -> int:
    from mpicdc.experiments.fig5b import ensure_weights, weights_root

    p = common.parser("recovery-cluster", "Recovery per fault kind on a network-namespace cluster (head + 5 "
                                          "devices, shaped links): CDC in-job decoding (daemon per device, daemons "
                                          "on the head) against supervisor relaunch of an uncoded job.")
    p.prog = "python -m mpicdc.experiments.recovery --cluster"
    p.add_argument("--cluster", action="store_true", help="accepted for `recovery --cluster` (this is that mode)")
    p.add_argument("--model", default="tiny", help="tiny (default) or lenet: quick; alexnet: real layers (slower)")
    p.add_argument("--rate", default="100mbit", help="every link's rate, both ways (default 100mbit)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated (default {','.join(FAULTS)})")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated (default {','.join(SYSTEMS)})")
    p.add_argument("--requests", type=int, default=None, help="requests per run (default 300 for tiny/lenet, quick 200; else 20)")
    p.add_argument("--fault-after", type=int, default=None,
                   help="answers before the fault (default 20 for tiny/lenet, quick 10; else 5)")
    p.add_argument("--trials", type=int, default=1, help="repetitions of every cell (default 1)")
    p.add_argument("--timeout", type=float, default=None, help="bound on each run, s (default 150, alexnet 400)")
    p.add_argument("--weights-dir", default=None, metavar="DIR", help="where prepared shards are kept and reused")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw every run's hit request per fault kind, in-job decoding against supervisor "
                        "relaunch, into PNG (default: recovery.png in --out)")
    p.add_argument("--hostfile", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hostfile:
        p.error("--cluster makes its own cluster of network namespaces on this machine; --hostfile does not apply")
    faults = _names(args.faults, FAULTS, "faults", p)
    systems = _names(args.systems, SYSTEMS, "systems", p)
    requests, fault_after = DEFAULTS.get(args.model, OTHER_DEFAULT)
    if args.quick and args.model in DEFAULTS:
        requests, fault_after = 200, 10
    requests = args.requests or requests
    fault_after = args.fault_after if args.fault_after is not None else fault_after
    if not 1 <= fault_after < requests:
        p.error(f"--fault-after must be in 1..{requests - 1}")
    timeout = args.timeout or (150.0 if args.model in DEFAULTS else 400.0)

    from mpicdc.cluster import ClusterUnavailable, check_available
    try:
        check_available()
    except ClusterUnavailable as exc:
        print(f"recovery --cluster: cannot make network namespaces here: {exc}", file=sys.stderr)
        return 2
    from mpicdc.core.models import get_model
    from mpicdc.core.plan import make_plan

    try:
        model = get_model(args.model)
    except (KeyError, ValueError) as exc:
        p.error(f"--model: {exc}")
    root = weights_root(args)
    weights = {code: ensure_weights(model, make_plan(model, 4, None, code), root, args.seed).resolve()
               for code in ("sum", "none")}
    folder = common.out_dir(args.out)
    started = time.perf_counter()
    cells = [(trial, fault, system) for trial in range(args.trials) for fault in faults for system in systems]
    rows, problems, start_failures = run_all(cells, "recovery --cluster", model=args.model, weights=weights,
                                             rate=args.rate, requests=requests, fault_after=fault_after,
                                             timeout=timeout,
                                             on_row=lambda rows: common.write_csv(folder / "runs.csv", rows))
    if rows:
        common.write_csv(folder / "runs.csv", rows)
        trials = f"{args.trials} trial{'s' if args.trials > 1 else ''} per cell"
        plot(args.plot or folder / "recovery.png", rows,
             f"Recovery per fault kind on the namespace cluster: {args.model}, head + {DEVICES} devices at "
             f"{args.rate},\nfault on device {DEVICE} after {fault_after} of {requests} answers; {trials}")
    load = os.getloadavg()[0]
    tab = table(rows)
    in_job = [r for r in rows if r["hit_in_job"] and r["hit_over_median"] is not None and r["max_before_fault_ms"]]
    relaunched = [r for r in rows if r["system"] == "relaunch" and r["hit_ms"] is not None and not r["hit_in_job"]]
    text = (f"Recovery on the cluster: {args.model}, head + {DEVICES} devices at {args.rate}, fault on device "
            f"{DEVICE} (rank {RANK}) after {fault_after} of {requests} answers, {args.trials} trial(s); "
            f"load average {load:.1f} at the end.\n{tab}\n"
            + (f"In-job decoding served the hit request in {min(r['hit_over_median'] for r in in_job):.2f}-"
               f"{max(r['hit_over_median'] for r in in_job):.2f}x the median latency (the slowest request before "
               f"the fault: {min(r['max_before_fault_ms'] / r['median_ms'] for r in in_job):.2f}-"
               f"{max(r['max_before_fault_ms'] / r['median_ms'] for r in in_job):.2f}x). " if in_job else "")
            + (f"The supervisor's relaunch answered it {min(r['hit_ms'] for r in relaunched) / 1e3:.2f}-"
               f"{max(r['hit_ms'] for r in relaunched) / 1e3:.2f} s after its first submission. " if relaunched
               else "")
            + f"{sum(r['answered'] == r['requests'] for r in rows)} of {len(rows)} runs answered every request. "
            + (f"{len(start_failures)} job(s) failed to start before any fault and were run again: "
               f"{'; '.join(start_failures)}. " if start_failures else "")
            + f"Run time {time.perf_counter() - started:.0f} s.")
    return common.finish(text, folder, problems)


if __name__ == "__main__":
    raise SystemExit(main())
