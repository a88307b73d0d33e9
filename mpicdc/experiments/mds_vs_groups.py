"""MDS against multi-group parity at equal extra devices (beyond the paper).

The paper's generalisation of its single sum parity is *multi-group* parity: ``r`` parity devices,
each summing one group of the ``n`` data workers, so it survives one loss per group.  An MDS code
with the same ``r`` parity devices survives *any* ``r`` losses.  This experiment compares the two
at ``r = 2, 3`` over ``n = 4, 8, 12`` data workers (with uncoded and single sum parity as
references) on four axes:

1. **Survival of k failures**: the fraction of the ``C(n + r, k)`` sets of ``k`` failed devices
   (data or parity) after which every data block is still decodable, by enumeration with each
   code's ``decodable`` (sampled when a count exceeds ``--max-patterns``), for ``k = 0..r+2``;
   checked against the closed forms (MDS: ``k <= r``; groups of sizes ``s_j`` (data + parity):
   ``e_k(s) / C(n + r, k)`` with ``e_k`` the elementary symmetric polynomial; sum: ``k <= 1``).
   With i.i.d. device failures of probability ``p`` this gives ``P(survive) = sum_k C(m, k)
   p^k (1 - p)^(m - k) frac_k`` exactly, cross-checked with the simulator's ``fail_prob``.
2. **Tail latency under stragglers**: :func:`mpicdc.sim.simulate` of AlexNet on Pi 3-class
   devices over a shared WiFi link, every layer split over the ``n`` workers, with the paper's
   WiFi straggler model (``wifi:0.05``) and a milder shifted exponential.
3. **Decode cost**: ``Code.decode`` timed on this machine for blocks of AlexNet's conv2 and fc6:
   a group parity rebuilds a block from its own group (additions and subtractions), MDS from
   ``n`` replies with real coefficients.
4. **float32 decode error**: replies computed in float32 exactly as workers do (parity weights
   encoded offline), decoded over every decodable loss pattern of ``r`` blocks, compared with the
   float64 product, next to the error of the direct float32 product.

Outputs in ``--out`` (default ``results/mds_vs_groups``): ``survival.csv``, ``reliability.csv``,
``latency.csv``, ``sim_failures.csv``, ``decode.csv``, ``mds_survival.png``,
``mds_latency_decode.png`` and ``summary.txt``.
"""
from __future__ import annotations

import itertools
import math
import sys
import time

import numpy as np

from mpicdc.core.codes import encode_rows, make_code, split_rows
from mpicdc.core.models import get_model
from mpicdc.core.plan import make_plan
from mpicdc.experiments import common
from mpicdc.sim import simulate

NAME = "mds_vs_groups"
DELAYS = ("wifi:0.05", "shexp:0.01,0.05")
DECODE_LAYERS = ("conv2", "fc6")        # AlexNet layers whose blocks are decoded in part 3
P_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)   # i.i.d. failure probabilities
P_HEADLINE = 0.01


def code_set(n: int, r: int) -> list:
    """``[(label, spec, parity count)]`` compared at ``r`` extra devices, plus references."""
    return [("none", "none", 0), ("sum", "sum", 1), (f"groups:{r}", f"groups:{r}", r), (f"mds r={r}", "mds", r)]


def _code(spec, n, r):
    return make_code(spec, n, r)


def closed_form(spec: str, n: int, r: int, k: int) -> float:
    """Closed-form fraction of ``k``-failure sets survived (for none, sum, groups:G, mds)."""
    m = n + r
    if k > m:
        return 0.0
    if spec == "none":
        return 1.0 if k == 0 else 0.0
    if spec == "sum":
        return 1.0 if k <= 1 else 0.0
    if spec.startswith("mds"):
        return 1.0 if k <= r else 0.0
    if spec.startswith("groups:"):
        sizes = [s.stop - s.start + 1 for s in split_rows(n, int(spec.partition(":")[2]))]
        e = [1] + [0] * k                     # elementary symmetric polynomials e_0..e_k of sizes
        for s in sizes:
            for j in range(k, 0, -1):
                e[j] += s * e[j - 1]
        return e[k] / math.comb(m, k)
    raise ValueError(f"no closed form for code {spec!r}")


