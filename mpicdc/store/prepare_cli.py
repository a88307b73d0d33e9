"""``python -m mpicdc.prepare``: cut a model's weights into one HDF5 shard file per MPI rank.

See ``python -m mpicdc.prepare --help`` and ``docs/weights.md``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from mpicdc.core.ranges import parse_ranges

PROG = "python -m mpicdc.prepare"

DESCRIPTION = """\
Cut a model's weights into one HDF5 file per MPI rank, with parity blocks computed offline.

Rank 0 is the master, ranks 1..N the data workers, N+1..N+R the parity workers, so the shards
run on a world of 1+N+R ranks (-np 1+N+R; the launch lines are printed at the end). Every conv
and fc layer is split by output rows over the data workers; parity workers hold encoded blocks (e.g. the sum of all data blocks)
so the master can rebuild the reply of a worker that is slow or dead. A grouped convolution is split by whole
groups and protected the cheapest way: coded, replicated (2MR) or computed by the master (depthwise ones);
--dry-run and --show print each option's cost (docs/codes.md). Output: manifest.h5 and
rank-NNN.h5 (one per rank) in OUT/<model>-<plan tag>/ (default weights/), or exactly in --dir.
Each device needs manifest.h5 and its own rank file only."""

EPILOG = """\
codes (--code; default sum, as python -m mpicdc.run and python -m mpicdc.sim):
  sum              one parity worker holding W_1 + ... + W_N: any 1 loss (R = 1, the paper)
  none             no parity: every data worker is needed (R = 0)
  groups:G         G parity workers, one sum per group of data workers: 1 loss per group (R = G)
  replication      R parity workers copying the first R data blocks (ranks 1..R; 2MR when R = N);
                   needs --parity R
  mds              any R losses, well-conditioned real MDS code; needs --parity R
  also: replication:i,j (copy those blocks), groups:0-2/3-5 (explicit groups), mds-NAME
  (another MDS construction); see mpicdc.core.codes

examples:
  # the default job of python -m mpicdc.run: 4 data workers plus one sum-parity worker, 6 ranks
  %(prog)s vgg16 --workers 4
  # VGG16 over 10 data workers plus one sum-parity worker: 12 ranks
  %(prog)s vgg16 --workers 10
  # survive any 2 lost workers out of 12
  %(prog)s vgg16 --workers 10 --parity 2 --code mds
  # look at the plan first (nothing is written), with the modeled latency of each layer
  %(prog)s alexnet --workers 4 --code groups:2 --dry-run
  # network-aware: keep on the master the layers a 100 Mbit/s link makes slower to distribute
  %(prog)s vgg16 --workers 4 --plan auto --device rpi3 --link 100mbit --dry-run
  # keep fc8 on the master, run fc6 on ranks 1-3 only, rank 4 twice as fast as the others
  %(prog)s alexnet --workers 4 --code sum --keep-on-master fc8 \\
      --layer-workers fc6=1-3 --speeds 1,1,1,2
  # trained weights from a file instead of seeded random ones
  %(prog)s lenet --workers 3 --code sum --source lenet.onnx --dir /srv/lenet-shards
  # a model that is not in the zoo: its graph comes from the file, its name from the file name
  # (tumor_vgg16 here) or from MODEL
  %(prog)s --workers 4 --source tumor_vgg16.onnx
  # then run it as prepare says, e.g. on this machine (any number of ranks):
  python -m mpicdc.launch -np 12 vgg16 --weights weights/vgg16-w10-p1-sum
  # what is in a prepared folder, and is every file intact?
  %(prog)s --show weights/vgg16-w10-p1-sum
  %(prog)s --verify weights/vgg16-w10-p1-sum
  # on the device of rank 3, which holds manifest.h5 and rank-003.h5 only
  %(prog)s --verify weights/vgg16-w10-p1-sum --rank 3

