"""``python -m mpicdc.bench kernels``: batch-1 forward time of mpicdc's kernels against PyTorch.

Both run on ONE thread, in the same process, interleaved (one mpicdc forward,
then one torch forward, repeated) so that a change in machine load hits both
alike.  Each time is the median of ``--repeat`` runs after one warm-up run,
in wall-clock time and in process CPU time (the latter does not count time
spent descheduled, which matters on a shared machine); ``--layers`` adds a
per-layer table.  Nothing here asserts a speed: it prints numbers.
numpy's BLAS reads its thread count when numpy is first imported, which has
already happened by the time this module runs (``import mpicdc`` imports
numpy), so unless ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` are already ``1`` the benchmark re-runs itself in a child
process with them set.

The same module provides :func:`torch_forward`, an independent forward of a
model graph written with ``torch.nn.functional`` ops; ``tests/test_reference.py``
checks mpicdc's kernels against it layer by layer.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


# ---------------------------------------------------------------- torch reference

def torch_weights(model, weights: dict) -> dict:
    """``{layer: (W, b)}`` as torch tensors in torch's layout (conv weights ``(out, in, *kernel)``).

    The tensors share memory with the numpy arrays (no copy): mpicdc's GEMM
    layout is by design torch's ``weight.reshape(out, -1)``.
    """
    import torch
    shapes = model.shapes()
    out = {}
    for layer in model.linear_layers:
        W, b = weights[layer.name]
        Wt = torch.from_numpy(W)
        if layer.op == "conv":
            c_in = shapes[layer.inputs[0]][0] // layer.attrs.get("groups", 1)
            Wt = Wt.reshape((W.shape[0], c_in) + tuple(layer.attrs["kernel"]))
        out[layer.name] = (Wt, torch.from_numpy(b))
    return out


def _torch_pad(h, attrs: dict, fill: float):
    """``h`` (batch axis first) padded by the layer's spatial ``padding`` (any form) with ``fill``."""
    import torch.nn.functional as F

    from mpicdc.core.models import pad_pairs
    pads = pad_pairs(attrs.get("padding", 0), h.dim() - 2)
    if not any(b or e for b, e in pads):
        return h
    return F.pad(h, [v for pair in reversed(pads) for v in pair], value=fill)