def survival(code, k: int, max_patterns: int, rng) -> tuple:
    """``(decodable, patterns, exact)``: ``k``-failure sets after which ``code`` decodes."""
    m = code.size
    everything = frozenset(range(m))
    total = math.comb(m, k)
    if total <= max_patterns:
        ok = sum(code.decodable(everything.difference(lost)) for lost in itertools.combinations(range(m), k))
        return ok, total, True
    ok = sum(code.decodable(everything.difference(rng.choice(m, size=k, replace=False).tolist()))
             for _ in range(max_patterns))
    return ok, max_patterns, False


def p_survive(fractions: dict, m: int, p: float) -> float:
    """``P(every data block decodable)`` with i.i.d. failures of probability ``p`` on ``m`` devices."""
    return float(sum(math.comb(m, k) * p ** k * (1 - p) ** (m - k) * f for k, f in fractions.items()))


def _time_decode(code, replies: dict, repeat: int) -> float:
    code.decode(replies)                       # builds and caches the recipe
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        code.decode(replies)
        best = min(best, time.perf_counter() - t)
    return best


def _worst_losses(code, count: int) -> list:
    """Data blocks to lose: ``count`` of them, one per group for group codes (decodable)."""
    if code.kind == "groups":
        groups = [np.flatnonzero(row).tolist() for row in code.parity]
        return [g[0] for g in groups[:count]]
    return list(range(count))


def decode_error(code, rows: int, cols: int, L: int, rng) -> tuple:
    """``(worst relative error of decoded blocks, relative error of the direct float32 product)``.

    Workers compute in float32 from float32 weights (parity weights encoded offline in float64,
    stored in float32); errors are ``max |Y - Y64| / max |Y64|`` against the float64 product of
    the float32 weights, worst over every loss pattern of ``code.tolerance`` blocks.
    """
    n = code.n
    W = (rng.standard_normal((n * rows, cols)) * math.sqrt(2 / cols)).astype(np.float32)
    X = rng.random((cols, L), dtype=np.float32)
    pairs = encode_rows(W, None, code, split_rows(n * rows, n))
    replies = {k: Wk @ X for k, (Wk, _) in enumerate(pairs)}
    exact = [Wk.astype(np.float64) @ X.astype(np.float64) for Wk, _ in pairs[:n]]
    scale = max(float(np.abs(e).max()) for e in exact)
    direct = max(float(np.abs(replies[i] - exact[i]).max()) for i in range(n)) / scale
    worst = 0.0
    everything = frozenset(range(code.size))
    for lost in itertools.combinations(range(code.size), code.r):
        got = {k: v for k, v in replies.items() if k not in lost}
        if not code.decodable(everything.difference(lost)):
            continue
        blocks = code.decode(got)
        for i in lost:
            if i < n:
                worst = max(worst, float(np.abs(blocks[i] - exact[i]).max()) / scale)
    return worst, direct


_COLORS = {"none": "0.4", "sum": "tab:blue", "groups:2": "tab:orange", "mds r=2": "tab:green",
           "groups:3": "tab:red", "mds r=3": "tab:purple"}
_EXTRA = ["tab:brown", "tab:cyan", "tab:olive", "tab:pink"]


def _style(label: str) -> dict:
    """Same colour, marker and line style for a code in every panel of both figures."""
    base = label.partition(":")[0].partition(" ")[0]
    color = _COLORS.get(label) or _EXTRA[hash(label) % len(_EXTRA)]
    return dict(color=color, ls="--" if base == "groups" else "-",
                marker={"none": "x", "sum": "o", "groups": "^"}.get(base, "s"))


