"""``python -m mpicdc.run MODEL``: distributed, coded inference under ``mpirun``.

Every rank runs this module.  Rank 0 (the master) serves ``--repeat`` requests
and prints the result; the other ranks are workers.  See ``--help``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

EPILOG = """\
examples:
  # one machine, fault tolerant, 1 master + 4 workers + 1 sum-parity worker:
  mpirun --with-ft ulfm --oversubscribe -np 6 -hostfile hostfile python -m mpicdc.run vgg16
  # the same through the launcher, which adds the flags:
  python -m mpicdc.launch -np 6 vgg16
  # kill worker 2 with SIGKILL in request 1 at layer conv3_1, check every output:
  python -m mpicdc.launch -np 6 vgg16 --repeat 3 --inject crash:2@1:conv3_1 --check
  # stragglers: worker 1 replies after a shifted-exponential delay, 20 requests, JSON out:
  python -m mpicdc.launch -np 6 alexnet --repeat 20 --inject delay:1:shexp:0.01,0.05 --output run.json

weights: with no --weights, the shards in weights/<model>-w<N>-p<R>-<code>/ are used, where N and R
follow from the world size and --code/--parity; on one machine they are prepared (random
He-initialised weights, --seed) the first time. On a cluster, prepare them with
`python -m mpicdc.prepare` and copy manifest.h5 plus each rank's rank-NNN.h5 to that rank.