exit status: 0 success, 1 data error (damaged or missing files, unreadable source),
2 usage error (bad option, unknown model, impossible plan)."""


class UsageError(Exception):
    """Bad command-line input: reported without a traceback, exit status 2."""


def _comma_list(text: str) -> list:
    return [x.strip() for x in text.split(",") if x.strip()]


def _rank_list(text: str, what: str) -> list:
    """``"1,2,5-7"`` -> ``[1, 2, 5, 6, 7]``; empty items are skipped, like in the other lists."""
    items = _comma_list(text)
    if not items:
        raise UsageError(f"{what}: no ranks given")
    try:
        return parse_ranges(",".join(items), "rank")
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    from mpicdc.core.models import model_names

    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help=f"zoo model ({', '.join(model_names())}). With --source FILE: a zoo model puts the "
                        "file's weights onto that architecture (needed for weights-only files); any other "
                        "name is the name of the model imported from a file that holds its graph (ONNX, Keras "
                        "full model). Without MODEL such a file's model is named after the file: "
                        "tumor_vgg16.onnx -> tumor_vgg16 (the name in the folder, the manifest and the "
                        "printed commands)")
    g = p.add_argument_group("plan")
    g.add_argument("-n", "--workers", type=int, metavar="N",
                   help="data workers (ranks 1..N); 0: one rank doing everything (the one-device baseline, "
                        "run with --workers 0 on one rank)")
    g.add_argument("-r", "--parity", type=int, metavar="R",
                   help="parity workers (ranks N+1..N+R); implied by --code none/sum/groups:G")
    g.add_argument("--code", default="sum", metavar="SPEC",
                   help="sum, none, groups:G, replication or mds (default: sum, as run and sim); see 'codes' below")
    g.add_argument("--keep-on-master", action="append", default=[], metavar="LAYER[,LAYER]",
                   help="linear layers the master computes itself (repeatable)")
    g.add_argument("--layer-workers", action="append", default=[], metavar="LAYER=RANKS",
                   help="run LAYER on these data ranks only, e.g. fc6=1,2,3 or fc6=1-3 (repeatable); "
                        "parity workers serve every layer")
    g.add_argument("--speeds", metavar="S1,S2,...",
                   help="relative speed of each data worker: row blocks proportional to it")
    g.add_argument("--bands", action="append", default=[], metavar="LAYER[,LAYER]",
                   help="conv layers split into bands of their output height instead of by output channels: each "
                        "rank gets only its band of the input and holds the whole kernel (repeatable; "
                        "docs/codes.md#band-split)")
    g.add_argument("--min-rows", type=int, default=1, metavar="K",
                   help="layers with fewer than K output rows per worker stay on the master (default 1)")
    g.add_argument("--plan", choices=("even", "auto"), default="even",
                   help="even: split every conv and fc layer (default); auto: split a layer only where the "
                        "simulator models it faster than the master alone on --device and --link, by output "
                        "channels or (a conv) into bands, whichever models faster, within each device's memory "
                        "(mpicdc.sim.autoplan)")
    g.add_argument("--device", default="rpi3", metavar="NAME",
                   help="device model of every rank for --plan auto and the modeled latency printed by "
                        "--dry-run and --show (default rpi3; see python -m mpicdc.sim --help)")
    g.add_argument("--link", metavar="RATE",
                   help="the master's link rate for --plan auto and the modeled latency: 100mbit, 20mbit, "
                        "1gbit, ... (default: the device's own link)")
    s = p.add_argument_group("weights and output")
    s.add_argument("--source", default="random", metavar="random|FILE",
                   help="'random' (seeded He init, default) or a weight file (ONNX, Keras HDF5, PyTorch, npz)")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="seed of random weights (default 0)")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--out", default="weights", metavar="ROOT",
                     help="write into ROOT/<model>-<plan tag>/ (default: weights)")
    out.add_argument("--dir", metavar="DIR", help="write into exactly this folder instead")
    s.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="when another prepare is writing the same folder, wait up to SECONDS for it "
                        "(default 0: stop at once with an error naming that process)")
    s.add_argument("--dry-run", action="store_true", help="print the plan table and the folder; write nothing")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    m = p.add_argument_group("inspect a prepared folder (instead of MODEL)")
    m.add_argument("--show", metavar="DIR", help="print the plan as a table with per-rank totals and files")
    m.add_argument("--verify", metavar="DIR", help="check every file; print OK or the problems (exit 1)")
    m.add_argument("--rank", action="append", type=int, metavar="K",
                   help="with --verify: check only rank K's shard (and the manifest), e.g. on the device "
                        "that holds just that file (repeatable)")
    return p


def _make_plan(args, model):
    from mpicdc.core.plan import make_plan, parity_count

    if args.workers is None:
        raise UsageError("--workers N is required (the number of data workers, ranks 1..N)")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 (one device doing everything) or more, got {args.workers}")
    if args.workers == 0:
        if args.plan == "auto" or args.keep_on_master or args.layer_workers or args.speeds or args.parity or args.bands:
            raise UsageError("--workers 0 keeps every layer on the master (one device): drop --plan auto, "
                             "--keep-on-master, --layer-workers, --speeds and --parity")
        from mpicdc.core.plan import single_device_plan
        return single_device_plan(model)
    if args.parity is not None and args.parity < 0:
        raise UsageError(f"--parity must be 0 or more, got {args.parity}")
    if args.min_rows < 1:
        raise UsageError(f"--min-rows must be at least 1, got {args.min_rows}")
    try:
        parity_count(args.code, args.parity)
    except ValueError as exc:
        raise UsageError(f"bad --code {args.code!r}: {exc}") from None
    keep = [name for item in args.keep_on_master for name in _comma_list(item)]
    bands = [name for item in args.bands for name in _comma_list(item)]
    layer_workers = {}
    for item in args.layer_workers:
        name, sep, ranks = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--layer-workers {item!r}: expected LAYER=RANKS, e.g. fc6=1,2,3")
        layer_workers[name.strip()] = _rank_list(ranks, f"--layer-workers {item}")
    speeds = None
    if args.speeds:
        try:
            speeds = [float(x) for x in _comma_list(args.speeds)]
        except ValueError:
            raise UsageError(f"--speeds {args.speeds!r}: expected numbers separated by commas, e.g. 1,1,2") from None
        if any(not x > 0 for x in speeds):
            raise UsageError(f"--speeds {args.speeds!r}: every speed must be positive")
    try:
        if args.plan == "auto":
            if keep or layer_workers or bands or args.min_rows != 1:
                raise UsageError("--plan auto chooses which layers stay on the master and how the others are split "
                                 "over every data worker: drop --keep-on-master, --layer-workers, --bands and "
                                 "--min-rows")
            from mpicdc.sim.autoplan import auto_plan
            return auto_plan(model, args.workers, args.code, args.device, args.link, parity=args.parity,
                             speeds=speeds)
        return make_plan(model, args.workers, args.parity, args.code, keep_on_master=keep,
                         layer_workers=layer_workers or None, speeds=speeds, min_rows_per_worker=args.min_rows,
                         bands=bands)
    except ImportError as exc:
        raise UsageError(f"cannot build codes: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"impossible plan ({model.name}, --workers {args.workers}, --code {args.code}): {exc}") from None


def _load_model(args):
    """``(model, weights or None)``: a zoo model, or the graph and weights of ``--source FILE``."""
    from mpicdc.core.models import UnknownModelError, get_model

    if args.source == "random":
        if not args.model:
            raise UsageError("MODEL is required (or --show DIR / --verify DIR); see --help")
        try:
            return get_model(args.model), None
        except UnknownModelError as exc:
            raise UsageError(str(exc)) from None
    if not Path(args.source).is_file():
        raise UsageError(f"--source {args.source!r}: no such file (use 'random' or a weight file)")
    try:
        from mpicdc.store.importers import load_source
    except ImportError as exc:
        raise UsageError(f"--source FILE needs mpicdc.store.importers, which cannot be imported here ({exc}); "
                         "use --source random") from None
    from mpicdc.core.models import model_names
    if args.model is None or args.model in model_names():
        return load_source(args.source, model_name=args.model)
    # not a zoo model: the name of the model the file's own graph describes
    from dataclasses import replace

    from mpicdc.store.importers import ModelImportError
    from mpicdc.store.importers.common import sanitize_name
    if sanitize_name(args.model) != args.model:
        raise UsageError(f"MODEL {args.model!r}: a model name may hold only letters, digits, '_', '.' and '-'")
    try:
        model, weights = load_source(args.source)
    except ModelImportError as exc:
        if "weights only" not in str(exc):
            raise
        raise UsageError(f"{args.model!r} is not a zoo model ({', '.join(model_names())}) and {args.source} "
                         f"holds weights only: name the zoo architecture they belong to") from None
    return replace(model, name=args.model), weights


def _plan_table(plan, model, args, rank_extra=None, extra_header="") -> str:
    """The plan table with each linear layer's modeled time on ``--device``/``--link``, and the total."""
    from mpicdc.core.plan import format_plan_table
    from mpicdc.sim.autoplan import format_costs

    try:
        costs, line = format_costs(model, plan, args.device, args.link)
    except ValueError as exc:
        raise UsageError(f"--device {args.device!r} / --link {args.link!r}: {exc}") from None
    return format_plan_table(plan, model, rank_extra, extra_header, costs, "model ms") + "\n\n" + line


