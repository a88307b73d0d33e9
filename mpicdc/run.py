"""``python -m mpicdc.run MODEL``: distributed, coded inference under ``mpirun``.

Every rank runs this module.  Rank 0 (the master) serves ``--repeat`` requests
and prints the result; the other ranks are workers.  See ``--help``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("mpicdc.run")

#: ``--layer-timeout`` when not given (and no slower ``--link`` asks for more)
LAYER_TIMEOUT_S = 30.0

EPILOG = """\
examples:
  # the design card's line, in the venv `make venv` built (its Open MPI turns ULFM on and binds no
  # cores; the hostfile has 6 slots; as root `. .venv/bin/activate` first, or add --allow-run-as-root):
  # 1 master + 4 workers + 1 sum-parity worker
  mpirun -hostfile hostfile python -m mpicdc.run vgg16
  # with any other Open MPI 5, say it on the command line:
  mpirun --with-ft ulfm --bind-to none -np 6 -hostfile hostfile python -m mpicdc.run vgg16
  # the same through the launcher, which adds the flags:
  python -m mpicdc.launch -np 6 vgg16
  # kill worker 2 with SIGKILL in request 1 at layer conv3_1, check every output:
  python -m mpicdc.launch -np 6 vgg16 --repeat 3 --inject crash:2@1:conv3_1 --check
  # one spare rank (7 = 6 + 1): when worker 2 dies the spare takes its place, so worker 3's death costs nothing:
  python -m mpicdc.launch -np 7 tiny --spares 1 --repeat 40 --inject crash:2@1 --inject crash:3@30 --check
  # stragglers: worker 1 replies after a shifted-exponential delay, 20 requests, JSON out:
  python -m mpicdc.launch -np 6 alexnet --repeat 20 --inject delay:1:shexp:0.01,0.05 --output run.json
  # half the bytes on the wire: activations and replies as float16 (decoding stays float32):
  python -m mpicdc.launch -np 6 alexnet --wire float16 --check
  # the one-device baseline: the same model served by one rank, every layer on the master:
  python -m mpicdc.launch -np 1 alexnet --workers 0 --repeat 5

weights: with no --weights, the shards in weights/<model>-w<N>-p<R>-<code>/ are used, where N and R
follow from the world size and --code/--parity; on one machine they are prepared (random
He-initialised weights, --seed) the first time. On a cluster, prepare them with
`python -m mpicdc.prepare` and copy manifest.h5 plus each rank's rank-NNN.h5 to that rank.

