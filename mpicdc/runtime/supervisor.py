"""``python -m mpicdc.launch --supervise ...``: relaunch a job that ended abnormally, replaying what it left unanswered.

Coded computing hides a lost device *inside* the job, while the runtime lets the job live.  When
it does not (PRRTE ends the whole job when a node's daemon dies, and ``mpirun`` returns 0; the
master dies; more ranks are lost than the code tolerates, exit 4), the supervisor, outside MPI,
takes over:

1. every attempt runs with ``--journal`` (one fsynced line per answered request, see
   :mod:`mpicdc.runtime.journal`) and ``--request-ids`` set to the requests not yet answered;
2. an attempt ends *normally* when the journal holds every one of its requests as answered; any
   other end (no exit code from the master, a non-zero code, requests missing, no answer for
   ``--stall-timeout`` seconds) is abnormal;
3. then the devices still usable are found: hostfile hosts that fail a short TCP probe are
   dropped (a refused connection counts as alive: the host answered), as is the device of every
   rank the master reported lost; on one machine every host is reachable;
4. a plan for the new world size is taken: the same folder if the size did not change, else a
   folder prepared in advance (``--plan DIR``), else random-weight shards cut on the spot
   (:func:`mpicdc.store.ensure_prepared`, only for random weights: imported weights cannot be
   re-cut without their source, so they need ``--plan``);
5. the job is relaunched with the unanswered ids, at most ``--relaunches`` times, each attempt
   ended when it answers nothing for ``--stall-timeout`` seconds.  One line per relaunch says
   why, on which hosts, how many requests are left.

Exit code: 0 when every request was answered (and matched with ``--check``), 1 when all were
answered but a check failed, 2 when the first attempt could not start (bad options, weights),
:data:`GAVE_UP` (5) when requests were still unanswered after the last relaunch or no usable
plan was left, 128 + N on signal N.  ``--inject`` faults apply to the first attempt only.
"""
from __future__ import annotations

import json
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpicdc.core.ranges import format_ranges
from mpicdc.runtime.journal import decode_output, read_journal, request_ids
from mpicdc.runtime.launch import mpirun_command, run_once

GAVE_UP = 5
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", socket.gethostname()}


@dataclass(frozen=True)
class SuperviseConfig:
    """The supervisor's own settings (``python -m mpicdc.launch --supervise --help``)."""

    np: int
    hostfile: str | None = None
    mpirun: str | None = None
    mpirun_args: tuple = ()
    relaunches: int = 3
    stall_timeout_s: float = 300.0
    plans: tuple = ()
    probe_port: int = 22
    probe_timeout_s: float = 2.0


class GiveUp(RuntimeError):
    """No attempt can follow (no usable plan, too few devices); the message says why and what to do."""


