"""``python -m mpicdc.bench prepare``: peak memory of the weight preparation tool.

Runs ``python -m mpicdc.prepare`` in a subprocess (VGG16, 10 data workers and one sum parity
worker by default) and prints its peak resident set size (``getrusage(RUSAGE_CHILDREN)``)
against the size of the model's largest layer.  A first subprocess that only imports the tool
measures the fixed overhead (interpreter, numpy, h5py), so the report also gives the ratio of
what preparing adds on top of it.  The target is ``peak <= 1.5 x largest layer + overhead``.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_children_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024   # kB on Linux


def _child_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpicdc.bench prepare", description=__doc__,
                                epilog="examples:\n"
                                       "  python -m mpicdc.bench prepare                  # VGG16 over 10+1 ranks\n"
                                       "  python -m mpicdc.bench prepare --model alexnet --workers 4 --check\n"
                                       "  python -m mpicdc.bench prepare --code mds --parity 2 --dir /tmp/shards",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg16", help="zoo model (default vgg16)")
    p.add_argument("--workers", type=int, default=10, help="data workers (default 10)")
    p.add_argument("--parity", type=int, default=None, help="parity workers (implied by sum/groups)")
    p.add_argument("--code", default="sum", help="code spec (default sum)")
    p.add_argument("--dir", help="write the shards here and keep them (default: a temporary folder)")
    p.add_argument("--budget", type=float, default=1.5,
                   help="allowed (peak - overhead) / largest layer (default 1.5)")
    p.add_argument("--check", action="store_true", help="exit 1 when the peak is over the budget")
    args = p.parse_args(argv)

    from mpicdc.core.models import UnknownModelError, get_model
    try:
        model = get_model(args.model)
    except UnknownModelError as exc:
        p.error(str(exc))
    shapes = model.weight_shapes()
    largest_name = max(shapes, key=lambda k: shapes[k][0] * shapes[k][1])
    largest = 4 * shapes[largest_name][0] * shapes[largest_name][1]
    total = sum(4 * r * c for r, c in shapes.values())

    env = _child_env()
    # Children are measured one after the other: RUSAGE_CHILDREN keeps the maximum over all
    # waited-for children, so the import-only baseline must run first (it is the smaller one).
    subprocess.run([sys.executable, "-c", "import numpy, h5py, mpicdc.store, mpicdc.store.prepare_cli, mpicdc.core.plan"],
                   check=True, env=env)
    overhead = _peak_children_bytes()
    with tempfile.TemporaryDirectory(prefix="mpicdc-bench-") as tmp:
        out = args.dir or str(Path(tmp) / "shards")
        cmd = [sys.executable, "-m", "mpicdc.prepare", args.model, "--workers", str(args.workers),
               "--code", args.code, "--dir", out, "--quiet"]
        if args.parity is not None:
            cmd += ["--parity", str(args.parity)]
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env)
        elapsed = time.perf_counter() - start
        if done.returncode:
            print(f"prepare failed with exit status {done.returncode}: {' '.join(cmd)}", file=sys.stderr)
            return 1
        written = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    peak = _peak_children_bytes()
    ratio = peak / largest
    extra = (peak - overhead) / largest
    verdict = "within" if extra <= args.budget else "OVER"
    print(f"prepare {args.model}: {args.workers} data workers, code {args.code}; "
          f"{total / 1e6:.0f} MB of weights, {written / 1e6:.0f} MB written in {elapsed:.1f} s")
    print(f"largest layer        {largest_name} {shapes[largest_name][0]}x{shapes[largest_name][1]} float32 = "
          f"{largest / 1e6:.0f} MB")
    print(f"fixed overhead       {overhead / 1e6:.0f} MB (python + numpy + h5py + mpicdc, import only)")
    print(f"peak RSS (prepare)   {peak / 1e6:.0f} MB = {ratio:.2f} x largest layer")
    print(f"peak minus overhead  {(peak - overhead) / 1e6:.0f} MB = {extra:.2f} x largest layer "
          f"({verdict} the {args.budget:g} x budget)")
    return 1 if args.check and extra > args.budget else 0


if __name__ == "__main__":
    sys.exit(main())
