"""Planning at scale: time of make_plan, the plan table and every rank's blocks, up to 100,000 devices.

Each line plans one model over N data workers (plus the code's parity workers) and times
``make_plan`` (which builds and checks every layer's code), ``format_plan_table`` (what
``prepare --dry-run`` and ``--show`` print, one line per rank) and ``Plan.rank_blocks`` for
every rank (what writing the shards and loading them does).  ``wide`` is a synthetic model
whose first dense layer has 3 rows per worker, so that every worker really holds a block
(the zoo's widest layer has 4096 rows: beyond that, a zoo model's plan keeps every layer on
the master).  All of it must stay linear in N: 10,000 devices plan in well under a second.
"""
from __future__ import annotations

import argparse
import time

EPILOG = """\
examples:
  python -m mpicdc.bench plan                          # vgg16 and wide, N = 100 .. 100000
  python -m mpicdc.bench plan --workers 10000 --code mds --parity 2
  python -m mpicdc.bench plan --models wide --workers 1000,10000,100000
"""


def wide_model(workers: int):
    """A two-layer model whose first layer gives each of ``workers`` data workers 3 rows."""
    from mpicdc.core.models import GraphBuilder

    b = GraphBuilder("wide", (16,), f"synthetic: a {3 * workers}-row dense layer, then 10 classes")
    x = b.dense("input", 3 * workers, name="fc1")
    b.dense(x, 10, name="fc2")
    return b.build()


def time_plan(model, workers: int, parity, code: str) -> dict:
    """Seconds of make_plan, format_plan_table and rank_blocks over every rank, and the plan's shape."""
    from mpicdc.core.plan import format_plan_table, make_plan

    t0 = time.perf_counter()
    plan = make_plan(model, workers, parity, code)
    t1 = time.perf_counter()
    table = format_plan_table(plan, model)
    t2 = time.perf_counter()
    blocks = sum(len(plan.rank_blocks(rank)) for rank in range(plan.world_size))
    t3 = time.perf_counter()
    return {"world": plan.world_size, "layers": len(plan.layers), "blocks": blocks, "table_lines": table.count("\n"),
            "plan_s": t1 - t0, "table_s": t2 - t1, "rank_blocks_s": t3 - t2}


def main(argv=None) -> int:
    from mpicdc.core.models import get_model

    p = argparse.ArgumentParser(prog="python -m mpicdc.bench plan", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg16,wide", help="zoo models and/or 'wide', comma separated "
                                                         "(default vgg16,wide)")
    p.add_argument("--workers", default="100,1000,10000,100000", help="data worker counts, comma separated "
                                                                     "(default 100,1000,10000,100000)")
    p.add_argument("--code", default="sum", help="code spec (default sum)")
    p.add_argument("--parity", type=int, default=None, help="parity workers (needed by mds and replication)")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    print(f"{'model':<8}{'workers':>9}{'world':>9}{'layers':>8}{'blocks':>9}{'plan s':>9}{'table s':>9}"
          f"{'blocks s':>10}")
    for name in [x.strip() for x in args.models.split(",") if x.strip()]:
        for n in counts:
            model = wide_model(n) if name == "wide" else get_model(name)
            t = time_plan(model, n, args.parity, args.code)
            print(f"{name:<8}{n:>9}{t['world']:>9}{t['layers']:>8}{t['blocks']:>9}{t['plan_s']:>9.3f}"
                  f"{t['table_s']:>9.3f}{t['rank_blocks_s']:>10.3f}", flush=True)
    return 0