def say(text: str) -> None:
    print(f"mpicdc.supervise: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- devices

def read_hostfile(path: str) -> list:
    """One entry per slot, in Open MPI's by-slot order: ``a slots=2\\nb`` -> ``["a", "a", "b"]``."""
    devices = []
    for line in Path(path).read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = next((int(w.split("=", 1)[1]) for w in words[1:] if w.startswith("slots=")
                      and w.split("=", 1)[1].isdigit()), 1)
        devices += [words[0]] * slots
    if not devices:
        raise GiveUp("it lists no host")
    return devices


def write_hostfile(devices: list, path: Path) -> str:
    """A hostfile that puts rank i on ``devices[i]`` (consecutive slots of one host grouped)."""
    lines, k = [], 0
    while k < len(devices):
        n = 1
        while k + n < len(devices) and devices[k + n] == devices[k]:
            n += 1
        lines.append(f"{devices[k]} slots={n}\n")
        k += n
    path.write_text("".join(lines))
    return str(path)


def reachable(host: str, port: int, timeout_s: float) -> bool:
    """A short bounded check: a TCP connection to ``host:port`` accepted or refused (the host answered);
    a timeout or no route means unreachable.  This machine's own names are always reachable."""
    if host in LOCAL_HOSTS:
        return True
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def unreachable_hosts(hosts, port: int, timeout_s: float) -> set:
    """The hosts failing :func:`reachable`, probed in parallel (bounded by ``timeout_s`` plus a little)."""
    found: dict = {}
    threads = [threading.Thread(target=lambda h=h: found.__setitem__(h, reachable(h, port, timeout_s)), daemon=True)
               for h in set(hosts)]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout_s + 1.0
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return {h for h in set(hosts) if not found.get(h, False)}


# ---------------------------------------------------------------- plans

def plan_for(world: int, args, plans: tuple, first_world: int) -> tuple:
    """``(weights folder or None, note)`` for a job of ``world`` ranks; raises :class:`GiveUp`.

    None means the run's own default folder (prepared here when the world size changed).
    """
    from mpicdc import store
    from mpicdc.core.models import get_model
    from mpicdc.core.plan import make_plan, parity_count

    if args.weights:
        manifest = store.open_manifest(args.weights)
        if manifest.world_size == world:
            return args.weights, f"weights {args.weights}"
        for folder in plans:
            other = store.open_manifest(folder)
            if other.world_size == world and other.model.name == manifest.model.name:
                return str(folder), f"plan prepared in advance {folder}"
        if manifest.source != "random" or manifest.seed is None:
            raise GiveUp(f"no plan for {world} ranks: {args.weights} holds imported weights for "
                         f"{manifest.world_size} ranks; prepare one in advance (python -m mpicdc.prepare ... "
                         f"--workers {world - 1 - manifest.plan.parity}) and pass --plan DIR")
        model, code, r, root, seed = (manifest.model, manifest.plan.code, manifest.plan.parity,
                                      Path(args.weights).parent, manifest.seed)
    else:
        if world == first_world:
            return None, "the default weights"
        model, code, root, seed = get_model(args.model), args.code, Path("weights"), args.seed
        r = parity_count(code, args.parity)
    workers = world - 1 - r
    if workers < 1:
        raise GiveUp(f"only {world} rank(s) left: code {code!r} needs at least {r + 2} (master, a data worker, "
                     f"{r} parity)")
    plan = make_plan(model, workers, r, code)
    start = time.monotonic()
    folder = store.ensure_prepared(model, plan, root, seed, check=False)
    return str(folder), f"plan {plan.tag} cut on the spot in {time.monotonic() - start:.1f} s"


# ---------------------------------------------------------------- attempts

def ids_text(ids: list) -> str:
    return format_ranges(ids) if ids == sorted(ids) else ",".join(map(str, ids))


def without_option(argv: list, option: str) -> list:
    """``argv`` with every ``option VALUE`` / ``option=VALUE`` removed."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == option:
            skip = True
        elif not token.startswith(option + "="):
            out.append(token)
    return out


@dataclass
class Attempt:
    """One job of a supervised run and what came of it."""

    number: int
    hosts: list
    weights: str | None
    note: str
    ids: list
    launched: float = 0.0  # Unix times
    ended: float = 0.0
    code: int | None = None
    reason: str = ""
    answered: list = field(default_factory=list)
    first_answer: float | None = None
    ready: float | None = None
    lost_ranks: list = field(default_factory=list)
    document: dict | None = None

    def to_dict(self) -> dict:
        return {"attempt": self.number, "ranks": len(self.hosts), "hosts": self.hosts, "weights": self.weights,
                "plan": self.note, "ids": ids_text(self.ids), "answered": len(self.answered), "code": self.code,
                "ended_because": self.reason or "complete", "lost_ranks": self.lost_ranks,
                "launched": self.launched, "ready": self.ready, "first_answer": self.first_answer,
                "ended": self.ended, "summary": (self.document or {}).get("summary")}


def _why(end, attempt: Attempt, left: int, stall_s: float) -> str:
    if end.timed_out:
        return f"it answered nothing for {stall_s:g} s (--stall-timeout)"
    if end.reported is None:
        return (f"the master died or the runtime ended the job (no exit code from the master; mpirun returned "
                f"{end.mpirun_code})")
    if end.reported == 4:
        return f"losses beyond the code's tolerance (exit 4, ranks lost: {attempt.lost_ranks})"
    return f"exit code {end.reported} with {left} of its requests unanswered"


def supervise(cfg: SuperviseConfig, run_argv: list) -> int:
    """Run ``python -m mpicdc.run RUN_ARGV`` under mpirun until every request is answered (bounded)."""
    from mpicdc.run import UsageError, _check_args, build_parser

    parser = build_parser()
    args = parser.parse_args(run_argv)
    try:
        _check_args(args)
        if args.output and not args.output.endswith(".json"):
            raise UsageError(f"--output {args.output}: a supervised run writes JSON; name a .json file")
        wanted = request_ids(args.repeat, args.request_ids, args.skip_answered)
    except ValueError as exc:
        say(f"error: {exc}")
        return 2
    if not wanted:
        say("every request is already answered; nothing to run")
        return 0
    try:
        devices = read_hostfile(cfg.hostfile) if cfg.hostfile else ["localhost"] * cfg.np
    except (OSError, ValueError, GiveUp) as exc:
        say(f"error: --hostfile {cfg.hostfile}: {exc}")
        return 2
    if len(devices) < cfg.np:
        say(f"error: -np {cfg.np} but the hostfile {cfg.hostfile} lists {len(devices)} slot(s); one rank per slot")
        return 2
    with tempfile.TemporaryDirectory(prefix="mpicdc-supervise-") as tmp:
        journal = args.journal or str(Path(tmp) / "journal.jsonl")
        attempts, stop = _attempts(cfg, args, run_argv, wanted, devices, journal, Path(tmp))
        if stop is not None and not read_journal(journal).answered:  # could not start, or stopped at once
            return stop
        code = _finish(args, wanted, attempts, journal)  # the summary and output, also of a partial run
        return code if stop is None else stop


def _attempts(cfg, args, run_argv, wanted, devices, journal, tmp: Path):
    """Run attempts until every id is answered: ``(attempts, None)``; ``(attempts, exit code)`` if it stops short."""
    attempts: list = []
    first_world = min(cfg.np, len(devices))
    weights, note = args.weights, "weights as given"
    while True:
        done = read_journal(journal).answered
        left = [i for i in wanted if i not in done]
        if not left:
            return attempts, None
        use = devices[:min(cfg.np, len(devices))]
        if attempts and len(use) != len(attempts[-1].hosts):
            try:
                weights, note = plan_for(len(use), args, cfg.plans, first_world)
            except GiveUp as exc:
                say(f"giving up: {exc}; {len(left)} request(s) unanswered: {ids_text(left)}")
                return attempts, GAVE_UP
        attempt = Attempt(len(attempts) + 1, use, weights, note, left)
        attempts.append(attempt)
        argv = run_argv if attempt.number == 1 else without_option(run_argv, "--inject")
        argv = argv + ["--journal", journal, "--request-ids", ids_text(left)]
        if weights:
            argv += ["--weights", weights]
        hostfile = write_hostfile(use, tmp / f"hostfile-{attempt.number}") if cfg.hostfile else None
        cmd = mpirun_command(len(use), argv, hostfile, cfg.mpirun, extra=list(cfg.mpirun_args))
        runs_before = len(read_journal(journal).runs)
        attempt.launched = time.time()
        end = run_once(cmd, len(use), hostfile, deadline_s=cfg.stall_timeout_s, progress=lambda: _size(journal))
        attempt.ended, attempt.code = time.time(), end.code
        if args.output and Path(args.output).exists():
            try:
                attempt.document = json.loads(Path(args.output).read_text())
            except ValueError:
                pass
            Path(args.output).unlink()
        state = read_journal(journal)
        mine = state.runs[runs_before:]
        if mine:
            attempt.ready = mine[0].started
            attempt.answered = [a["id"] for r in mine for a in r.answers if a.get("ok")]
            attempt.first_answer = next((a["t"] for r in mine for a in r.answers if a.get("ok")), None)
            attempt.lost_ranks = sorted({x for r in mine if r.end for x in r.end.get("lost", [])})
        still = [i for i in left if i not in state.answered]
        if end.signal:
            say(f"stopped by signal {end.signal}; {len(still)} request(s) unanswered")
            return attempts, end.code
        if not still:
            return attempts, None
        if attempt.number == 1 and end.reported == 2 and not mine:
            say("the job could not start (exit 2, see above); nothing to relaunch")
            return attempts, 2
        attempt.reason = _why(end, attempt, len(still), cfg.stall_timeout_s)
        if attempt.number > cfg.relaunches:
            say(f"attempt {attempt.number} ended: {attempt.reason}; giving up after {cfg.relaunches} relaunch(es): "
                f"{len(still)} of {len(wanted)} request(s) unanswered: {ids_text(still)}")
            return attempts, GAVE_UP
        lost = [use[r] for r in attempt.lost_ranks if 0 < r < len(use)]
        devices = list(devices)
        for host in lost:  # one slot of the host that ran each lost rank
            devices.remove(host)
        gone = unreachable_hosts(devices, cfg.probe_port, cfg.probe_timeout_s) if cfg.hostfile else set()
        devices = [d for d in devices if d not in gone]
        after = min(cfg.np, len(devices))
        dropped = (f"; dropped: {', '.join(sorted(gone))} unreachable" if gone else "") + \
                  (f"; without the devices of lost ranks {attempt.lost_ranks}" if lost else "")
        say(f"attempt {attempt.number} ended: {attempt.reason}; {len(wanted) - len(still)}/{len(wanted)} requests "
            f"answered{dropped}; relaunch {attempt.number}/{cfg.relaunches} on {after} rank(s) "
            f"({_hosts_text(devices[:after])}), {len(still)} request(s) left")


def _size(path: str) -> int:
    """The journal's size: it grows with every answer (the stall deadline's measure of progress)."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def _hosts_text(hosts: list) -> str:
    counts: dict = {}
    for h in hosts:
        counts[h] = counts.get(h, 0) + 1
    return ", ".join(h if n == 1 else f"{h} x{n}" for h, n in counts.items())