exit codes: 0 all requests served (and matched with --check); 1 a request failed or did not match;
2 bad usage or the job could not start; 4 too many ranks lost to serve any further request.
"""

# Relative tolerance of --check: float32 decoding error propagated through the network.
CHECK_RTOL = {"none": 1e-4, "replication": 1e-4, "sum": 1e-4, "groups": 1e-4, "mds": 1e-3}
WIRE_CHOICES = ("float32", "float16", "bfloat16")


def _floats(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be finite")
    return values


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
    p.add_argument("--code", default="sum", help="code for a default directory: sum, none, replication, "
                                                 "groups:G, mds (default: sum, as prepare and sim)")
    p.add_argument("--parity", type=int, default=None, metavar="R",
                   help="parity workers for mds/replication codes")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="data workers (default: the world size less the master and the code's parity workers); "
                        "0 serves the model on one rank with every layer on the master, the one-device "
                        "baseline (launch with -np 1)")
    p.add_argument("--wire", choices=WIRE_CHOICES, default="float32",
                   help="format of the activations sent to workers and of their replies: float32 (default), "
                        "float16 or bfloat16 (half the bytes; every rank computes and decodes in float32; "
                        "--check then allows the format's rounding, see docs/running.md)")
    p.add_argument("--no-prepare", action="store_true",
                   help="fail instead of preparing a missing default weight directory")
    p.add_argument("--repeat", type=int, default=1, metavar="K", help="number of requests, ids 0..K-1 (default 1)")
    p.add_argument("--request-ids", metavar="IDS", help="serve only these request ids, in this order, e.g. "
                                                      "3,7-9 (a replay keeps the ids; default 0..K-1)")
    p.add_argument("--skip-answered", metavar="JOURNAL", help="drop the ids this --journal file holds as answered")
    p.add_argument("--journal", metavar="FILE", help="append one JSON line per answered request (id, time, ok, "
                                                     "top-k, output), fsynced, for a process watching the run; "
                                                     "see docs/running.md")
    p.add_argument("--input", metavar="FILE", help=".npy array or image file (default: a deterministic "
                                                    "random input)")
    p.add_argument("--pixels", choices=("unit", "byte"), default="unit",
                   help="an image --input's pixel scale: unit = 0-1 (default), byte = 0-255 (Caffe-style models)")
    p.add_argument("--mean", type=_floats, default=(), metavar="M[,M,M]",
                   help="subtract this per-channel mean from an image --input (after --pixels), e.g. "
                        "0.485,0.456,0.406")
    p.add_argument("--std", type=_floats, default=(), metavar="S[,S,S]",
                   help="divide an image --input by this per-channel std (after --mean), e.g. 0.229,0.224,0.225")
    p.add_argument("--output", metavar="FILE", help="write results to FILE.json or FILE.h5")
    p.add_argument("--inject", action="append", default=[], metavar="SPEC",
                   help="fault injection, repeatable: delay:RANKS:MODEL, crash:RANK@REQ[:LAYER], "
                        "hang:RANK@REQ[:LAYER], exit:RANK@REQ[:LAYER][=CODE]")
    p.add_argument("--device", metavar="NAME", help="emulate a device's compute speed on workers (e.g. rpi3)")
    p.add_argument("--master-device", metavar="NAME",
                   help="also emulate a device on the master: every layer it runs takes that device's modeled "
                        "time (default: this machine's speed); with --workers 0, the one-device baseline on a Pi")
    p.add_argument("--check", action="store_true",
                   help="compare every output with the serial fault-free reference forward")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes to print (default 5)")
    p.add_argument("--layer-timeout", type=float, default=None, metavar="S",
                   help=f"seconds a layer may wait for a decodable set of replies (default {LAYER_TIMEOUT_S:g}; "
                        "with --link, at least the detector's scaled timeout)")
    p.add_argument("--startup-timeout", type=float, default=60.0, metavar="S",
                   help="seconds any start-up step (MPI start, a rank loading its shard and reporting) may "
                        "take before the job ends naming the ranks it waited for (default 60)")
    p.add_argument("--integrity", choices=("off", "opportunistic", "strict"), default="opportunistic",
                   help="check replies against the code: opportunistic (default) checks spare replies at no "
                        "wait; strict waits for enough replies to check every layer (and under MDS r >= 2 "
                        "corrects one wrong block); a rank located sending wrong values is quarantined")
    p.add_argument("--spares", type=int, default=0, metavar="K",
                   help="K idle ranks started after the plan's ranks (launch plan ranks + K): when a rank is "
                        "lost (dead, silent or quarantined) a spare loads its shard and takes its place, "
                        "restoring the code's tolerance; requests meanwhile are decoded as usual (default 0)")
    p.add_argument("--link", metavar="RATE",
                   help="the slowest link's rate (e.g. 20mbit): scales the failure detector's timeout to the time "
                        "the plan's largest transfers take on it, so heartbeats queued behind data raise no false "
                        "alarm (default: 0.25 s heartbeats, 2 s timeout; docs/cluster.md)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights, input and delays")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.add_argument("--help-inject", action="store_true", help="explain the --inject and delay grammar and exit")
    return p


def load_input(model, path: str | None, seed: int, prep: ImagePrep | None = None) -> np.ndarray:
    """The request input: a .npy array, an image resized to the model's input, or the default input.

    Raises ``ValueError`` saying what is wrong with the file (missing, a folder, not a .npy or
    image, wrong shape, non-finite values) before any large allocation.
    """
    from mpicdc.core.kernels import check_input, default_input

    if path is None:
        return default_input(model, seed)
    file = Path(path)
    if not file.exists():
        raise ValueError(f"--input {path}: no such file")
    if file.is_dir():
        raise ValueError(f"--input {path}: is a folder; pass a .npy array or an image file")
    if file.suffix == ".npy":
        return check_input(model, _read_npy(file, model))
    return check_input(model, _read_image(file, model, prep or ImagePrep()))


def _read_npy(file: Path, model) -> np.ndarray:
    """A .npy array, its header checked against the model's input before the data is read."""
    want = tuple(model.input_shape)
    try:
        with open(file, "rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"--input {file}: not a readable .npy file ({exc})") from None
    if tuple(shape) not in (want, (1,) + want):
        raise ValueError(f"--input {file}: array of shape {tuple(shape)}, but model {model.name!r} takes "
                         f"{want} (or {(1,) + want})")
    if dtype.hasobject:
        raise ValueError(f"--input {file}: holds Python objects, not numbers")
    try:
        return np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"--input {file}: cannot read the array ({exc})") from None