def torch_forward(model, tweights: dict, x, return_all: bool = False, timings: dict | None = None):
    """Forward of ``model`` with ``torch.nn.functional`` ops (batch 1), for reference and timing.

    Parameters
    ----------
    model : the graph to run.
    tweights : from :func:`torch_weights`.
    x : input tensor or array of shape ``model.input_shape`` (no batch axis).
    return_all : return ``{layer: tensor}`` of every layer (batch axis
        included) instead of the output tensor.
    timings : if a dict, filled with ``{layer: seconds}`` (wall clock).
    """
    import torch
    import torch.nn.functional as F

    from mpicdc.core.models import pad_pairs
    nd = len(model.input_shape) - 1
    conv = {2: F.conv2d, 3: F.conv3d}
    maxp = {2: F.max_pool2d, 3: F.max_pool3d}
    avgp = {2: F.avg_pool2d, 3: F.avg_pool3d}
    acts = {"input": torch.as_tensor(x).reshape((1,) + tuple(model.input_shape))}
    with torch.no_grad():
        for layer in model.layers:
            start = time.perf_counter()
            a = layer.attrs
            ins = [acts[i] for i in layer.inputs]
            h = ins[0]
            op = layer.op
            if op == "conv":
                W, b = tweights[layer.name]
                y = conv[nd](_torch_pad(h, a, 0.0), W, b, stride=a.get("stride", 1),
                             groups=a.get("groups", 1))
            elif op == "dense":
                W, b = tweights[layer.name]
                y = F.linear(h.reshape(1, -1), W, b)
            elif op == "relu":
                y = F.relu(h)
            elif op == "maxpool":
                y = maxp[nd](_torch_pad(h, a, -math.inf), a["kernel"], a.get("stride", a["kernel"]))
            elif op == "avgpool":
                stride = a.get("stride", a["kernel"])
                y = avgp[nd](_torch_pad(h, a, 0.0), a["kernel"], stride)
                if not a.get("count_include_pad", False):   # divide by the real cells per window
                    ones = _torch_pad(torch.ones_like(h[:, :1]), a, 0.0)
                    y = y / avgp[nd](ones, a["kernel"], stride)
            elif op == "gap":
                y = h.mean(dim=tuple(range(2, h.dim())), keepdim=bool(a.get("keepdims")))
            elif op == "lrn":
                y = F.local_response_norm(h, a.get("size", 5), alpha=a.get("alpha", 1e-4),
                                          beta=a.get("beta", 0.75), k=a.get("k", 2.0))
            elif op == "flatten":
                y = h.reshape(1, -1)
            elif op == "softmax":
                y = F.softmax(h, dim=1)
            elif op == "concat":
                y = torch.cat(ins, dim=1)
            elif op == "add":
                y = ins[0]
                for other in ins[1:]:
                    y = y + other
            elif op == "batchnorm":
                shape = (1, -1) + (1,) * (h.dim() - 2)
                y = h * torch.tensor(a["scale"], dtype=h.dtype).reshape(shape) \
                    + torch.tensor(a["shift"], dtype=h.dtype).reshape(shape)
            elif op == "identity":
                y = h
            elif op == "clip":
                y = torch.clamp(h, a.get("min"), a.get("max"))
            elif op == "gmp":
                y = h.amax(dim=tuple(range(2, h.dim())), keepdim=bool(a.get("keepdims")))
            elif op == "hardsigmoid":
                y = torch.clamp(a.get("alpha", 1 / 6) * h + a.get("beta", 0.5), 0, 1)
            elif op == "hardswish":
                y = F.hardswish(h)
            elif op == "channel_shuffle":
                y = F.channel_shuffle(h, a["groups"])
            elif op == "pad":
                pads = pad_pairs(a["pads"], h.dim() - 1, layer.name)
                y = F.pad(h, [v for pair in reversed(pads) for v in pair], value=a.get("value", 0.0))
            elif op == "slice":
                y = h[:, a["start"]:a["stop"]]
            else:
                raise ValueError(f"layer {layer.name!r}: torch_forward has no op {op!r}")
            acts[layer.name] = y
            if timings is not None:
                timings[layer.name] = time.perf_counter() - start
    return acts if return_all else acts[model.output]


# ---------------------------------------------------------------- timing

def _median_ms(times):
    times = sorted(times)
    n = len(times)
    mid = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
    return 1e3 * mid


def sgemm_peak(n: int = 4096, repeat: int = 3):
    """Single-thread float32 GEMM rate in GFLOP/s of numpy (and torch when given), ``n^3``.

    Returns ``(numpy_gflops, torch_gflops_or_None)``: the best of ``repeat``
    products after a warm-up (a peak, so the fastest run, not the median).
    """
    import numpy as np
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, n), dtype=np.float32)
    B = rng.standard_normal((n, n), dtype=np.float32)
    C = np.empty_like(A)
    flop = 2.0 * n ** 3

    def rate(fn):
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return flop / min(times) / 1e9

    np_rate = rate(lambda: np.matmul(A, B, out=C))
    torch = _import_torch()
    torch_rate = None
    if torch is not None:
        tA, tB, tC = torch.from_numpy(A), torch.from_numpy(B), torch.from_numpy(C)
        torch_rate = rate(lambda: torch.matmul(tA, tB, out=tC))
    return np_rate, torch_rate


