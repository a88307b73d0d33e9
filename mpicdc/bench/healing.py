"""``python -m mpicdc.bench healing``: time from a worker's loss to full tolerance with a spare rank.

Per model, one real MPI job (through ``mpicdc.runtime.launch``): 4 data workers + 1 sum-parity
worker + 1 spare (``--spares 1``), ``--check``; worker 2 is SIGKILLed in request ``--kill-at``,
the spare takes its place, and worker 3 is SIGKILLed in the last requests -- a second loss that
sum parity survives only because the spare restored the tolerance.  Printed, from the job's own
records (``healing`` and ``requests`` of its JSON):

* loss -> full tolerance: from the master first seeing the loss (checked before every layer) to
  the spare's ``READY`` (its shard loaded), and the spare's load time alone;
* latency of the request in which the worker dies (it also waits for the loss to be detected),
  and the median and largest of the other requests served during the takeover (loss to ready),
  against the median of the job's requests outside it;
* requests failed (target 0) and the worst error against the serial reference.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from mpicdc.experiments.common import run_mpi_job
from mpicdc.store import prepare_zoo

N, R = 4, 1


def measure(model: str, root: Path, requests: int, kill_at: int, timeout: float) -> dict:
    """One job of ``model`` with a spare and two losses; the numbers :func:`main` prints."""
    shards = prepare_zoo(root, model, N, R, "sum")
    second = requests - 2
    result = run_mpi_job(N + R + 2, [model, "--weights", str(shards), "--spares", "1", "--repeat", str(requests),
                                     "--check", "--inject", f"crash:2@{kill_at}", "--inject", f"crash:3@{second}"],
                         timeout=timeout)
    reqs = result["requests"]
    healed = [t for t in result["healing"] if t["outcome"] == "healed"]
    row = {"model": model, "failed": sum(not r["ok"] for r in reqs), "requests": len(reqs),
           "worst_err": max((r["check_rel_err"] or 0.0) for r in reqs if r["ok"]), "healed": bool(healed)}
    if not healed:
        return row
    t = healed[0]
    window = range(t["lost_request"], t["healed_request"] + 1)
    others = [r["latency_ms"] for r in reqs[1:] if r["ok"] and r["request"] not in window
              and r["request"] != second]  # request 0 warms up; the second loss's request is its own case
    during = [reqs[i]["latency_ms"] for i in window[1:] if reqs[i]["ok"]]
    row.update(seconds=t["seconds"], load_seconds=t["load_seconds"], window=f"{window[0]}-{window[-1]}",
               loss_ms=reqs[window[0]]["latency_ms"], during_max_ms=max(during, default=float("nan")),
               during_median_ms=statistics.median(during) if during else float("nan"),
               median_ms=statistics.median(others),
               second_ok=reqs[second]["ok"] and healed[0]["healed_request"] < second)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpicdc.bench healing", description=__doc__,
                                epilog="examples:\n"
                                       "  python -m mpicdc.bench healing                      # tiny and alexnet\n"
                                       "  python -m mpicdc.bench healing --models vgg16 --requests 12\n"
                                       "  python -m mpicdc.bench healing --weights-root weights  # keep the shards",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "alexnet"], help="zoo models (default tiny alexnet)")
    p.add_argument("--requests", type=int, default=20, help="requests per job (default 20)")
    p.add_argument("--kill-at", type=int, default=3, help="request in which worker 2 is killed (default 3)")
    p.add_argument("--weights-root", default=None,
                   help="where to prepare (or find) the shards (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one job may take (default 1800)")
    args = p.parse_args(argv)
    if not 1 <= args.kill_at < args.requests - 4:
        p.error(f"--kill-at must be between 1 and --requests - 5 ({args.requests - 5})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpicdc-bench-") as tmp:
        root = Path(args.weights_root or tmp)
        for model in args.models:
            print(f"{model}: preparing shards and running {args.requests} requests ...", flush=True)
            rows.append(measure(model, root, args.requests, args.kill_at, args.timeout))
    print(f"\nhealing: {N} data + {R} sum-parity workers + 1 spare; worker 2 killed in request {args.kill_at}, "
          f"worker 3 in request {args.requests - 2}")
    print(f"{'model':<9}{'loss->full s':>13}{'load s':>8}{'takeover reqs':>14}{'loss req ms':>12}"
          f"{'during p50/max ms':>18}{'median ms':>10}{'p50 ratio':>10}{'2nd loss ok':>12}{'failed':>8}"
          f"{'worst err':>10}")
    for row in rows:
        if not row["healed"]:
            print(f"{row['model']:<9}  NOT HEALED; failed {row['failed']}/{row['requests']}")
            continue
        print(f"{row['model']:<9}{row['seconds']:>13.3f}{row['load_seconds']:>8.3f}{row['window']:>14}"
              f"{row['loss_ms']:>12.1f}{row['during_median_ms']:>10.1f}/{row['during_max_ms']:<7.1f}"
              f"{row['median_ms']:>10.1f}{row['during_median_ms'] / row['median_ms']:>9.2f}x{str(row['second_ok']):>12}"
              f"{row['failed']:>8}{row['worst_err']:>10.1e}")
    return 0 if all(r["healed"] and r["failed"] == 0 for r in rows) else 1
