"""Fig. 3: coverage of one device failure against additional devices, 2MR vs CDC+2MR.

A thin job around :mod:`mpicdc.sim.coverage` (the planner; its model and our reconstruction of the
paper's five distributions are described in ``docs/coverage.md``).  For each distribution --
(a) AlexNet on 5, (b) action recognition on 8, (c) C3D on 7, (d) C3D on 9, (e) VGG16 on 8
devices -- it writes the coverage after 0, 1, ... additional devices for 2MR (one replica per
device) and CDC+2MR (one parity device per split part, replicas for solo devices), the number of
devices each needs for full coverage, the parts (which layers run on which devices, with their
per-device GFLOP and MB) and the greedy order of additions.  Everything is computed exactly; the
job takes well under a second, so ``--quick`` changes nothing.

Outputs in ``--out`` (default ``results/fig3``): ``coverage.csv``, ``full_coverage.csv``,
``parts.csv``, ``additions.csv``, ``fig3_coverage.png`` and ``summary.txt``.
"""
from __future__ import annotations

import math
import sys

from mpicdc.experiments import common
from mpicdc.sim import coverage as cov

NAME = "fig3"
LABELS = {"2mr": "2MR", "cdc+2mr": "CDC+2MR"}


def tables(population: str) -> dict:
    """The job's CSV tables (lists of dicts) for one failure population."""
    curves, full, parts, adds = [], [], [], []
    for dist in cov.DISTRIBUTIONS.values():
        need = {m: cov.devices_for_full_coverage(dist, m) for m in cov.METHODS}
        extra = max(need.values())
        for method in cov.METHODS:
            for k, c in enumerate(cov.coverage_curve(dist, method, extra=extra, population=population)):
                curves.append({"distribution": dist.name, "title": dist.title, "model": dist.model,
                               "devices": dist.devices, "method": LABELS[method], "population": population,
                               "extra_devices": k, "coverage": round(c, 6)})
            for order, (what, covered) in enumerate(cov.additions(dist, method), 1):
                adds.append({"distribution": dist.name, "method": LABELS[method], "order": order, "added": what,
                             "devices_covered": " ".join(map(str, covered))})
        full.append({"distribution": dist.name, "title": dist.title, "model": dist.model, "devices": dist.devices,
                     "split_parts": sum(p.split for p in dist.parts),
                     "solo_devices": sum(len(p.devices) for p in dist.parts if not p.split),
                     "full_2mr": need["2mr"], "full_cdc_2mr": need["cdc+2mr"],
                     "saving_percent": round(100 * (1 - need["cdc+2mr"] / need["2mr"]), 1)})
        for i, load in enumerate(cov.part_loads(dist), 1):
            parts.append({"distribution": dist.name, "part": i, "layers": " ".join(load["layers"]),
                          "devices": " ".join(map(str, load["devices"])), "split": len(load["devices"]) > 1,
                          "gflop_per_device": round(load["gflop_per_device"], 4),
                          "weights_MB_per_device": round(load["weights_MB_per_device"], 3)})
    return {"coverage": curves, "full": full, "parts": parts, "additions": adds}


def plot(curves: list, full: list, path, population: str) -> None:
    plt = common.pyplot()
    names = [row["distribution"] for row in full]
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.3), squeeze=False)
    style = {"2MR": dict(color="tab:red", marker="o", ls="--"),
             "CDC+2MR": dict(color="tab:blue", marker="s", ls="-")}
    for ax, row in zip(axes.flat, full):
        for method, kw in style.items():
            pts = [(c["extra_devices"], c["coverage"]) for c in curves
                   if c["distribution"] == row["distribution"] and c["method"] == method]
            x, y = zip(*pts)
            ax.plot(x, [100 * v for v in y], ms=4, label=method, **kw)
        for key, method in (("full_2mr", "2MR"), ("full_cdc_2mr", "CDC+2MR")):
            ax.axvline(row[key], color=style[method]["color"], lw=0.7, alpha=0.5)
        ax.set_title(f"{row['title']}\nfull: 2MR {row['full_2mr']}, CDC+2MR {row['full_cdc_2mr']}", fontsize=9)
        ax.set_xlabel("additional devices")
        ax.set_xticks(range(0, row["full_2mr"] + 1))
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("coverage of one failure (%)")
    axes.flat[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Fig. 3: coverage of one device failure, equal failure probability per device "
                 f"(population: {population})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = common.parser(NAME, "Fig. 3: coverage of one device failure against additional devices, "
                            "2MR vs CDC+2MR, for the paper's five distributions (see docs/coverage.md).")
    p.add_argument("--population", choices=cov.POPULATIONS, default="original",
                   help="which devices can fail: the original ones (default) or also the added ones")
    args = p.parse_args(argv)
    out = common.out_dir(args.out)
    t = tables(args.population)
    common.write_csv(out / "coverage.csv", t["coverage"])
    common.write_csv(out / "full_coverage.csv", t["full"])
    common.write_csv(out / "parts.csv", t["parts"])
    common.write_csv(out / "additions.csv", t["additions"])
    plot(t["coverage"], t["full"], out / "fig3_coverage.png", args.population)
    tot2, totc = sum(r["full_2mr"] for r in t["full"]), sum(r["full_cdc_2mr"] for r in t["full"])
    first = {r["distribution"]: (cov.coverage_curve(r["distribution"], "2mr", extra=1)[1],
                                 cov.coverage_curve(r["distribution"], "cdc+2mr", extra=1)[1]) for r in t["full"]}
    text = (
        "Fig. 3: additional devices for full coverage of one device failure, 2MR vs CDC+2MR: "
        + "; ".join(f"{r['title'][4:]} {r['full_2mr']} vs {r['full_cdc_2mr']}" for r in t["full"])
        + f" ({tot2} vs {totc} in all, {100 * (1 - totc / tot2):.0f}% fewer with CDC; per distribution "
        f"{min(r['saving_percent'] for r in t['full']):.1f}-{max(r['saving_percent'] for r in t['full']):.1f}% "
        f"fewer). With one additional device, coverage is "
        + ", ".join(f"{100 * a:.0f}% vs {100 * b:.0f}%" for a, b in first.values())
        + f" (population {args.population}: "
        + ("only the original devices fail" if args.population == "original" else "added devices fail too")
        + "). The distributions are our reconstruction of the paper's (docs/coverage.md); data in "
        f"{out}/coverage.csv, parts in {out}/parts.csv, plot {out}/fig3_coverage.png.")
    common.summary(text, out)
    return 0 if all(r["full_cdc_2mr"] <= r["full_2mr"] for r in t["full"]) and math.isfinite(tot2) else 1


if __name__ == "__main__":
    sys.exit(main())