def _show(directory, args) -> str:
    from mpicdc.store import open_manifest

    m = open_manifest(directory)
    seed = "" if m.seed is None else f", seed {m.seed}"
    lines = [f"{m.directory}: {m.model.name}, prepared {m.created or '?'} (format {m.format_version}), "
             f"source {m.source}{seed}"]
    if m.command:
        lines.append(f"command: {m.command}")
    files = {rank: f"{m.files[rank]:<12}  {m.sizes.get(rank, 0):>11,}  {m.checksums[rank][:16]}"
             for rank in range(m.world_size)}
    lines += ["", _plan_table(m.plan, m.model, args, files, f"{'file':<12}  {'bytes':>11}  sha256 (first 16)"), "",
              f"total {m.total_bytes() / 1e6:.2f} MB in {m.world_size} shard files", ""]
    return "\n".join(lines + launch_lines(m.model.name, m.plan, m.directory))


def launch_lines(model_name: str, plan, directory) -> list:
    """How to run prepared shards: the launcher on this machine (any number of ranks: it adds
    ``--oversubscribe`` when they outnumber the cores) and ``mpirun`` over a hostfile of devices."""
    run_args = f"{shlex.quote(model_name)} --weights {shlex.quote(str(directory))}"
    n = plan.world_size
    here, devices = "on this machine:", f"on {n} devices:"
    width = max(len(here), len(devices))
    return [f"run it on {n} ranks (1 master + {plan.workers} data + {plan.parity} parity workers):",
            f"  {here:<{width}}  python -m mpicdc.launch -np {n} {run_args}",
            f"  {devices:<{width}}  mpirun -hostfile HOSTFILE -np {n} python -m mpicdc.run {run_args}",
            (f"  {'':<{width}}  (HOSTFILE: one line per device, {n} slots in all; each device needs manifest.h5 "
             "and its rank-NNN.h5, docs/weights.md)")]


