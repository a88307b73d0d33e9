"""Integrity checks against the code: false alarms on clean replies, detection of corrupted ones.

In-process numpy path, no MPI: for each zoo model, input and code, every distributed layer's
``n + r`` blocks are computed with the workers' kernel (:func:`lower_gemm` on the encoded
weight blocks, float32), then checked as the master checks them (:func:`integrity.check`) --
the full set and every set with one block missing (each a distinct layer check the master
can meet).  Then one block is corrupted with each ``corrupt`` kind and the full set checked
again (detection), and under MDS ``r >= 2`` the located block is decoded around and the
layer output compared with the clean one (correction).  Strict mode's latency on real ranks
is measured by ``python -m mpicdc.bench strict``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

EPILOG = """\
examples:
  python -m mpicdc.bench integrity                       # tiny, lenet, alexnet; sum, groups:2, mds r=2, r=3
  python -m mpicdc.bench integrity --models tiny --inputs 50
  python -m mpicdc.bench integrity --quick               # a few inputs per model (a smoke run)
"""

CODES = (("sum", 1), ("groups:2", 2), ("mds", 2), ("mds", 3))
KINDS = ("bitflip", "scale", "noise", "const")
RTOL_CORRECTED = 1e-4   # a corrected layer output against the clean one (relative to its max)


def layer_blocks(model, weights, x, codes=CODES, n: int = 4):
    """Yield ``(layer, K, code, {block: reply})`` for every linear layer of ``model`` on input ``x``.

    Replies are what the workers send: float32 ``lower_gemm`` products of the encoded blocks.
    """
    from mpicdc.core.codes import encode_rows, make_code, split_rows
    from mpicdc.core.kernels import forward, lower_gemm

    acts = forward(model, weights, x, return_all=True)
    for layer in model.linear_layers:
        W, b = weights[layer.name]
        rows, K = W.shape
        if rows < n:
            continue
        for spec, r in codes:
            code = make_code(spec, n, r)
            key = (model.name, layer.name, spec, r, n)
            if key not in _ENCODED:  # the weights are encoded once per layer and code, not per input
                _ENCODED[key] = encode_rows(W, b, code, split_rows(rows, n))
            pairs = _ENCODED[key]
            xin = acts[layer.inputs[0]]
            replies = {}
            for k, (Wk, bk) in enumerate(pairs):
                Y, lowered = lower_gemm(layer, Wk, bk, xin)
                replies[k] = np.ascontiguousarray(lowered.finish(Y).reshape(Wk.shape[0], -1))
            yield layer, K, code, replies


_ENCODED: dict = {}  # (model, layer, code, r, n) -> encoded (W, b) blocks of the model being measured


def run(models, inputs: int, seed: int = 0) -> dict:
    """Counts of clean checks, false alarms, detections per kind and MDS corrections."""
    from mpicdc.core import integrity
    from mpicdc.core.faults import corrupt_block
    from mpicdc.core.models import get_model
    from mpicdc.core.random_weights import init_weights

    stats = {"clean": 0, "false": 0, "worst_ratio": 0.0, "detect": {k: [0, 0] for k in KINDS},
             "locate": [0, 0], "correct": [0, 0], "by_code": {}}
    rng = np.random.default_rng(seed)
    for name in models:
        model = get_model(name)
        weights = init_weights(model, seed)
        _ENCODED.clear()
        for i in range(inputs):
            x = np.random.default_rng([seed, i]).random(model.input_shape, dtype=np.float32)
            for layer, K, code, replies in layer_blocks(model, weights, x):
                key = f"{code.spec}:r={code.r}"
                per = stats["by_code"].setdefault(key, [0, 0])
                sets = [replies] + [{k: v for k, v in replies.items() if k != j} for j in replies]
                for subset in sets:
                    verdict = integrity.check(code, subset, K)
                    if verdict.checks:
                        stats["clean"] += 1
                        per[0] += 1
                        stats["worst_ratio"] = max(stats["worst_ratio"], verdict.residual / verdict.tolerance
                                                   if verdict.tolerance else 0.0)
                        if not verdict.ok:
                            stats["false"] += 1
                            per[1] += 1
                victim = int(rng.integers(code.size))
                for kind in KINDS:
                    bad = dict(replies)
                    bad[victim] = replies[victim].copy()
                    corrupt_block(bad[victim], kind, rng)
                    verdict = integrity.check(code, bad, K)
                    stats["detect"][kind][0] += 1
                    stats["detect"][kind][1] += not verdict.ok
                    if code.kind == "mds" and code.r >= 2:
                        stats["locate"][0] += 1
                        stats["locate"][1] += verdict.suspect == victim
                        stats["correct"][0] += 1
                        stats["correct"][1] += _corrected(code, bad, verdict.suspect, replies)
    return stats


def _corrected(code, replies: dict, suspect, clean: dict) -> bool:
    """Whether decoding around ``suspect`` gives the clean data blocks (within RTOL_CORRECTED)."""
    if suspect is None:
        return False
    data = code.decode({k: v for k, v in replies.items() if k != suspect})
    truth = np.stack([clean[i] for i in range(code.n)])
    err = np.max(np.abs(np.stack(data) - truth)) / max(float(np.max(np.abs(truth))), 1e-30)
    return bool(err <= RTOL_CORRECTED)


def _rate(pair) -> str:
    total, hits = pair
    return f"{hits}/{total} ({100.0 * hits / total:.2f}%)" if total else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpicdc.bench integrity", description=__doc__.split("\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "lenet", "alexnet"])
    parser.add_argument("--inputs", type=int, default=None,
                        help="inputs per model (default: 40 for tiny and lenet, 4 for alexnet)")
    parser.add_argument("--quick", action="store_true", help="2 inputs per model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from mpicdc.core import integrity

    t0 = time.perf_counter()
    total = None
    for name in args.models:
        count = 2 if args.quick else args.inputs or (4 if name == "alexnet" else 40)
        stats = run([name], count, args.seed)
        total = stats if total is None else _merge(total, stats)
        print(f"{name}: {count} inputs, {stats['clean']} clean checks, {stats['false']} false alarms, "
              f"worst residual/tolerance {stats['worst_ratio']:.3f}", flush=True)
    print(f"\ntolerance: C_TOL={integrity.C_TOL:g} * u * sqrt(K) * sum_k |H[q,k]| max|Y_k|")
    print(f"clean layer checks: {total['clean']}, false alarms: {total['false']}, "
          f"worst residual/tolerance: {total['worst_ratio']:.3f}")
    for key, (checks, false) in total["by_code"].items():
        print(f"  {key:<14} {checks:>7} checks  {false} false alarms")
    print("detection (one block of the full set corrupted):")
    for kind in KINDS:
        print(f"  {kind:<8} {_rate(total['detect'][kind])}")
    print(f"MDS r>=2 location: {_rate(total['locate'])}   correction (output vs clean, rtol "
          f"{RTOL_CORRECTED:g}): {_rate(total['correct'])}")
    print("strict-mode overhead on real ranks: python -m mpicdc.bench strict")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _merge(a: dict, b: dict) -> dict:
    out = {"clean": a["clean"] + b["clean"], "false": a["false"] + b["false"],
           "worst_ratio": max(a["worst_ratio"], b["worst_ratio"]),
           "detect": {k: [a["detect"][k][i] + b["detect"][k][i] for i in (0, 1)] for k in KINDS},
           "locate": [a["locate"][i] + b["locate"][i] for i in (0, 1)],
           "correct": [a["correct"][i] + b["correct"][i] for i in (0, 1)], "by_code": dict(a["by_code"])}
    for key, (c, f) in b["by_code"].items():
        old = out["by_code"].get(key, [0, 0])
        out["by_code"][key] = [old[0] + c, old[1] + f]
    return out