def plot_survival(surv: list, rel: list, ns: list, rs: list, path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(ns) + 1, figsize=(4 * (len(ns) + 1), 3.4), squeeze=False)
    for ax, n in zip(axes.flat, ns):
        for label in dict.fromkeys(r["code"] for r in surv if r["n"] == n):
            pts = sorted((r["k"], r["fraction"]) for r in surv if r["n"] == n and r["code"] == label)
            x, y = zip(*pts)
            ax.plot(x, [100 * v for v in y], ms=4, label=label, **_style(label))
        ax.set_title(f"n = {n} data workers", fontsize=9)
        ax.set_xlabel("failed devices k (data or parity)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("k-failure sets survived (%)")
    axes.flat[0].legend(fontsize=7)
    ax = axes.flat[len(ns)]
    n = ns[len(ns) // 2]
    for label in dict.fromkeys(r["code"] for r in rel if r["n"] == n):
        pts = sorted((r["p"], r["p_fail"]) for r in rel if r["n"] == n and r["code"] == label)
        x, y = zip(*pts)
        ax.loglog(x, np.maximum(y, 1e-16), ms=3, label=label, **_style(label))
    ax.set_title(f"n = {n}: request fails (i.i.d. device failures)", fontsize=9)
    ax.set_xlabel("failure probability per device p")
    ax.set_ylabel("P(request undecodable)")
    ax.set_ylim(1e-10, 1.5)
    ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"MDS vs multi-group parity at equal parity devices r = {', '.join(map(str, rs))}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_decode(lat: list, dec: list, delays: list, path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(delays) + 2, figsize=(4 * (len(delays) + 2), 3.4), squeeze=False)
    for ax, delay in zip(axes.flat, delays):
        for label in dict.fromkeys(r["code"] for r in lat if r["delay"] == delay):
            pts = sorted((r["n"], r["p99_s"]) for r in lat if r["delay"] == delay and r["code"] == label)
            x, y = zip(*pts)
            ax.plot(x, y, ms=4, label=label, **_style(label))
        ax.set_title(f"AlexNet, rpi3, delay {delay}: p99", fontsize=9)
        ax.set_xlabel("data workers n")
        ax.set_ylabel("p99 latency (s)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax, (key, ylabel) in zip(list(axes.flat)[len(delays):], (("decode_us", "decode time (us)"),
                                                                  ("float32_rel_error", "relative decode error"))):
        layer = DECODE_LAYERS[0]
        for label in dict.fromkeys(r["code"] for r in dec):
            pts = sorted((r["n"], r[key]) for r in dec if r["code"] == label and r["layer"] == layer
                         and r["missing"] == r["parity"])
            if pts:
                x, y = zip(*pts)
                ax.semilogy(x, y, ms=4, label=label, **_style(label))
        if key == "float32_rel_error":
            by_n: dict = {}
            for r in dec:
                by_n.setdefault(r["n"], []).append(r["direct_rel_error"])
            x = sorted(by_n)
            ax.semilogy(x, [max(by_n[v]) for v in x], "k:", label="direct float32 product")
        ax.set_title((f"decode r lost {layer} blocks (this machine)" if key == "decode_us"
                      else "float32 decode error, worst pattern"), fontsize=9)
        ax.set_xlabel("data workers n")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle("MDS vs multi-group parity: tail latency (simulator), decode cost and float32 error", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str, name: str) -> list:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} {text!r}: expected positive integers")
    return values


