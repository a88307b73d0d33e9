"""``python -m mpicdc.bench runtime``: coded against uncoded MPI inference, and recovery after a SIGKILL.

Runs real MPI jobs through ``mpicdc.runtime.launch`` (fault tolerant, one BLAS thread
per rank) and prints, from the jobs' own per-request timings:

* fault-free latency of uncoded runs (n and n+1 workers) and of sum-parity
  CDC (n workers + 1 parity): median, mean, p95, and the ratio to uncoded;
* recovery: the latency of the request during which a worker is SIGKILLed,
  against the median fault-free request of the same job (target <= 1.2x);
* the share of request time spent decoding (target <= 2%).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from mpicdc.core.models import get_model
from mpicdc.experiments.common import run_mpi_job
from mpicdc.store import prepare_zoo


def _latencies(result: dict, skip: int = 1) -> np.ndarray:
    """Per-request latency in ms of successful requests, without the first ``skip`` warm-up ones."""
    return np.array([r["latency_ms"] for r in result["requests"][skip:] if r["ok"]])


def _decode_share(result: dict, skip: int = 1) -> float:
    shares = [sum(layer["decode_ms"] for layer in r["layers"]) / r["latency_ms"]
              for r in result["requests"][skip:] if r["ok"]]
    return float(np.median(shares))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpicdc.bench runtime", description=__doc__,
                                epilog="examples:\n"
                                       "  python -m mpicdc.bench runtime                  # AlexNet, 4 workers\n"
                                       "  python -m mpicdc.bench runtime --model tiny --requests 6   # seconds\n"
                                       "  python -m mpicdc.bench runtime --model vgg16 --kill-layer conv4_1",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="alexnet", help="zoo model (default alexnet; vgg16 takes minutes)")
    p.add_argument("--workers", type=int, default=4, help="data workers n (default 4)")
    p.add_argument("--requests", type=int, default=12, help="requests per job (default 12)")
    p.add_argument("--kill-layer", default=None, help="layer at which the worker is killed (default: middle)")
    args = p.parse_args(argv)
    model = get_model(args.model)
    layers = [layer.name for layer in model.linear_layers]
    kill_layer = args.kill_layer or layers[len(layers) // 2]
    n, k = args.workers, args.requests
    kill_request = k // 2
    with tempfile.TemporaryDirectory(prefix="mpicdc-bench-") as tmp:
        root = Path(tmp)
        print(f"preparing {args.model} shards ...", flush=True)
        dirs = {"uncoded n": prepare_zoo(root, args.model, n, 0, "none"),
                "uncoded n+1": prepare_zoo(root, args.model, n + 1, 0, "none"),
                "sum n+1": prepare_zoo(root, args.model, n, 1, "sum")}
        runs = {}
        for label, directory in dirs.items():
            ranks = 1 + n + (0 if label == "uncoded n" else 1)
            runs[label] = run_mpi_job(ranks, [args.model, "--weights", str(directory), "--repeat", str(k + 1)])
        killed = run_mpi_job(n + 2, [args.model, "--weights", str(dirs["sum n+1"]), "--repeat", str(k + 1),
                                     "--check", "--inject", f"crash:2@{kill_request + 1}:{kill_layer}"])
    base = statistics.median(_latencies(runs["uncoded n"]))
    print(f"\n{args.model}, batch 1, {n} data workers, {k} requests after one warm-up (ms):")
    print(f"{'configuration':<16}{'ranks':>6}{'median':>9}{'mean':>9}{'p95':>9}{'vs uncoded n':>14}{'decode %':>10}")
    for label, result in runs.items():
        lat = _latencies(result)
        ranks = 1 + n + (0 if label == "uncoded n" else 1)
        print(f"{label:<16}{ranks:>6}{np.median(lat):>9.1f}{lat.mean():>9.1f}{np.percentile(lat, 95):>9.1f}"
              f"{np.median(lat) / base:>13.2f}x{100 * _decode_share(result):>9.2f}%")
    reqs = killed["requests"]
    hit = reqs[kill_request + 1]
    others = [r["latency_ms"] for i, r in enumerate(reqs) if i not in (0, kill_request + 1) and r["ok"]]
    ratio = hit["latency_ms"] / statistics.median(others)
    ok = all(r["ok"] for r in reqs)
    worst = max(r["check_rel_err"] for r in reqs if r["check_rel_err"] is not None)
    print(f"\nrecovery: worker 2 SIGKILLed in request {kill_request + 1} at layer {kill_layer}")
    print(f"  request with the kill: {hit['latency_ms']:.1f} ms; median fault-free request of the same job: "
          f"{statistics.median(others):.1f} ms; ratio {ratio:.2f}x (target <= 1.2x)")
    print(f"  all {len(reqs)} requests served: {ok}; dead ranks {killed['dead_ranks']}; worst relative error vs "
          f"reference {worst:.1e}")
    print(f"  decoding share of request time with a dead worker: {100 * _decode_share(killed):.2f}% (target <= 2%)")
    return 0