def bench_model(name: str, repeat: int, torch_mod, fresh: bool = True) -> dict:
    """Time one zoo model: mpicdc (persistent workspace), mpicdc (fresh), torch; interleaved.

    Returns medians in ms (``mpicdc_ms``, ``fresh_ms``, ``torch_ms``), the
    output's relative error against torch, and per-layer medians
    (``layers``: ``{layer: (mpicdc_ms, torch_ms)}``) from the timed runs.
    """
    import numpy as np

    from mpicdc.core.kernels import Workspace, default_input, forward
    from mpicdc.core.models import get_model
    from mpicdc.core.random_weights import init_weights

    model = get_model(name)
    weights = init_weights(model, seed=0)
    x = default_input(model)
    ws = Workspace()
    layer_times = {"mpicdc": [], "torch": []}

    def ours():
        t = {}
        forward(model, weights, x, workspace=ws, timings=t)
        layer_times["mpicdc"].append(t)

    runs = {"mpicdc": ours}
    if fresh:
        runs["fresh"] = lambda: forward(model, weights, x)
    result = {"model": name, "gflop": sum(model.flops().values()) / 1e9}
    if torch_mod is not None:
        tw = torch_weights(model, weights)
        tx = torch_mod.from_numpy(x)

        def theirs():
            t = {}
            torch_forward(model, tw, tx, timings=t)
            layer_times["torch"].append(t)

        runs["torch"] = theirs
        out = forward(model, weights, x, workspace=ws)
        ref = torch_forward(model, tw, tx).numpy().reshape(out.shape)
        result["max_rel_err"] = float(np.abs(out - ref).max() / np.abs(ref).max())
    times = {key: [] for key in runs}
    cpu = {key: [] for key in runs}
    for fn in runs.values():  # warm-up
        fn()
    for lt in layer_times.values():
        lt.clear()
    for _ in range(repeat):
        for key, fn in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    for key in runs:
        result[f"{key}_ms"] = _median_ms(times[key])
        result[f"{key}_cpu_ms"] = _median_ms(cpu[key])
    result["layers"] = {
        layer.name: tuple(_median_ms([t[layer.name] for t in layer_times[k]]) if layer_times[k] else None
                          for k in ("mpicdc", "torch"))
        for layer in model.layers}
    return result


def print_layers(model_name: str, layers: dict) -> None:
    """Per-layer table (median ms) of one model, mpicdc against torch."""
    from mpicdc.core.models import get_model
    model = get_model(model_name)
    flops = model.flops()
    print(f"\nper layer, {model_name} (median ms; a ReLU fused into its linear layer shows 0):")
    print("| layer | op | GFLOP | mpicdc ms | torch ms | mpicdc - torch | mpicdc GFLOP/s | torch GFLOP/s |")
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for layer in model.layers:
        ours, theirs = layers[layer.name]
        gf = flops.get(layer.name, 0) / 1e9
        rate = (lambda ms: f"{gf / ms * 1e3:.0f}" if gf and ms else "-")
        print(f"| {layer.name} | {layer.op} | {gf:.3f} | {_ms(ours)} | "
              + (f"{_ms(theirs)} | {ours - theirs:+.2f} | " if theirs is not None else "- | - | ")
              + f"{rate(ours)} | {rate(theirs) if theirs is not None else '-'} |")


def _threads_ok() -> bool:
    return all(os.environ.get(v) == "1" for v in THREAD_VARS)


