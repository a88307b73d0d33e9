"""Request identities and the answer journal: which requests of a run were answered, for an outside reader.

A run's requests have ids ``0 .. --repeat - 1`` (every request takes the run's one input); a
replay serves a subset in the same order and under the same ids (``--request-ids 3,7-9``, or
``--skip-answered JOURNAL`` to drop the ids a journal already holds as answered).

With ``--journal FILE`` the master appends one JSON line per event, flushed and fsynced before
it goes on, so a process watching from outside (the supervisor, ``python -m mpicdc.launch
--supervise``) knows exactly which requests were answered even when the master is killed the
next instant.  Events (``t`` is Unix time in seconds):

* ``{"event": "start", "t", "pid", "world", "plan", "ids"}``: the master is ready to serve ``ids``;
* ``{"event": "answer", "t", "id", "ok", "latency_ms", "top_k", "sha256", "output", "error",
  "check_rel_err"}``: one request done; ``output`` is the float32 output vector, little-endian,
  base64 (exact, a few kB for 1000 classes; never pickled); ``sha256`` is its digest;
* ``{"event": "end", "t", "code", "lost"}``: the master's exit code and the ranks it lost.

A request is *answered* when an ``answer`` line with ``ok: true`` exists.  A torn last line (the
master killed while writing) is ignored.  Several runs may append to one journal (a supervisor's
attempts); :func:`read_journal` reads them all.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpicdc.core.ranges import format_ranges, parse_ranges


def request_ids(repeat: int, ids_text: str | None = None, skip_journal: str | None = None) -> list:
    """The ids this run serves, in order: ``--request-ids`` (default ``0..repeat-1``) minus the ids
    ``--skip-answered`` names as answered.  Raises ``ValueError`` on a bad list or an unreadable journal."""
    if ids_text is not None:
        ids = parse_ranges(ids_text, "request id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"--request-ids {ids_text}: an id appears twice; every request is served once")
    else:
        ids = list(range(repeat))
    if skip_journal is not None:
        if not Path(skip_journal).is_file():
            raise ValueError(f"--skip-answered {skip_journal}: no such journal file (written by --journal)")
        done = read_journal(skip_journal).answered
        ids = [i for i in ids if i not in done]
    return ids


def encode_output(output: np.ndarray) -> tuple:
    """``(sha256 hex, base64 text)`` of an output vector as little-endian float32."""
    raw = np.ascontiguousarray(output, dtype="<f4").tobytes()
    return hashlib.sha256(raw).hexdigest(), base64.b64encode(raw).decode("ascii")


def decode_output(entry: dict) -> np.ndarray | None:
    """The output vector of an ``answer`` line (None for a failed request)."""
    text = entry.get("output")
    return None if text is None else np.frombuffer(base64.b64decode(text), dtype="<f4").copy()


class Journal:
    """The master's appender (local, rank 0 only); every line is flushed and fsynced before returning.
    ``Journal(None)`` writes nothing, so the run calls it unconditionally."""

    def __init__(self, path: str | None):
        try:
            self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise ValueError(f"--journal {path}: cannot write there ({exc.strerror or exc})") from None
        if self._file is not None and _ends_torn(path):  # a master killed mid-line: end that line first
            self._file.write("\n")

    def _write(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"t": time.time(), **record}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def start(self, world: int, plan_tag: str, ids: list) -> None:
        self._write({"event": "start", "pid": os.getpid(), "world": world, "plan": plan_tag,
                     "ids": format_ranges(sorted(ids)) if ids == sorted(ids) else ids})

    def answer(self, request_id: int, result, top_k: int, check_rel_err: float | None = None) -> None:
        """Record one request's outcome (``result`` is the master's ``RequestResult``)."""
        record = {"event": "answer", "id": request_id, "ok": bool(result.ok),
                  "latency_ms": result.latency_s * 1e3, "error": result.error or None}
        if result.ok and result.output is not None:
            digest, text = encode_output(result.output.reshape(-1))
            record.update(top_k=[[int(c), float(p)] for c, p in result.top_k(top_k)], sha256=digest, output=text)
        if check_rel_err is not None:
            record["check_rel_err"] = float(check_rel_err)
        self._write(record)

    def end(self, code: int, lost) -> None:
        self._write({"event": "end", "code": int(code), "lost": sorted(int(r) for r in lost)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _ends_torn(path: str) -> bool:
    """Whether the file's last line lacks its newline."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


@dataclass
class Run:
    """One run's part of a journal (from its ``start`` line to the next ``start``)."""

    started: float
    ids: list
    world: int
    answers: list = field(default_factory=list)  # the answer lines, in order
    end: dict | None = None  # the end line, if the master got there


@dataclass
class JournalState:
    """What a journal says: every run in it, and per id its first good answer."""

    runs: list = field(default_factory=list)
    answers: dict = field(default_factory=dict)  # id -> the first answer line with ok true

    @property
    def answered(self) -> set:
        return set(self.answers)


def _ids_of(value) -> list:
    return parse_ranges(value, "request id") if isinstance(value, str) and value else list(value or [])


def read_journal(path) -> JournalState:
    """Parse a journal; torn or foreign lines are skipped (a master killed mid-write leaves one)."""
    state = JournalState()
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return state
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        kind = record.get("event")
        if kind == "start":
            state.runs.append(Run(record.get("t", 0.0), _ids_of(record.get("ids")), record.get("world", 0)))
        elif kind == "answer" and state.runs:
            state.runs[-1].answers.append(record)
            if record.get("ok") and record.get("id") not in state.answers:
                state.answers[record["id"]] = record
        elif kind == "end" and state.runs:
            state.runs[-1].end = record
    return state