# ---------------------------------------------------------------- the end: lateness, recovery, output

def lateness(wanted: list, journal: str) -> dict:
    """``{id: seconds}`` for every request that straddled a relaunch: from its first submission (the
    moment a run began it: the run's start or its previous answer, or a failed answer's start) to its
    answer."""
    state = read_journal(journal)
    submitted: dict = {}
    for run in state.runs:
        done = {a["id"] for a in run.answers if a.get("ok")}
        for a in run.answers:
            if not a.get("ok"):
                submitted.setdefault(a["id"], a["t"] - a.get("latency_ms", 0.0) / 1e3)
        in_flight = next((i for i in run.ids if i not in done and i not in submitted), None)
        if in_flight is not None and run.end is None:  # the run ended while serving it
            last = max([run.started] + [a["t"] for a in run.answers])
            submitted.setdefault(in_flight, last)
    return {i: state.answers[i]["t"] - t for i, t in submitted.items() if i in state.answers}


def _finish(args, wanted: list, attempts: list, journal: str) -> int:
    """Print the summary (recovery per relaunch, late requests), write the merged output, return the code."""
    from mpicdc.run import CHECK_RTOL

    state = read_journal(journal)
    answers = [state.answers[i] for i in wanted if i in state.answers]
    late = lateness(wanted, journal)
    latencies = [a["latency_ms"] for a in answers] or [float("nan")]
    recoveries = []
    for before, after in zip(attempts, attempts[1:]):  # noqa: RUF007 - itertools.pairwise needs Python 3.10
        recoveries.append({"after_attempt": before.number, "why": before.reason,
                           "ready_s": None if after.ready is None else after.ready - before.ended,
                           "first_answer_s": None if after.first_answer is None else after.first_answer - before.ended})
    line = (f"supervised: {len(answers)}/{len(wanted)} requests answered in {len(attempts)} attempt(s), "
            f"median latency {np.median(latencies):.1f} ms")
    for rec in recoveries:
        line += (f"\n  relaunch after attempt {rec['after_attempt']}: job ended -> relaunched job ready "
                 f"{_secs(rec['ready_s'])}, first answer {_secs(rec['first_answer_s'])}")
    if late:
        line += "\n  late (straddled a relaunch): " + ", ".join(
            f"request {i} answered {s:.2f} s after its first submission" for i, s in sorted(late.items()))
    print(line, flush=True)
    kind = (args.code or "sum").partition(":")[0]
    rtol = CHECK_RTOL.get(kind, CHECK_RTOL["mds"])
    checked = [a["check_rel_err"] for a in answers if a.get("check_rel_err") is not None]
    code = 1 if any(e > rtol for e in checked) else 0
    if args.output:
        doc = {"model": args.model, "supervised": True,
               "summary": {"requests": len(wanted), "ok": len(answers), "attempts": len(attempts),
                           "median_latency_ms": float(np.median(latencies)), "recoveries": recoveries,
                           "late_s": {str(i): s for i, s in late.items()}},
               "attempts": [a.to_dict() for a in attempts],
               "requests": [{"request": a["id"], "ok": True, "latency_ms": a["latency_ms"], "top_k": a.get("top_k"),
                             "check_rel_err": a.get("check_rel_err"), "answered_at": a["t"], "sha256": a.get("sha256"),
                             "late_s": late.get(a["id"]),
                             "output": None if decode_output(a) is None else decode_output(a).tolist()}
                            for a in answers]}
        Path(args.output).write_text(json.dumps(doc, indent=1))
        print(f"results written to {args.output}", flush=True)
    return code


def _secs(value) -> str:
    return "n/a" if value is None else f"{value:.2f} s"
