"""``python -m mpicdc.bench prepare``: peak memory of the weight preparation tool.

Runs ``python -m mpicdc.prepare`` in a subprocess and prints its peak resident set size
(its own ``VmHWM``, reported by :mod:`mpicdc.bench.peak_rss`).  A first subprocess that only imports what
the tool imports measures the fixed overhead (interpreter, numpy, h5py, and onnx / torch for a
file of that kind), so the report also gives what preparing adds on top of it.

* Random weights (the default; VGG16, 10 data workers and one sum parity worker): the target is
  ``peak <= overhead + 1.5 x largest layer``.
* A weight file (``--source FILE``, or ``--onnx``: the ``--model`` zoo model written as an ONNX
  file with its random weights in a temporary folder): the target is
  ``peak <= overhead + file size + 2 x largest layer`` (issue 12: importer memory).  It is meant
  for files of tens of MB and more: prepare's own working set (parity encoded in steps of up to
  16 MB of float64, HDF5 buffers) is about 10-20 MB whatever the file.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: what the import-only child imports, per source kind (the tool imports the same before it reads).
BASE_IMPORTS = "import numpy, h5py, mpicdc.store, mpicdc.store.prepare_cli, mpicdc.core.plan"
SOURCE_IMPORTS = {".onnx": "import onnx, mpicdc.store.importers.onnx",
                  ".h5": "import mpicdc.store.importers.keras", ".hdf5": "import mpicdc.store.importers.keras",
                  ".pt": "import torch, mpicdc.store.importers.torch_state",
                  ".pth": "import torch, mpicdc.store.importers.torch_state",
                  ".npz": "import mpicdc.store.importers.npz"}
MB = 1e6


def child_env() -> dict:
    """The environment of a measured child: this checkout of mpicdc first on ``PYTHONPATH``."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def child_peak(args: list, env: dict | None = None, timeout: float = 3600.0) -> tuple:
    """Run ``python -m mpicdc.bench.peak_rss REPORT *args``; return ``(exit status, its own peak RSS in bytes)``.

    ``args`` is ``["-m", MODULE, ...]`` or ``["-c", CODE]``.  The child reports its ``VmHWM``
    (:mod:`mpicdc.bench.peak_rss`: unlike ``ru_maxrss`` it does not start from this process's
    size).  The child is killed after ``timeout`` seconds (``TimeoutError``).
    """
    with tempfile.TemporaryDirectory(prefix="mpicdc-peak-") as tmp:
        report = Path(tmp) / "peak"
        cmd = [sys.executable, "-m", "mpicdc.bench.peak_rss", str(report)] + [str(a) for a in args]
        try:
            done = subprocess.run(cmd, env=env if env is not None else child_env(), timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s (killed)") from None
        peak = int(report.read_text()) if report.is_file() else 0
    return done.returncode, peak


def baseline_bytes(source: str | None = None) -> int:
    """Peak RSS of a child that only imports what preparing from ``source`` (None: random) imports."""
    code = BASE_IMPORTS
    if source is not None:
        extra = SOURCE_IMPORTS.get(Path(source).suffix.lower())
        code += "; " + extra if extra else ""
    status, peak = child_peak(["-c", code])
    if status:
        raise RuntimeError(f"the import-only baseline child failed with status {status}: {code}")
    return peak


def prepare_cmd(out: str, workers: int, code: str, parity, model=None, source=None) -> list:
    cmd = ["-m", "mpicdc.prepare"] + ([model] if model else []) + \
          ["--workers", str(workers), "--code", code, "--dir", out, "--quiet"]
    if source is not None:
        cmd += ["--source", source]
    if parity is not None:
        cmd += ["--parity", str(parity)]
    return cmd


def _largest(model) -> tuple:
    shapes = model.weight_shapes()
    name = max(shapes, key=lambda k: math.prod(shapes[k]))
    return name, shapes[name], 4 * math.prod(shapes[name]), sum(4 * math.prod(s) for s in shapes.values())


def _written(out: str) -> int:
    return sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())


def _random_case(args) -> int:
    from mpicdc.core.models import get_model
    model = get_model(args.model)
    largest_name, shape, largest, total = _largest(model)
    overhead = baseline_bytes()
    with tempfile.TemporaryDirectory(prefix="mpicdc-bench-") as tmp:
        out = args.dir or str(Path(tmp) / "shards")
        cmd = prepare_cmd(out, args.workers, args.code, args.parity, model=args.model)
        start = time.perf_counter()
        status, peak = child_peak(cmd)
        elapsed = time.perf_counter() - start
        if status:
            print(f"prepare failed with exit status {status}: {' '.join(cmd)}", file=sys.stderr)
            return 1
        written = _written(out)
    ratio = peak / largest
    extra = (peak - overhead) / largest
    verdict = "within" if extra <= args.budget else "OVER"
    print(f"prepare {args.model}: {args.workers} data workers, code {args.code}; "
          f"{total / MB:.0f} MB of weights, {written / MB:.0f} MB written in {elapsed:.1f} s")
    print(f"largest layer        {largest_name} {shape[0]}x{shape[1]} float32 = {largest / MB:.0f} MB")
    print(f"fixed overhead       {overhead / MB:.0f} MB (python + numpy + h5py + mpicdc, import only)")
    print(f"peak RSS (prepare)   {peak / MB:.0f} MB = {ratio:.2f} x largest layer")
    print(f"peak minus overhead  {(peak - overhead) / MB:.0f} MB = {extra:.2f} x largest layer "
          f"({verdict} the {args.budget:g} x budget)")
    return 1 if args.check and extra > args.budget else 0