def main(argv=None) -> int:
    """Entry point of ``python -m mpicdc.bench kernels``; returns the exit code."""
    from mpicdc.core.models import model_names

    parser = argparse.ArgumentParser(
        prog="python -m mpicdc.bench kernels",
        description="Batch-1 forward time of mpicdc's numpy kernels against PyTorch, both on one "
                    "thread, plus the single-thread float32 GEMM peak.",
        epilog="examples:\n"
               "  python -m mpicdc.bench kernels                          # every zoo model\n"
               "  python -m mpicdc.bench kernels --models alexnet --layers  # one model, per-layer table\n"
               "  python -m mpicdc.bench kernels --models tiny --repeat 5 --peak-size 1024  # quick",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help=f"zoo models to time (default: all of {', '.join(model_names())})")
    parser.add_argument("--repeat", type=int, default=7,
                        help="timed runs per model after one warm-up; the median is reported (>= 5)")
    parser.add_argument("--no-fresh", action="store_true",
                        help="skip timing mpicdc without a persistent workspace")
    parser.add_argument("--peak-size", type=int, default=4096, help="n of the n^3 sgemm peak run")
    parser.add_argument("--layers", action="store_true",
                        help="also print a per-layer table (median ms, mpicdc against torch) per model")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.repeat < 5:
        parser.error(f"--repeat must be at least 5, got {args.repeat}")
    models = args.models or model_names()
    unknown = [m for m in models if m not in model_names()]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known models: {', '.join(model_names())}")

    if not _threads_ok():
        env = dict(os.environ, **{v: "1" for v in THREAD_VARS})
        print(f"re-running with {'=1 '.join(THREAD_VARS)}=1 so that numpy's BLAS uses one thread",
              flush=True)
        cmd = [sys.executable, "-m", "mpicdc.bench", "kernels"] + argv
        return subprocess.run(cmd, env=env).returncode

    import numpy as np
    torch = _import_torch()
    if torch is not None:
        torch.set_num_threads(1)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {_cpu_name()}, "
          f"{os.cpu_count()} cpus; python {platform.python_version()}, numpy {np.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else ""))
    print(f"threads: {', '.join(f'{v}=1' for v in THREAD_VARS)}"
          + (f"; torch.get_num_threads()={torch.get_num_threads()}" if torch is not None else ""))
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"note: {var}={os.environ[var]} is set")
    if torch is None:
        print("torch is missing (pip install torch==2.13.0): timing mpicdc only")

    print(f"load average (1, 5, 15 min) at start: {_load()}")
    peak_np, peak_torch = sgemm_peak(args.peak_size)
    print(f"single-thread sgemm {args.peak_size}^3: numpy {peak_np:.1f} GFLOP/s (the peak below)"
          + (f", torch {peak_torch:.1f} GFLOP/s" if peak_torch is not None else ""))
    print(f"median of {args.repeat} runs after a warm-up, mpicdc and torch interleaved; "
          "mpicdc = forward() with a persistent Workspace, no-ws = forward() without one; "
          "ratio = mpicdc / torch; cpu = process CPU time (immune to being descheduled on a "
          "shared machine); max rel err = |mpicdc - torch| / max|torch| of the output")
    cols = ["model", "GFLOP", "mpicdc ms", "no-ws ms", "torch ms", "ratio", "mpicdc GFLOP/s",
            "torch GFLOP/s", "mpicdc % peak", "torch % peak", "mpicdc cpu ms", "torch cpu ms",
            "cpu ratio", "max rel err"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" if i == 0 else "--:" for i in range(len(cols))) + "|")
    per_layer = {}
    for name in models:
        r = bench_model(name, args.repeat, torch, fresh=not args.no_fresh)
        gf = r["gflop"]
        ours = gf / r["mpicdc_ms"] * 1e3
        theirs = gf / r["torch_ms"] * 1e3 if torch is not None else None
        cells = [name, f"{gf:.3f}", _ms(r["mpicdc_ms"]),
                 _ms(r["fresh_ms"]) if "fresh_ms" in r else "-",
                 _ms(r["torch_ms"]) if theirs else "-",
                 f"{r['mpicdc_ms'] / r['torch_ms']:.3f}" if theirs else "-",
                 f"{ours:.1f}", f"{theirs:.1f}" if theirs else "-",
                 f"{100 * ours / peak_np:.0f}%", f"{100 * theirs / peak_np:.0f}%" if theirs else "-",
                 _ms(r["mpicdc_cpu_ms"]), _ms(r["torch_cpu_ms"]) if theirs else "-",
                 f"{r['mpicdc_cpu_ms'] / r['torch_cpu_ms']:.3f}" if theirs else "-",
                 f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"]
        print("| " + " | ".join(cells) + " |", flush=True)
        per_layer[name] = r["layers"]
    if args.layers:
        for name, layers in per_layer.items():
            print_layers(name, layers)
    print(f"load average (1, 5, 15 min) at end: {_load()}")
    return 0


def _ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