def _run(args, argv) -> int:
    from mpicdc.store import default_dir, open_manifest, prepare, verify

    if args.rank and not args.verify:
        raise UsageError("--rank K goes with --verify DIR")
    if not args.wait >= 0:
        raise UsageError(f"--wait must be 0 or more seconds, got {args.wait}")
    if args.show or args.verify:
        if args.model:
            raise UsageError("--show and --verify take a folder and no MODEL")
        if args.show:
            print(_show(args.show, args))
            return 0
        problems = verify(args.verify, args.rank)
        if problems:
            for problem in problems:
                print(f"problem: {problem}")
            print(f"FAILED: {len(problems)} problem(s) in {args.verify}")
            return 1
        m = open_manifest(args.verify)
        what = _summary(m) if not args.rank else "manifest.h5 + " + ", ".join(m.files[r] for r in args.rank)
        print(f"OK: {args.verify}: {what} verified")
        return 0
    model, weights = _load_model(args)
    plan = _make_plan(args, model)
    out = Path(args.dir) if args.dir else default_dir(model.name, plan, args.out)
    if args.plan == "auto" and not args.dir:  # not the even plan's folder
        out = out.with_name(f"{out.name}-auto")
    if args.dry_run:
        print(_plan_table(plan, model, args))
        print(f"\nwould write {out}/ (manifest.h5, rank-000.h5 .. rank-{plan.world_size - 1:03d}.h5); nothing written")
        return 0
    start = time.perf_counter()
    command = " ".join([PROG] + [shlex.quote(a) for a in argv])
    if weights is None:
        manifest = prepare(model, plan, out, "random", args.seed, progress=None if not args.quiet else False,
                           command=command, wait=args.wait)
    else:
        manifest = prepare(model, plan, out, weights, None, progress=None if not args.quiet else False,
                           source_label=args.source, consume=True, command=command, wait=args.wait)
    if not args.quiet:
        print(f"wrote {out}/: {_summary(manifest)} in {time.perf_counter() - start:.1f} s")
        print("\n".join(launch_lines(model.name, plan, out)))
    return 0


def _summary(m) -> str:
    return (f"manifest.h5 + {m.world_size} shard files ({m.total_bytes() / 1e6:.1f} MB, "
            f"{m.model.name}, plan {m.plan.tag}, source {m.source})")


def main(argv=None) -> int:
    """Entry point of ``python -m mpicdc.prepare``; returns the exit status (0, 1 data error, 2 usage)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)   # exits 2 on syntax errors
    from mpicdc.store import ShardError
    try:
        return _run(args, argv)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (ShardError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was replaced", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