def measure_file(source: str, out: str, workers: int = 10, code: str = "sum", parity=None,
                 model: str | None = None) -> dict:
    """Prepare ``source`` into ``out`` in a child; its peak RSS against ``overhead + file + 2 x largest``.

    Returns ``file``, ``largest_name``, ``largest_shape``, ``largest``, ``overhead``, ``peak``,
    ``target`` (bytes), ``ratio`` (``(peak - overhead) / (file + 2 x largest)``, at most 1 on
    target), ``seconds`` and ``written``.  Raises ``RuntimeError`` when prepare fails.
    """
    from mpicdc.store import open_manifest
    size = os.path.getsize(source)
    overhead = baseline_bytes(source)
    cmd = prepare_cmd(out, workers, code, parity, model=model, source=source)
    start = time.perf_counter()
    status, peak = child_peak(cmd)
    seconds = time.perf_counter() - start
    if status:
        raise RuntimeError(f"prepare failed with exit status {status}: {' '.join(cmd)}")
    name, shape, largest, _ = _largest(open_manifest(out).model)
    return {"file": size, "largest_name": name, "largest_shape": shape, "largest": largest, "overhead": overhead,
            "peak": peak, "target": overhead + size + 2 * largest, "ratio": (peak - overhead) / (size + 2 * largest),
            "seconds": seconds, "written": _written(out)}


def _file_case(args, source: str, what: str) -> int:
    with tempfile.TemporaryDirectory(prefix="mpicdc-bench-") as tmp:
        out = args.dir or str(Path(tmp) / "shards")
        try:
            m = measure_file(source, out, args.workers, args.code, args.parity,
                             model=args.model if args.model_given else None)
        except RuntimeError as exc:
            print(str(exc), file=sys.stderr)
            return 1
    verdict = "within" if m["ratio"] <= 1 else "OVER"
    shape = "x".join(map(str, m["largest_shape"]))
    print(f"prepare --source {what}: {args.workers} data workers, code {args.code}; {m['written'] / MB:.0f} MB "
          f"written in {m['seconds']:.1f} s")
    print(f"file size            {m['file'] / MB:.0f} MB")
    print(f"largest layer        {m['largest_name']} {shape} float32 = {m['largest'] / MB:.0f} MB")
    print(f"fixed overhead       {m['overhead'] / MB:.0f} MB (python + numpy + h5py + the importer's package, "
          f"import only)")
    print(f"peak RSS (prepare)   {m['peak'] / MB:.0f} MB = {m['peak'] / m['file']:.2f} x file size")
    print(f"target               {m['target'] / MB:.0f} MB = overhead + file size + 2 x largest layer")
    print(f"peak / target        {(m['peak'] - m['overhead']) / MB:.0f} / {(m['file'] + 2 * m['largest']) / MB:.0f} MB "
          f"above the overhead = {m['ratio']:.2f} ({verdict} the target)")
    return 1 if args.check and m["ratio"] > 1 else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpicdc.bench prepare", description=__doc__,
                                epilog="examples:\n"
                                       "  python -m mpicdc.bench prepare                  # VGG16 over 10+1 ranks\n"
                                       "  python -m mpicdc.bench prepare --model alexnet --workers 4 --check\n"
                                       "  python -m mpicdc.bench prepare --code mds --parity 2 --dir /tmp/shards\n"
                                       "  python -m mpicdc.bench prepare --onnx --workers 4   # VGG16 as a 553 MB ONNX file\n"
                                       "  python -m mpicdc.bench prepare --source tumor_vgg16.onnx --check",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="zoo model (default vgg16); with --source, the zoo "
                                                 "architecture of a weights-only file")
    p.add_argument("--workers", type=int, default=10, help="data workers (default 10)")
    p.add_argument("--parity", type=int, default=None, help="parity workers (implied by sum/groups)")
    p.add_argument("--code", default="sum", help="code spec (default sum)")
    p.add_argument("--dir", help="write the shards here and keep them (default: a temporary folder)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--source", metavar="FILE", help="measure preparing from this weight file (ONNX, Keras "
                                                         "HDF5, PyTorch, npz) against file size + 2 x largest layer")
    source.add_argument("--onnx", action="store_true", help="write --model as an ONNX file with its random weights "
                                                            "in a temporary folder and measure preparing from it")
    p.add_argument("--budget", type=float, default=1.5,
                   help="random weights: allowed (peak - overhead) / largest layer (default 1.5)")
    p.add_argument("--check", action="store_true", help="exit 1 when the peak is over the budget or target")
    args = p.parse_args(argv)
    args.model_given = args.model is not None
    args.model = args.model or "vgg16"

    from mpicdc.core.models import UnknownModelError, get_model
    try:
        model = get_model(args.model)
    except UnknownModelError as exc:
        p.error(str(exc))
    if args.source is not None:
        if not os.path.isfile(args.source):
            p.error(f"--source {args.source!r}: no such file")
        return _file_case(args, args.source, args.source)
    if args.onnx:
        from mpicdc.store.importers.onnx_export import save_onnx
        with tempfile.TemporaryDirectory(prefix="mpicdc-bench-onnx-") as tmp:
            path = save_onnx(Path(tmp) / f"{args.model}.onnx", model)
            args.model_given = False             # the file's own graph, named after the file
            return _file_case(args, path, f"{args.model}.onnx (zoo {args.model}, random weights, written by save_onnx)")
    return _random_case(args)


if __name__ == "__main__":
    sys.exit(main())