@dataclass(frozen=True)
class ImagePrep:
    """How an image file becomes a model input (``--pixels``, ``--mean``, ``--std``).

    The image is read as RGB (grey is repeated to the model's channels, RGB averaged for a
    one-channel model), resized bilinearly to the model's height and width, laid out as CHW,
    scaled to ``[0, 1]`` (``pixels="unit"``) or ``[0, 255]`` (``pixels="byte"``), then
    normalised per channel as ``(x - mean) / std`` when given.  Match what the model was
    trained on: torchvision-style models want ``unit`` with ImageNet's mean and std; Caffe and
    many Keras models want ``byte`` and a mean.
    """

    pixels: str = "unit"
    mean: tuple = ()
    std: tuple = ()

    def describe(self) -> str:
        scale = "0-1" if self.pixels == "unit" else "0-255"
        norm = (f", then (x - {list(self.mean) or 0}) / {list(self.std) or 1}" if self.mean or self.std else "")
        return f"RGB, resized bilinearly, CHW, pixels {scale}{norm}"

    def apply(self, chw: np.ndarray) -> np.ndarray:
        x = chw * 255.0 if self.pixels == "byte" else chw
        for values, op in ((self.mean, np.subtract), (self.std, np.divide)):
            if values:
                v = np.asarray(values, dtype=np.float32)
                if v.size not in (1, x.shape[0]):
                    raise ValueError(f"--mean/--std: give 1 or {x.shape[0]} values (one per channel), got {v.size}")
                x = op(x, v.reshape(-1, 1, 1))
        return x


def _read_image(file: Path, model, prep: ImagePrep) -> np.ndarray:
    """An image file as the model's CHW input, prepared as :class:`ImagePrep` says."""
    try:
        import matplotlib.image as mpimg
    except ImportError:
        raise ValueError(f"--input {file}: reading images needs matplotlib (pip install 'mpicdc[plot]'); "
                         "or pass a .npy array") from None
    want = model.input_shape
    if len(want) != 3:
        raise ValueError(f"--input {file}: model {model.name!r} takes a {want} clip, not an image; pass a .npy")
    try:
        raw = mpimg.imread(file)
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        raise ValueError(f"--input {file}: not a readable image ({type(exc).__name__}: {exc}); "
                         "pass a PNG/JPEG image or a .npy array") from None
    if raw.ndim not in (2, 3) or min(raw.shape[:2]) < 1:
        raise ValueError(f"--input {file}: an image of shape {raw.shape} cannot be a model input")
    # integer images (JPEG) hold 0-255; matplotlib reads PNG as floats in 0-1 already
    img = raw.astype(np.float32) / (255.0 if np.issubdtype(raw.dtype, np.integer) else 1.0)
    img = img[..., :3] if img.ndim == 3 else img[..., None]
    from scipy.ndimage import zoom
    chw = np.moveaxis(img, -1, 0)
    if chw.shape[0] != want[0]:
        chw = np.repeat(chw.mean(axis=0, keepdims=True), want[0], axis=0)
    factors = (1, want[1] / chw.shape[1], want[2] / chw.shape[2])
    return prep.apply(zoom(chw, factors, order=1)[:, :want[1], :want[2]])


def check_output_path(path: str) -> None:
    """Fail before the first request if ``--output`` cannot be written (the results would be lost)."""
    if not path.endswith((".json", ".h5", ".hdf5")):
        raise ValueError(f"--output {path}: name a .json or .h5 file")
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--output {path}: is a folder; name a .json or .h5 file")
    existed = out.exists()
    try:
        with open(out, "ab"):
            pass
    except OSError as exc:
        raise ValueError(f"--output {path}: cannot write there ({exc.strerror or exc})") from None
    if not existed:
        out.unlink()


def _rel_err(a, b) -> float:
    """Max relative error of ``a`` against ``b``; infinite when ``a`` has a non-finite value."""
    if not np.all(np.isfinite(a)):
        return math.inf
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
                      "output": None if r.output is None else r.output.reshape(-1).tolist(),
                      "integrity": [f.to_dict() for f in r.integrity],
                      "layers": [rec.to_dict() for rec in r.layers]} for r in results],
        "arrivals": [a.__dict__ for a in coord.arrivals],
        "healing": [t.to_dict() for t in coord.healer.takeovers] if coord.healer else [],
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


