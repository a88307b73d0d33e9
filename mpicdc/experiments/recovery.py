"""Recovery latency after a real SIGKILL: CDC against restart-based recovery.

A data worker (rank 2) of an AlexNet job on emulated ``rpi3`` workers kills itself
with ``SIGKILL`` in request ``K`` at layer ``conv3`` (``--inject crash:2@K:conv3``).
No stragglers are injected, so every difference is the cost of the failure.

* **CDC+1** (4 data workers + 1 sum-parity worker, 6 ranks): the master learns of
  the death from ULFM and decodes around the dead rank with one subtraction per
  layer; request ``K`` and every later one are served by the same job.
* **restart** (the classic alternative, 4 data workers uncoded, 5 ranks): request
  ``K`` fails when the death is detected, the job ends (exit code 4), and a new job
  is launched without the dead rank on a new plan (3 data workers, 4 ranks), which
  loads and verifies its shards and redoes request ``K``, then serves the rest.
  Its latency for request ``K`` is measured for real here, in parts:

  - *detect*: from the start of request ``K`` until the master reports it failed
    (work done before the crash plus the failure notification);
  - *teardown*: until the failed job has ended;
  - *relaunch + reload*: from launching the new job until its master is ready (mpirun,
    Python and MPI start-up, every rank reading and checksumming its shard);
  - *recompute*: the redone request on the new job.

* **supervised** (the same restart, automated): the uncoded 5-rank job runs under
  ``python -m mpicdc.launch --supervise`` with the 4-rank shards given as ``--plan``; the
  supervisor sees exit code 4, relaunches on 4 ranks and replays request ``K`` and the rest
  from its journal.  Request ``K``'s latency is its lateness: from its first submission to its
  answer in the relaunched job (``late_s`` in the supervisor's output).

  Re-cutting the shards for the smaller world (:func:`mpicdc.store.prepare`) is timed
  separately (*reshard*); a restart-based system can prepare them in advance, so the
  headline leaves it out and the plot shows it hatched.

``--trials`` repeats both (with fresh jobs) for the spread.  Outputs in ``--out``:
``requests.csv`` (latency per request of both, every trial), ``recovery.csv`` (the
parts per trial), ``recovery.png``, ``summary.txt``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from mpicdc.experiments import common
from mpicdc.experiments.fig5b import add_common_options, ensure_weights, weights_root

MODEL = "alexnet"
DEVICE = "rpi3"
WORKERS = 4
RANK = 2
LAYER = "conv3"


def run_streaming(np_ranks: int, run_args: list, timeout: float, hostfile: str | None = None) -> dict:
    """Run ``python -m mpicdc.run`` under the launcher, timestamping every line the master prints.

    Returns the job's JSON plus ``_t_start``, ``_t_end`` (``time.monotonic``), ``_lines``
    (``[(t, line)]``) and ``_returncode``.  The whole process group is killed on timeout.
    """
    with tempfile.TemporaryDirectory(prefix="mpicdc-rec-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "mpicdc.launch", "-np", str(np_ranks)]
        if hostfile:
            cmd += ["--hostfile", hostfile]
        cmd += [*run_args, "--output", str(out)]
        err = open(Path(tmp) / "stderr.txt", "w+")
        t_start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ),
                                start_new_session=True, bufsize=1)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        lines = []
        try:
            for line in proc.stdout:
                lines.append((time.monotonic(), line.rstrip("\n")))
            code = proc.wait()
        finally:
            timer.cancel()
        t_end = time.monotonic()
        err.seek(0)
        stderr = err.read()
        err.close()
        text = "\n".join(x for _, x in lines)
        if timed_out.is_set():
            raise RuntimeError(f"MPI job timed out after {timeout}s: {' '.join(cmd)}\n{text}\n{stderr}")
        if not out.exists():
            raise RuntimeError(f"MPI job failed (exit {code}): {' '.join(cmd)}\n{text}\n{stderr}")
        import json
        result = json.loads(out.read_text())
    result.update(_t_start=t_start, _t_end=t_end, _lines=lines, _returncode=code)
    return result


def _line_time(result: dict, prefix: str) -> float:
    for t, line in result["_lines"]:
        if line.startswith(prefix):
            return t
    raise RuntimeError(f"no line starting with {prefix!r} in the job's output:\n" +
                       "\n".join(x for _, x in result["_lines"]))


def _checked(result: dict, label: str, expect_failed: tuple = ()) -> list:
    problems = []
    for r in result["requests"]:
        if r["request"] in expect_failed:
            if r["ok"]:
                problems.append(f"{label}: request {r['request']} should have failed")
            continue
        if not r["ok"]:
            problems.append(f"{label}: request {r['request']} failed: {r['error']}")
        elif r["check_rel_err"] is None or r["check_rel_err"] > 1e-4:
            problems.append(f"{label}: request {r['request']} off the reference ({r['check_rel_err']})")
    return problems


def one_trial(trial: int, *, requests: int, kill_at: int, device: str, seed: int, root: Path,
              hostfile: str | None, reshard_s: float) -> tuple:
    """Both systems once; returns (request rows, part row, problems)."""
    from mpicdc.core.models import get_model
    from mpicdc.core.plan import make_plan

    model = get_model(MODEL)
    crash = f"crash:{RANK}@{kill_at}:{LAYER}"
    base = ["--device", device, "--check", "--seed", str(seed)]
    timeout = 300 + 20 * requests
    rows, problems = [], []

    plan_cdc = make_plan(model, WORKERS, None, "sum")
    cdc = run_streaming(plan_cdc.world_size, [MODEL, "--weights", str(ensure_weights(model, plan_cdc, root, seed)),
                                              "--inject", crash, "--repeat", str(requests), *base], timeout, hostfile)
    problems += _checked(cdc, f"trial {trial} CDC+1")
    if cdc["_returncode"] != 0:
        problems.append(f"trial {trial} CDC+1: exit code {cdc['_returncode']}")
    if RANK not in cdc["dead_ranks"]:
        problems.append(f"trial {trial} CDC+1: rank {RANK} was not reported dead ({cdc['dead_ranks']})")
    for r in cdc["requests"]:
        rows.append({"trial": trial, "system": "CDC+1", "request": r["request"], "ok": int(r["ok"]),
                     "latency_ms": round(r["latency_ms"], 2), "ranks": plan_cdc.world_size,
                     "decoded_layers": sum(1 for rec in r["layers"] if rec["decoded_blocks"]),
                     "check_rel_err": r["check_rel_err"]})

    plan_a = make_plan(model, WORKERS, None, "none")
    job_a = run_streaming(plan_a.world_size, [MODEL, "--weights", str(ensure_weights(model, plan_a, root, seed)),
                                              "--inject", crash, "--repeat", str(requests), *base], timeout, hostfile)
    problems += _checked(job_a, f"trial {trial} restart (first job)", expect_failed=(kill_at,))
    failed = next((r for r in job_a["requests"] if r["request"] == kill_at), None)
    if failed is None or failed["ok"] or len(job_a["requests"]) != kill_at + 1:
        problems.append(f"trial {trial}: the uncoded job should serve {kill_at} requests and fail request {kill_at}")
    if job_a["_returncode"] != 4:
        problems.append(f"trial {trial}: the uncoded job exited {job_a['_returncode']}, expected 4 (ranks lost)")
    detect_s = failed["latency_ms"] / 1e3 if failed else float("nan")
    teardown_s = job_a["_t_end"] - _line_time(job_a, f"request {kill_at}:")

    plan_b = make_plan(model, WORKERS - 1, None, "none")
    job_b = run_streaming(plan_b.world_size, [MODEL, "--weights", str(ensure_weights(model, plan_b, root, seed)),
                                              "--repeat", str(requests - kill_at), *base], timeout, hostfile)
    problems += _checked(job_b, f"trial {trial} restart (new job)")
    if job_b["_returncode"] != 0:
        problems.append(f"trial {trial} restart (new job): exit code {job_b['_returncode']}")
    relaunch_s = _line_time(job_b, "mpicdc:") - job_b["_t_start"]
    recompute_s = job_b["requests"][0]["latency_ms"] / 1e3
    for r in job_a["requests"][:kill_at]:
        rows.append({"trial": trial, "system": "restart", "request": r["request"], "ok": 1,
                     "latency_ms": round(r["latency_ms"], 2), "ranks": plan_a.world_size, "decoded_layers": 0,
                     "check_rel_err": r["check_rel_err"]})
    total = detect_s + teardown_s + relaunch_s + recompute_s
    rows.append({"trial": trial, "system": "restart", "request": kill_at, "ok": 1, "latency_ms": round(1e3 * total, 2),
                 "ranks": f"{plan_a.world_size}->{plan_b.world_size}", "decoded_layers": 0,
                 "check_rel_err": job_b["requests"][0]["check_rel_err"]})
    for r in job_b["requests"][1:]:
        rows.append({"trial": trial, "system": "restart", "request": kill_at + r["request"], "ok": int(r["ok"]),
                     "latency_ms": round(r["latency_ms"], 2), "ranks": plan_b.world_size, "decoded_layers": 0,
                     "check_rel_err": r["check_rel_err"]})
    sup = run_streaming(plan_a.world_size, ["--supervise", "--plan", str(ensure_weights(model, plan_b, root, seed)),
                                            MODEL, "--weights", str(ensure_weights(model, plan_a, root, seed)),
                                            "--inject", crash, "--repeat", str(requests), *base], timeout, hostfile)
    if sup["_returncode"] != 0 or sup["summary"]["ok"] != requests:
        problems.append(f"trial {trial} supervised: exit code {sup['_returncode']}, "
                        f"{sup['summary']['ok']}/{requests} answered")
    late = sup["summary"]["late_s"]
    sup_k = late.get(str(kill_at), float("nan"))
    for r in sup["requests"]:
        rows.append({"trial": trial, "system": "supervised", "request": r["request"], "ok": int(r["ok"]),
                     "latency_ms": round(1e3 * sup_k if r["request"] == kill_at else r["latency_ms"], 2),
                     "ranks": f"{plan_a.world_size}->{plan_b.world_size}" if r["request"] == kill_at else "",
                     "decoded_layers": 0, "check_rel_err": r["check_rel_err"]})
        if r["check_rel_err"] is None or r["check_rel_err"] > 1e-4:
            problems.append(f"trial {trial} supervised: request {r['request']} off the reference")
    recovery = (sup["summary"]["recoveries"] or [{}])[0]
    warm = 1 if kill_at >= 2 else 0  # request 0 pays one-time warm-up costs
    before = [r["latency_ms"] for r in cdc["requests"][warm:kill_at]]
    cdc_k = cdc["requests"][kill_at]["latency_ms"]
    parts = {"trial": trial, "cdc_before_ms": round(float(np.median(before)), 2), "cdc_kill_request_ms": round(cdc_k, 2),
             "cdc_extra_ms": round(cdc_k - float(np.median(before)), 2),
             "restart_before_ms": round(float(np.median([r["latency_ms"] for r in job_a["requests"][warm:kill_at]])), 2),
             "detect_ms": round(1e3 * detect_s, 2), "teardown_ms": round(1e3 * teardown_s, 2),
             "relaunch_reload_ms": round(1e3 * relaunch_s, 2), "recompute_ms": round(1e3 * recompute_s, 2),
             "restart_total_ms": round(1e3 * total, 2), "reshard_ms": round(1e3 * reshard_s, 2),
             "supervised_late_ms": round(1e3 * sup_k, 2),
             "supervised_ready_ms": round(1e3 * (recovery.get("ready_s") or float("nan")), 2),
             "supervised_first_answer_ms": round(1e3 * (recovery.get("first_answer_s") or float("nan")), 2)}
    return rows, parts, problems


def time_reshard(model_name: str, seed: int) -> float:
    """Seconds to cut fresh shards for the smaller world (3 data workers), into a throw-away folder."""
    from mpicdc import store
    from mpicdc.core.models import get_model
    from mpicdc.core.plan import make_plan

    model = get_model(model_name)
    plan = make_plan(model, WORKERS - 1, None, "none")
    with tempfile.TemporaryDirectory(prefix="mpicdc-reshard-") as tmp:
        t0 = time.perf_counter()
        store.ensure_prepared(model, plan, tmp, seed)
        return time.perf_counter() - t0


def plot(path, rows: list, parts: list, kill_at: int, title: str) -> None:
    plt = common.pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    first = [r for r in rows if r["trial"] == 0]
    for system, color, marker in (("restart", "tab:red", "s"), ("CDC+1", "tab:blue", "o")):
        pts = sorted((r["request"], r["latency_ms"]) for r in first if r["system"] == system)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=system)
    ax.axvline(kill_at, color="k", ls="--", lw=1)
    ax.annotate(f"SIGKILL rank {RANK}\n(request {kill_at}, {LAYER})", (kill_at, ax.get_ylim()[1]),
                xytext=(6, -30), textcoords="offset points", fontsize=8)
    ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("request")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title("latency per request around the kill (trial 0)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left")
    keys = (("detect_ms", "detect + failed partial work", "tab:orange"), ("teardown_ms", "teardown", "tab:brown"),
            ("relaunch_reload_ms", "relaunch + reload shards", "tab:red"), ("recompute_ms", "recompute", "tab:pink"))
    mean = {k: float(np.mean([p[k] for p in parts])) for k, _, _ in keys}
    bottom = 0.0
    for k, name, color in keys:
        ax2.bar(0, mean[k] / 1e3, bottom=bottom, color=color, label=name)
        bottom += mean[k] / 1e3
    reshard = float(np.mean([p["reshard_ms"] for p in parts])) / 1e3
    ax2.bar(0, reshard, bottom=bottom, color="none", edgecolor="tab:gray", hatch="//",
            label="reshard (if not prepared in advance)")
    cdc = float(np.mean([p["cdc_kill_request_ms"] for p in parts])) / 1e3
    ax2.bar(1, cdc, color="tab:blue", label="CDC+1: the killed request")
    ax2.annotate(f"{bottom:.2f} s (+{reshard:.2f} s reshard)", (0, bottom + reshard), ha="center", va="bottom",
                 fontsize=8)
    ax2.annotate(f"{cdc:.2f} s", (1, cdc), ha="center", va="bottom", fontsize=8)
    ax2.set_xticks([0, 1], ["restart", "CDC+1"])
    ax2.set_ylabel("latency of the killed request (s)")
    ax2.set_title(f"killed request, mean of {len(parts)} trial(s)")
    ax2.legend(fontsize=7, loc="upper right")
    common.save_figure(fig, path, title)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--cluster" in argv:  # per fault kind on a network-namespace cluster: its own module and options
        from mpicdc.experiments import cluster_recovery
        return cluster_recovery.main([a for a in argv if a != "--cluster"])
    p = common.parser("recovery", "Recovery latency under a real SIGKILL: CDC (decode around the dead rank) "
                                  "against restart-based recovery (detect, relaunch without it, redo the request).")
    add_common_options(p)
    p.add_argument("--requests", type=int, default=None, help="requests per trial (default 12, quick 5)")
    p.add_argument("--kill-at", type=int, default=None, help="request in which rank 2 is killed (default 5, quick 2)")
    p.add_argument("--trials", type=int, default=None, help="repetitions (default 3, quick 1)")
    p.add_argument("--device", default=DEVICE, help=f"device the workers emulate (default {DEVICE})")
    p.add_argument("--cluster", action="store_true",
                   help="instead: recovery per fault kind on a cluster of network namespaces (root; see "
                        "python -m mpicdc.experiments.cluster_recovery --help for its options)")
    args = p.parse_args(argv)
    requests = args.requests or (5 if args.quick else 12)
    kill_at = args.kill_at if args.kill_at is not None else (2 if args.quick else 5)
    trials = args.trials or (1 if args.quick else 3)
    if not 1 <= kill_at < requests:
        p.error(f"--kill-at must be in 1..{requests - 1}")
    folder = common.out_dir(args.out)
    started = time.perf_counter()
    root = weights_root(args)
    reshard_s = time_reshard(MODEL, args.seed)
    rows, parts, problems = [], [], []
    for trial in range(trials):
        print(f"recovery: trial {trial + 1}/{trials}: CDC+1, then restart-based, then supervised ...", flush=True)
        r, pt, pr = one_trial(trial, requests=requests, kill_at=kill_at, device=args.device, seed=args.seed,
                              root=root, hostfile=args.hostfile, reshard_s=reshard_s)
        rows += r
        parts.append(pt)
        problems += pr
    common.write_csv(folder / "requests.csv", rows)
    common.write_csv(folder / "recovery.csv", parts)
    plot(folder / "recovery.png", rows, parts, kill_at,
         f"AlexNet on emulated {args.device} workers, no stragglers, SIGKILL of rank {RANK} in request {kill_at} "
         f"at {LAYER}: CDC+1 (6 ranks) vs restart (5 ranks, then 4)")

    def m(key):
        return float(np.mean([p[key] for p in parts]))

    spread = (f" (range over {trials} trials {min(p['restart_total_ms'] for p in parts) / 1e3:.2f}-"
              f"{max(p['restart_total_ms'] for p in parts) / 1e3:.2f} s)") if trials > 1 else ""
    text = (f"Recovery: AlexNet on {WORKERS} emulated {args.device} workers, rank {RANK} SIGKILLed in request "
            f"{kill_at} at {LAYER}, {trials} trial(s) of {requests} requests. CDC+1 served the killed request in "
            f"{m('cdc_kill_request_ms'):.0f} ms against {m('cdc_before_ms'):.0f} ms before the kill (recovery latency "
            f"{m('cdc_extra_ms'):+.0f} ms: it decodes around the dead rank, same job, no retry). Restart-based recovery "
            f"took {m('restart_total_ms') / 1e3:.2f} s for that request{spread}: detect {m('detect_ms'):.0f} ms "
            f"(work before the crash plus the ULFM notification), teardown {m('teardown_ms'):.0f} ms, relaunch + "
            f"reload {m('relaunch_reload_ms'):.0f} ms, recompute {m('recompute_ms'):.0f} ms on 3 workers; "
            f"{m('restart_total_ms') / m('cdc_kill_request_ms'):.1f}x the CDC latency, plus {m('reshard_ms') / 1e3:.1f} s "
            f"to re-cut the shards if they were not prepared in advance. The supervisor (launch --supervise, "
            f"the same restart automated) answered that request {m('supervised_late_ms') / 1e3:.2f} s after its "
            f"first submission; its relaunched job was ready {m('supervised_ready_ms') / 1e3:.2f} s and answered "
            f"{m('supervised_first_answer_ms') / 1e3:.2f} s after the failed job ended. Every served output matched the serial "
            f"reference. Run time {time.perf_counter() - started:.0f} s.")
    return common.finish(text, folder, problems)


if __name__ == "__main__":
    raise SystemExit(main())