exit codes: 0 all requests served (and matched with --check); 1 a request failed or did not match;
2 bad usage or the job could not start; 4 too many ranks lost to serve any further request.
"""

# Relative tolerance of --check: float32 decoding error propagated through the network.
CHECK_RTOL = {"none": 1e-4, "replication": 1e-4, "sum": 1e-4, "groups": 1e-4, "mds": 1e-3}


def build_parser() -> argparse.ArgumentParser:
    from mpicdc.core.models import model_names

    p = argparse.ArgumentParser(
        prog="python -m mpicdc.run",
        description="Run batch-1 DNN inference over MPI ranks with coded distributed computing: "
                    "rank 0 decodes each layer from the first replies, so stragglers and crashed "
                    "workers cost nothing.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=f"zoo model ({', '.join(model_names())}), or the name of the model "
                                 "prepared in --weights DIR")
    p.add_argument("--weights", metavar="DIR", help="prepared shard directory (default: see below)")
    p.add_argument("--code", default="sum", help="code for a default directory: none, replication, sum, "
                                                 "groups:G, mds (default: sum)")
    p.add_argument("--parity", type=int, default=None, metavar="R",
                   help="parity workers for mds/replication codes")
    p.add_argument("--no-prepare", action="store_true",
                   help="fail instead of preparing a missing default weight directory")
    p.add_argument("--repeat", type=int, default=1, metavar="K", help="number of requests (default 1)")
    p.add_argument("--input", metavar="FILE", help=".npy array or image file (default: a deterministic "
                                                    "random input)")
    p.add_argument("--output", metavar="FILE", help="write results to FILE.json or FILE.h5")
    p.add_argument("--inject", action="append", default=[], metavar="SPEC",
                   help="fault injection, repeatable: delay:RANKS:MODEL, crash:RANK@REQ[:LAYER], "
                        "hang:RANK@REQ[:LAYER], exit:RANK@REQ[:LAYER][=CODE]")
    p.add_argument("--device", metavar="NAME", help="emulate a device's compute speed on workers (e.g. rpi3)")
    p.add_argument("--check", action="store_true",
                   help="compare every output with the serial fault-free reference forward")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes to print (default 5)")
    p.add_argument("--layer-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a layer may wait for a decodable set of replies (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights, input and delays")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.add_argument("--help-inject", action="store_true", help="explain the --inject and delay grammar and exit")
    return p


def load_input(model, path: str | None, seed: int) -> np.ndarray:
    """The request input: a .npy array, an image resized to the model's input, or the default input."""
    from mpicdc.core.kernels import check_input, default_input

    if path is None:
        return default_input(model, seed)
    file = Path(path)
    if not file.exists():
        raise ValueError(f"--input {path}: no such file")
    if file.suffix == ".npy":
        return check_input(model, np.load(file, allow_pickle=False))
    try:
        import matplotlib.image as mpimg
    except ImportError:
        raise ValueError(f"--input {path}: reading images needs matplotlib (pip install 'mpicdc[plot]'); "
                         "or pass a .npy array") from None
    img = np.asarray(mpimg.imread(file), dtype=np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    img = img[..., :3] if img.ndim == 3 else img[..., None]
    want = model.input_shape
    if len(want) != 3:
        raise ValueError(f"--input {path}: model {model.name!r} takes a {want} clip, not an image; pass a .npy")
    from scipy.ndimage import zoom
    chw = np.moveaxis(img, -1, 0)
    if chw.shape[0] != want[0]:
        chw = np.repeat(chw.mean(axis=0, keepdims=True), want[0], axis=0)
    factors = (1, want[1] / chw.shape[1], want[2] / chw.shape[2])
    return check_input(model, zoom(chw, factors, order=1)[:, :want[1], :want[2]])


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def _summary(results) -> dict:
    lat = np.array([r.latency_s for r in results if r.ok]) * 1e3
    stats = {"requests": len(results), "ok": int(sum(r.ok for r in results))}
    if lat.size:
        stats.update(mean_ms=float(lat.mean()), p50_ms=float(np.percentile(lat, 50)),
                     p95_ms=float(np.percentile(lat, 95)), p99_ms=float(np.percentile(lat, 99)))
    layers: dict = {}
    for r in results:
        for rec in r.layers:
            entry = layers.setdefault(rec.layer, {"compute_ms": [], "wait_ms": [], "decode_ms": [], "decoded": 0})
            entry["compute_ms"].append(rec.compute_s * 1e3)
            entry["wait_ms"].append(rec.wait_s * 1e3)
            entry["decode_ms"].append(rec.decode_s * 1e3)
            entry["decoded"] += len(rec.decoded_blocks)
    stats["layers"] = {k: {m: (float(np.median(v)) if isinstance(v, list) else v) for m, v in e.items()}
                       for k, e in layers.items()}
    return stats


def write_output(path: str, args, session, results, checks, summary) -> None:
    """Results as JSON (everything) or HDF5 (arrays + JSON attributes)."""
    coord = session.coordinator
    doc = {
        "model": session.model.name, "plan": json.loads(session.plan.to_json()),
        "args": {k: v for k, v in vars(args).items()}, "summary": summary,
        "dead_ranks": sorted(session.dead), "silent_ranks": sorted(session.silent),
        "requests": [{"request": r.request, "ok": r.ok, "error": r.error, "latency_ms": r.latency_s * 1e3,
                      "top_k": r.top_k(args.top_k), "check_rel_err": checks.get(r.request),
                      "layers": [rec.to_dict() for rec in r.layers]} for r in results],
        "arrivals": [a.__dict__ for a in coord.arrivals],
    }
    if path.endswith((".h5", ".hdf5")):
        import h5py
        with h5py.File(path, "w") as f:
            f["latency_ms"] = np.array([r.latency_s * 1e3 for r in results])
            f["ok"] = np.array([r.ok for r in results])
            outs = [r.output.reshape(-1) for r in results if r.output is not None]
            if outs:
                f["outputs"] = np.stack(outs)
            f["arrival_s"] = np.array([a.seconds for a in coord.arrivals])
            f["arrival_rank"] = np.array([a.rank for a in coord.arrivals])
            f["arrival_late"] = np.array([a.late for a in coord.arrivals])
            f.attrs["results_json"] = json.dumps(doc)
    else:
        Path(path).write_text(json.dumps(doc, indent=1))


def _print_request(r, check, top_k) -> None:
    status = "ok" if r.ok else "FAILED"
    decoded = [f"{rec.layer}<-{rec.decoded_blocks}" for rec in r.layers if rec.decoded_blocks]
    failed = sorted({x for rec in r.layers for x in rec.failed})
    line = f"request {r.request}: {status} {r.latency_s * 1e3:.1f} ms"
    if r.ok:
        line += "  top-%d: " % top_k + ", ".join(f"{c} ({p:.4f})" for c, p in r.top_k(top_k))
    if decoded:
        line += f"\n  decoded around missing blocks: {', '.join(decoded)}"
    if failed:
        line += f"\n  ranks failed during this request: {failed}"
    if check is not None:
        line += f"\n  check: max relative error vs fault-free serial reference {check:.2e}"
    if r.error:
        line += f"\n  error: {r.error}"
    print(line, flush=True)


def master_main(args, session) -> int:
    """Rank 0: run the requests, print and write the results; returns the exit code."""
    from mpicdc.core.kernels import forward
    from mpicdc.store import reference_weights

    model = session.model
    x = load_input(model, args.input, args.seed)
    print(f"mpicdc: {model.name} on {session.plan.world_size} ranks: {session.plan.workers} workers + "
          f"{session.plan.parity} parity ({session.plan.code}), {len(session.plan.layers)} distributed "
          f"layers; fault tolerance {'on (ULFM)' if session.ulfm else 'OFF'}", flush=True)
    reference = None
    if args.check:
        reference = forward(model, reference_weights(session.manifest), x)
    kind = session.plan.code.partition(":")[0]
    rtol = CHECK_RTOL.get(kind, CHECK_RTOL["mds"])
    results, checks, exit_code = [], {}, 0
    for _ in range(args.repeat):
        r = session.infer(x)
        results.append(r)
        if r.ok and reference is not None:
            checks[r.request] = _rel_err(r.output, reference)
            if checks[r.request] > rtol:
                exit_code = 1
        if not r.ok:
            exit_code = 1
        if not args.quiet:
            _print_request(r, checks.get(r.request), args.top_k)
        if not r.ok and not session.coordinator.can_serve():
            print(f"mpicdc: ranks {sorted(session.dead | session.silent)} are lost; the remaining ranks cannot "
                  "serve further requests", file=sys.stderr, flush=True)
            exit_code = 4
            break
    summary = _summary(results)
    if "mean_ms" in summary:
        print(f"summary: {summary['ok']}/{summary['requests']} requests ok; latency mean "
              f"{summary['mean_ms']:.1f} ms, p50 {summary['p50_ms']:.1f}, p95 {summary['p95_ms']:.1f}, "
              f"p99 {summary['p99_ms']:.1f}")
    else:
        print(f"summary: 0/{summary['requests']} requests ok")
    modeled = [(rec.compute_s, rec.modeled_s) for r in results for rec in r.layers if rec.modeled_s > 0]
    if modeled:
        worst = max(c / m for c, m in modeled)
        note = ("fine" if worst < 0.5 else
                "WARNING: real compute is not well below the modeled time, the local cores distort the emulation")
        print(f"emulation ({args.device}): real compute reached {worst:.0%} of the modeled device time; {note}")
        summary["emulation_worst_compute_fraction"] = worst
    if session.dead or session.silent:
        print(f"lost ranks: dead {sorted(session.dead)}, silent {sorted(session.silent)}")
    if checks:
        worst = max(checks.values())
        verdict = "MATCHED" if worst <= rtol else "DID NOT MATCH"
        print(f"check: {verdict} the fault-free reference: worst max relative error {worst:.2e} "
              f"(tolerance {rtol:g}) over {len(checks)} request(s)", flush=True)
    if not args.quiet and summary["layers"]:
        print(f"{'layer':<14}{'compute ms':>11}{'wait ms':>10}{'decode ms':>11}{'decoded':>9}")
        for name, e in summary["layers"].items():
            print(f"{name:<14}{e['compute_ms']:>11.2f}{e['wait_ms']:>10.2f}{e['decode_ms']:>11.3f}"
                  f"{e['decoded']:>9d}")
    session.close()
    if args.output:
        write_output(args.output, args, session, results, checks, summary)
        print(f"results written to {args.output}")
    return exit_code


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if "--help-inject" in argv:
        from mpicdc.core.faults import INJECT_HELP
        print(INJECT_HELP)
        return 0
    args = parser.parse_args(argv)
    from mpicdc.core.models import UnknownModelError, get_model

    try:
        if not args.weights:  # with --weights the model graph comes from the manifest
            get_model(args.model)
        if args.repeat < 1 or args.top_k < 1 or not math.isfinite(args.layer_timeout) or args.layer_timeout <= 0:
            raise ValueError("--repeat and --top-k must be >= 1 and --layer-timeout > 0")
        if args.inject:
            from mpicdc.core.faults import parse_injections
            parse_injections(args.inject)
    except (UnknownModelError, ValueError) as exc:
        parser.error(str(exc))
    from mpicdc.runtime.mpienv import import_mpi
    from mpicdc.runtime.session import RunConfig, StartupError, end_process, serve

    MPI = import_mpi()
    rank = MPI.COMM_WORLD.Get_rank()
    _setup_logging(rank)
    config = RunConfig(args.model, weights=args.weights, code=args.code, parity=args.parity,
                       prepare_missing=not args.no_prepare, injections=tuple(args.inject),
                       device=args.device, layer_timeout_s=args.layer_timeout, seed=args.seed)
    from mpicdc.runtime.mpienv import ulfm_enabled
    ulfm = ulfm_enabled(MPI)
    try:
        session = serve(config)
    except StartupError as exc:
        if rank == 0:
            print(f"mpicdc: cannot start: {exc}", file=sys.stderr, flush=True)
        end_process(2, ulfm=ulfm)
        return 2
    if session is None:  # a worker whose loop ended; serve() already ended the process
        return 0
    try:
        code = master_main(args, session)
    except ValueError as exc:  # bad input found on the master: stop the workers, then report
        session.close()
        print(f"mpicdc: {exc}", file=sys.stderr, flush=True)
        code = 2
    end_process(code, ulfm=ulfm, hung=bool(session.unacknowledged))
    return code


if __name__ == "__main__":
    sys.exit(main())