def _around(records, pick) -> str:
    """``"2 (7 layers), 4 (1 layer)"``: the ranks ``pick(record)`` names, with how many layers each."""
    counts: dict = {}
    for rec in records:
        for rank in pick(rec):
            counts[rank] = counts.get(rank, 0) + 1
    return ", ".join(f"{rank} ({n} layer{'s' if n > 1 else ''})" for rank, n in sorted(counts.items()))


def _print_request(r, check, top_k, lost: set) -> None:
    """One request's lines: status, top classes, and which ranks were decoded around and why.

    A rank known lost (dead, silent or sending bad replies) is told apart from a live rank whose
    reply simply came after the layer was already decoded (that costs nothing: it is the point).
    """
    status = "ok" if r.ok else "FAILED"
    line = f"request {r.request}: {status} {r.latency_s * 1e3:.1f} ms"
    if r.ok:
        line += "  top-%d: " % top_k + ", ".join(f"{c} ({p:.4f})" for c, p in r.top_k(top_k))
    around_lost = _around(r.layers, lambda rec: [x for x in rec.missing_ranks if x in lost or x in rec.failed])
    around_late = _around(r.layers, lambda rec: [x for x in rec.missing_ranks if x not in lost and x not in rec.failed])
    if around_lost:
        line += f"\n  decoded around lost rank(s): {around_lost}"
    if around_late:
        line += f"\n  did not wait for late rank(s): {around_late}"
    for f in r.integrity:
        who = "rank not locatable" if f.rank is None else f"rank {f.rank}"
        what = "corrected (decoded without it)" if f.corrected else \
            ("found by a late reply, output not corrected" if f.late else "output NOT corrected")
        line += (f"\n  INTEGRITY: layer {f.layer}: replies inconsistent with the code (residual {f.residual:.3g}"
                 f" > tolerance {f.tolerance:.3g}), {who}, {what}")
    if check is not None:
        line += f"\n  check: max relative error vs fault-free serial reference {check:.2e}"
    if r.error:
        line += f"\n  error: {r.error}"
    print(line, flush=True)


def _healing_line(healer) -> str:
    """``healing: rank 2 -> spare 6 in 0.12 s (requests 1-2); 0 spare(s) left``."""
    done = [f"rank {t.logical} -> spare {t.spare} in {t.seconds:.2f} s (requests {t.lost_request}-"
            f"{t.healed_request})" if t.outcome == "healed" else f"rank {t.logical} -> spare {t.spare}: {t.outcome}"
            for t in healer.takeovers]
    return f"healing: {'; '.join(done) or 'no loss'}; {len(healer.pool)} idle spare(s) left"