def main(argv=None) -> int:
    p = common.parser(NAME, "MDS vs multi-group parity at equal extra devices: survival of k failures, "
                            "tail latency under stragglers, decode cost and float32 decode error.")
    p.add_argument("--n", default="4,8,12", help="data worker counts (default 4,8,12)")
    p.add_argument("--r", default="2,3", help="parity device counts (default 2,3)")
    p.add_argument("--model", default="alexnet", help="zoo model for the latency simulation (default alexnet)")
    p.add_argument("--device", default="rpi3", help="simulated device (default rpi3)")
    p.add_argument("--delays", default=",".join(DELAYS).replace(",shexp", ";shexp"),
                   help="straggler delay models separated by ';' (default 'wifi:0.05;shexp:0.01,0.05')")
    p.add_argument("--requests", type=int, default=None, help="simulated requests (default 20000, quick 2000)")
    p.add_argument("--fail-prob", type=float, default=0.05,
                   help="per-device failure probability of the simulator cross-check (default 0.05)")
    p.add_argument("--max-patterns", type=int, default=200000,
                   help="enumerate failure sets exactly up to this many, else sample as many (default 200000)")
    args = p.parse_args(argv)
    try:
        ns, rs = _ints(args.n, "--n"), _ints(args.r, "--r")
    except ValueError as exc:
        p.error(str(exc))
    delays = [d for d in args.delays.split(";") if d]
    requests = args.requests or (2000 if args.quick else 20000)
    out = common.out_dir(args.out)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()

    # 1. survival of k failures, closed forms, i.i.d. reliability
    surv, rel, codes = [], [], {}
    for n in ns:
        seen = set()
        for r in rs:
            for label, spec, rr in code_set(n, r):
                if label in seen or rr > n and spec.startswith("groups"):
                    continue
                seen.add(label)
                code = _code(spec, n, rr)
                codes[(n, label)] = code
                kmax = min(code.size, max(rs) + 2)
                fractions = {}
                for k in range(kmax + 1):
                    ok, total, exact = survival(code, k, args.max_patterns, rng)
                    fractions[k] = ok / total
                    surv.append({"n": n, "r": rr, "code": label, "k": k, "patterns": total, "survived": ok,
                                 "fraction": round(ok / total, 8), "exact": exact,
                                 "closed_form": round(closed_form(spec, n, rr, k), 8),
                                 "tolerance": code.tolerance})
                # survival is 0 beyond kmax for these codes (at most r failures, one per group)
                for pf in P_GRID:
                    ps = p_survive(fractions, code.size, pf)
                    rel.append({"n": n, "r": rr, "code": label, "devices": code.size, "p": pf,
                                "p_survive": ps, "p_fail": max(0.0, 1 - ps)})
    common.write_csv(out / "survival.csv", surv)
    common.write_csv(out / "reliability.csv", rel)
    t_surv = time.perf_counter() - t0

    # 2. tail latency under stragglers (simulator) and the fail_prob cross-check
    model = get_model(args.model)
    lat, simf = [], []
    for index, ((n, label), code) in enumerate(codes.items()):
        spec = {"none": "none", "sum": "sum"}.get(label, code.spec)
        plan = make_plan(model, n, code.r if code.r else None, spec)
        for delay in delays:
            res = simulate(model, plan, requests=requests, device=args.device, delay=delay, seed=args.seed)
            s = res.summary()
            lat.append({"model": model.name, "device": args.device, "n": n, "r": code.r, "code": label,
                        "delay": delay, "requests": requests, "mean_s": round(s["mean"], 6),
                        "p50_s": round(s["p50"], 6), "p95_s": round(s["p95"], 6), "p99_s": round(s["p99"], 6),
                        "success_rate": s["success_rate"]})
        res = simulate(model, plan, requests=requests, device=args.device, fail_prob=args.fail_prob,
                       seed=args.seed + 1 + index)      # independent failure streams per configuration
        fr = {r["k"]: r["fraction"] for r in surv if r["n"] == n and r["code"] == label}
        analytic = p_survive(fr, code.size, args.fail_prob)
        rate = float(res.ok.mean())
        se = math.sqrt(max(analytic * (1 - analytic), 1e-12) / requests)
        simf.append({"n": n, "r": code.r, "code": label, "p": args.fail_prob, "requests": requests,
                     "sim_success": rate, "analytic_survive": round(analytic, 6),
                     "z_score": round((rate - analytic) / se, 2)})
    common.write_csv(out / "latency.csv", lat)
    common.write_csv(out / "sim_failures.csv", simf)
    t_sim = time.perf_counter() - t0 - t_surv

    # 3 + 4. decode cost on this machine and float32 decode error
    shapes, out_shapes = model.weight_shapes(), model.shapes()
    repeat = 5 if args.quick else 30
    dec = []
    for (n, label), code in codes.items():
        if code.r < 2 or label == "sum":
            continue
        err, direct = decode_error(code, 32 if args.quick else 64, 256 if args.quick else 512, 64, rng)
        for layer in DECODE_LAYERS:
            rows, _ = shapes[layer]
            L = math.prod(out_shapes[layer][1:])
            brows = -(-rows // n)
            blocks = [rng.standard_normal((brows, L)).astype(np.float32) for _ in range(n)]
            replies = dict(enumerate(blocks + code.encode(blocks)))
            for missing in sorted({1, code.r}):
                lost = _worst_losses(code, missing)
                got = {k: v for k, v in replies.items() if k not in lost}
                seconds = _time_decode(code, got, repeat)
                if code.kind == "groups":
                    groups = [np.flatnonzero(row).tolist() for row in code.parity]
                    reads = sum(len(g) for g in groups if set(g) & set(lost))
                else:
                    reads = n
                dec.append({"n": n, "parity": code.r, "code": label, "layer": layer, "block_rows": brows,
                            "columns": L, "missing": missing, "replies_read": reads,
                            "decode_us": round(1e6 * seconds, 2),
                            "float32_rel_error": err, "direct_rel_error": direct,
                            "worst_condition": round(code.worst_condition(), 4)})
    common.write_csv(out / "decode.csv", dec)

    plot_survival(surv, rel, ns, rs, out / "mds_survival.png")
    plot_latency_decode(lat, dec, delays, out / "mds_latency_decode.png")

    # summary
    def frac(n, label, k):
        return next((r["fraction"] for r in surv if r["n"] == n and r["code"] == label and r["k"] == k), math.nan)

    def p99(n, label, delay):
        return next((r["p99_s"] for r in lat if r["n"] == n and r["code"] == label and r["delay"] == delay), math.nan)

    def dus(n, label, layer="conv2"):
        return next((r["decode_us"] for r in dec if r["n"] == n and r["code"] == label and r["layer"] == layer
                     and r["missing"] == r["parity"]), math.nan)

    closed_ok = all(abs(r["fraction"] - r["closed_form"]) < 1e-9 for r in surv if r["exact"])
    rmax, nmid = max(rs), ns[len(ns) // 2]
    pf = args.fail_prob
    relf = {label: next(r["p_fail"] for r in rel if r["n"] == nmid and r["code"] == label and r["p"] == P_HEADLINE)
            for label in ("none", "sum", f"groups:{rmax}", f"mds r={rmax}")}
    d0 = delays[0]
    errs = {label: max((r["float32_rel_error"] for r in dec if r["code"] == label), default=math.nan)
            for label in dict.fromkeys(r["code"] for r in dec)}
    text = (
        f"MDS vs multi-group parity ({'quick' if args.quick else 'full'}; n = {args.n}, r = {args.r}): "
        f"with r = {rmax} parity devices over n = {nmid} workers, groups:{rmax} survives "
        + ", ".join(f"{100 * frac(nmid, f'groups:{rmax}', k):.1f}%" for k in range(1, rmax + 2))
        + f" of the 1..{rmax + 1}-failure sets and MDS "
        + ", ".join(f"{100 * frac(nmid, f'mds r={rmax}', k):.0f}%" for k in range(1, rmax + 2))
        + f" (enumeration {'matches' if closed_ok else 'DOES NOT match'} the closed forms for every exact count); "
        f"at p = {P_HEADLINE:g} per device a request fails with probability {relf['none']:.1e} uncoded, "
        f"{relf['sum']:.1e} with a sum parity, {relf[f'groups:{rmax}']:.1e} with groups:{rmax} and "
        f"{relf[f'mds r={rmax}']:.1e} with MDS r={rmax}; the simulator's fail_prob={pf:g} success rates are within "
        f"{max(abs(r['z_score']) for r in simf):.1f} standard errors of the exact values. Simulated {model.name} on "
        f"{args.device} ({requests} requests, delay {d0}): p99 latency at n = {nmid} is "
        f"{p99(nmid, 'none', d0):.2f} s uncoded, {p99(nmid, 'sum', d0):.2f} s sum, "
        + ", ".join(f"{p99(nmid, f'groups:{r}', d0):.2f} s groups:{r} vs {p99(nmid, f'mds r={r}', d0):.2f} s mds r={r}"
                    for r in rs)
        + f". Decoding r lost {DECODE_LAYERS[0]} blocks here takes "
        + ", ".join(f"{dus(nmid, f'groups:{r}'):.0f} us (groups:{r}) vs {dus(nmid, f'mds r={r}'):.0f} us (mds r={r})"
                    for r in rs)
        + f" at n = {nmid}; worst float32 decode error (relative) "
        + ", ".join(f"{label} {e:.1e}" for label, e in errs.items() if label.startswith("mds") or
                    label.startswith("groups"))
        + f". Total {time.perf_counter() - t0:.0f} s (survival {t_surv:.1f} s, simulation {t_sim:.1f} s); data in {out}.")
    common.summary(text, out)
    return 0 if closed_ok else 1


if __name__ == "__main__":
    sys.exit(main())