def master_main(args, session) -> int:
    """Rank 0: run the requests, print and write the results; returns the exit code."""
    from mpicdc.core.kernels import forward
    from mpicdc.runtime.journal import Journal, request_ids
    from mpicdc.store import reference_weights

    model = session.model
    prep = ImagePrep(args.pixels, tuple(args.mean), tuple(args.std))
    x = load_input(model, args.input, args.seed, prep)
    if args.input and not args.input.endswith(".npy"):
        print(f"input: {args.input} as {'x'.join(map(str, model.input_shape))}: {prep.describe()}", flush=True)
    if args.output:
        check_output_path(args.output)
    plan = session.plan
    if plan.world_size == 1:
        print(f"mpicdc: {model.name} on 1 rank: every layer on the master (one device)", flush=True)
    else:
        print(f"mpicdc: {model.name} on {plan.world_size} ranks: {plan.workers} workers + {plan.parity} parity "
              f"({plan.code}), {len(plan.layers)} distributed layers; fault tolerance "
              f"{'on (ULFM)' if session.ulfm else 'OFF'}" + (f"; wire {args.wire}" if args.wire != "float32" else "")
              + (f"; {args.spares} spare rank(s)" if args.spares else ""), flush=True)
    reference = None
    if args.check:
        reference = forward(model, reference_weights(session.manifest), x)
    kind = plan.code.partition(":")[0]
    rtol = CHECK_RTOL.get(kind, CHECK_RTOL["mds"])
    if args.wire != "float32":
        from mpicdc.core.wirefmt import check_tolerance
        rtol += check_tolerance(plan, args.wire)
    results, checks, exit_code = [], {}, 0
    ids = request_ids(args.repeat, args.request_ids, args.skip_answered)
    journal = Journal(args.journal)
    journal.start(session.plan.world_size, session.plan.tag, ids)
    for rid in ids:
        r = session.infer(x)
        r.request = rid  # the run's request id (the coordinator counts the requests of this job)
        if r.ok and not np.all(np.isfinite(r.output)):  # never a silent wrong answer
            r.error = f"request {r.request} produced {int(np.sum(~np.isfinite(r.output)))} non-finite output value(s)"
            r.output = None
        results.append(r)
        if r.ok and reference is not None:
            checks[r.request] = _rel_err(r.output, reference)
            if checks[r.request] > rtol:
                exit_code = 1
        if not r.ok:
            exit_code = 1
        journal.answer(rid, r, args.top_k, checks.get(rid))
        lost = session.dead | session.silent | session.coordinator.quarantined
        if not args.quiet:
            _print_request(r, checks.get(r.request), args.top_k, lost)
        if not r.ok and not session.coordinator.can_serve():
            print(f"mpicdc: ranks {sorted(lost)} are lost; the remaining ranks cannot "
                  "serve further requests", file=sys.stderr, flush=True)
            exit_code = 4
            break
    journal.end(exit_code, session.dead | session.silent | session.coordinator.quarantined)
    journal.close()
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
    flagged = [r.request for r in results if r.integrity]
    checked = [rec for r in results for rec in r.layers]
    if args.integrity != "off" and checked:
        line = (f"integrity ({args.integrity}): {sum(rec.checks > 0 for rec in checked)}/{len(checked)} layers "
                f"checked, flagged requests: {flagged or 'none'}")
        if args.integrity == "strict":
            line += f"; waiting to check cost {sum(rec.check_wait_s for rec in checked) * 1e3:.1f} ms in all"
        quarantined = sorted(session.coordinator.quarantined)
        print(line + (f"; quarantined ranks: {quarantined}" if quarantined else ""), flush=True)
        summary["integrity_flagged"] = flagged
    if session.dead or session.silent:
        print(f"lost ranks: dead {sorted(session.dead)}, silent {sorted(session.silent)}")
    if session.coordinator.healer is not None:
        print(_healing_line(session.coordinator.healer), flush=True)
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
        try:
            write_output(args.output, args, session, results, checks, summary)
            print(f"results written to {args.output}")
        except OSError as exc:  # keep the results: write them where we can
            import tempfile
            fd, rescue = tempfile.mkstemp(prefix="mpicdc-results-", suffix=".json")
            os.close(fd)
            write_output(rescue, args, session, results, checks, summary)
            print(f"mpicdc: could not write {args.output} ({exc}); results written to {rescue} instead",
                  file=sys.stderr, flush=True)
            exit_code = exit_code or 1
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
    from mpicdc.runtime.mpienv import launcher_rank, report_exit_code

    rank = launcher_rank() or 0
    try:
        args = parser.parse_args(argv)
        _check_args(args)
    except (UsageError, SystemExit) as exc:  # said once, by rank 0; every rank exits with the same code
        code = exc.code if isinstance(exc, SystemExit) else 2
        if isinstance(exc, UsageError) and rank == 0:
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
        if rank == 0:
            report_exit_code(code)
        return code
    _setup_logging(rank)
    return _run_job(args, rank)


class UsageError(ValueError):
    """Bad command-line input: printed once with the usage, exit status 2."""


def _check_args(args) -> None:
    from mpicdc.core.models import UnknownModelError, get_model

    try:
        model = None if args.weights else get_model(args.model)  # with --weights: the manifest's model
        if any(s <= 0 for s in args.std):
            raise ValueError(f"--std values must be > 0, got {list(args.std)}")
        if args.repeat < 1 or args.top_k < 1:
            raise ValueError("--repeat and --top-k must be >= 1")
        if args.spares < 0:
            raise ValueError(f"--spares must be >= 0, got {args.spares}")
        if args.workers is not None and args.workers < 0:
            raise ValueError(f"--workers must be 0 (one device) or more, got {args.workers}")
        for option, name in (("--device", args.device), ("--master-device", args.master_device)):
            if name is not None:
                from mpicdc.sim.devices import get_device
                try:
                    get_device(name)
                except ValueError as exc:
                    raise ValueError(f"{option}: {exc}") from None
        if args.workers == 0 and (args.parity or args.code not in ("sum", "none")):
            raise ValueError("--workers 0 runs every layer on the master: it takes no --code or --parity")
        for option, value in (("--layer-timeout", args.layer_timeout), ("--startup-timeout", args.startup_timeout)):
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"{option} must be a positive number of seconds, got {value}")
        if args.request_ids is not None or args.skip_answered is not None:
            from mpicdc.runtime.journal import request_ids
            request_ids(args.repeat, args.request_ids, args.skip_answered)
        if args.link:
            from mpicdc.core.traffic import rate_bits
            rate_bits(args.link)
        if args.inject:
            from mpicdc.core.faults import parse_injections
            injections = parse_injections(args.inject)
            if model is not None:
                injections.check_layers([layer.name for layer in model.layers])
    except (UnknownModelError, ValueError) as exc:
        raise UsageError(str(exc)) from None



def _scale_detector(args, rank: int) -> float:
    """``--link``: the detector's settings from the link rate and the plan, before MPI starts (every rank
    alike); returns the time the link needs (the least default layer timeout), 0 when it could not tell."""
    from mpicdc.runtime.linkscale import scale_detector

    try:
        note, link_s = scale_detector(args.link, args.model, args.weights, args.code, args.parity,
                                      max(0, int(os.environ.get("OMPI_COMM_WORLD_SIZE", "0")) - args.spares))
    except Exception as exc:  # noqa: BLE001 - a bad folder is reported by the start-up handshake
        note, link_s = f"--link {args.link}: detector left at its defaults ({type(exc).__name__}: {exc})", 0.0
    if rank == 0:
        layer = args.layer_timeout if args.layer_timeout is not None else max(LAYER_TIMEOUT_S, link_s)
        log.info("%s; layer timeout %g s", note, layer)
    return link_s


def _run_job(args, rank: int) -> int:
    """Start the job, play this rank's role, and end the process with the job's exit code."""
    from mpicdc.runtime.mpienv import init_mpi, ulfm_enabled
    from mpicdc.runtime.session import RunConfig, StartupError, end_process, serve
    from mpicdc.runtime.worker import MasterLost

    link_s = _scale_detector(args, rank) if args.link else 0.0
    if args.layer_timeout is None:
        args.layer_timeout = max(LAYER_TIMEOUT_S, link_s)
    config = RunConfig(args.model, weights=args.weights, code=args.code, parity=args.parity,
                       prepare_missing=not args.no_prepare, injections=tuple(args.inject),
                       device=args.device, layer_timeout_s=args.layer_timeout,
                       startup_timeout_s=args.startup_timeout, seed=args.seed, integrity=args.integrity,
                       spares=args.spares, wire=args.wire, workers=args.workers,
                       master_device=args.master_device)
    MPI = init_mpi(config.startup_timeout_s)
    world = MPI.COMM_WORLD
    ulfm, hung = ulfm_enabled(MPI), False
    try:
        session = serve(config, comm=world)
    except StartupError as exc:
        if rank == 0:
            print(f"mpicdc: cannot start: {exc}", file=sys.stderr, flush=True)
        end_process(2, world=world, ulfm=ulfm)
        return 2
    except MasterLost as exc:
        log.error("%s; exiting", exc)
        end_process(1, world=world, ulfm=ulfm)
        return 1
    except Exception as exc:  # noqa: BLE001 - a worker's unexpected error: one line, then exit
        log.error("rank %d stopped: %s: %s", rank, type(exc).__name__, exc)
        end_process(1, world=world, ulfm=ulfm)
        return 1
    if session is None:  # a worker the master stopped
        code = 0
    else:
        with session:
            try:
                code = master_main(args, session)
            except ValueError as exc:  # bad input found on the master
                print(f"mpicdc: {exc}", file=sys.stderr, flush=True)
                code = 2
            except KeyboardInterrupt:
                print("mpicdc: interrupted; stopping the workers", file=sys.stderr, flush=True)
                code = 130
            except Exception as exc:  # noqa: BLE001 - anything else: stop the workers, say it once
                print(f"mpicdc: the master failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                code = 1
        hung = bool(session.unacknowledged)
    end_process(code, world=world, ulfm=ulfm, hung=hung)
    return code


if __name__ == "__main__":
    sys.exit(main())
