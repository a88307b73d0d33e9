"""The framed byte protocol between a rank's relay on the head and its device's daemon.

One TCP connection per rank over the device's own link carries everything of that rank:
its start, its stdout/stderr, every PMIx connection it opens (tunnelled to the head's PRRTE
daemon), heartbeats both ways and its exit.  So a cut link cuts all of it at once, as on a
real device.  A frame is ``kind (1 byte) | channel (4) | length (4) | payload``.

Standard library only: the daemon runs as a plain script, without mpicdc on the path.
"""
from __future__ import annotations

import asyncio
import json
import re
import struct

HEADER = struct.Struct("!BII")
START, OUT, OPEN, DATA, CLOSE, PING, EXIT = range(1, 8)
STDOUT, STDERR = 1, 2
#: the device daemon's port (one daemon per device namespace, so one fixed port suffices)
PORT = 7470
#: heartbeat period and the silence after which the relay gives the device up (seconds)
HEARTBEAT_S, SILENCE_S = 1.0, 3.0
PMIX_URI = re.compile(r"tcp4://127\.0\.0\.1:(\d+)")


def frame(kind: int, channel: int = 0, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, channel, len(payload)) + payload


def frame_json(kind: int, obj) -> bytes:
    return frame(kind, 0, json.dumps(obj).encode())


async def read_frame(reader: asyncio.StreamReader):
    """``(kind, channel, payload)``; raises ``asyncio.IncompleteReadError`` at end of stream."""
    kind, channel, length = HEADER.unpack(await reader.readexactly(HEADER.size))
    return kind, channel, await reader.readexactly(length) if length else b""


def pmix_port(env: dict) -> int:
    """The TCP port of the PMIx server (PRRTE's daemon) a rank is told to connect to."""
    for key in ("PMIX_SERVER_URI41", "PMIX_SERVER_URI4", "PMIX_SERVER_URI3", "PMIX_SERVER_URI2"):
        m = PMIX_URI.search(env.get(key, ""))
        if m:
            return int(m.group(1))
    raise LookupError("no PMIX_SERVER_URI* with tcp4://127.0.0.1:PORT in the environment: "
                      "the relay must be started by mpirun (PRRTE's daemon)")


def repoint_pmix(env: dict, port: int) -> dict:
    """``env`` with every PMIx server URI pointing at ``127.0.0.1:port`` (the tunnel's near end).

    Everything else PMIx needs then comes through that connection: the head's server runs with
    ``gds`` ``hash`` (:func:`mpicdc.cluster.headmode.mpirun_extra`), so the job's data is sent to
    the rank instead of left in a shared-memory segment only the head can map."""
    return {k: PMIX_URI.sub(f"tcp4://127.0.0.1:{port}", v) if k.startswith("PMIX_SERVER_URI") else v
            for k, v in env.items()}


async def pump(reader: asyncio.StreamReader, send, kind: int, channel: int, chunk: int = 65536) -> None:
    """Copy a stream into frames of ``kind``/``channel`` until its end, then send a CLOSE.
    Ends quietly when either side is gone (the link's owner notices that on its own)."""
    try:
        while data := await reader.read(chunk):
            await send(frame(kind, channel, data))
        await send(frame(CLOSE, channel))
    except (ConnectionError, OSError):
        pass


async def deliver(writers: dict, channel: int, payload: bytes) -> None:
    """Write a DATA frame's bytes to the local end of ``channel``; a closed local end drops the channel
    (a rank's PMIx connection may close while the other side still sends), never the link."""
    w = writers.get(channel)
    if w is None:
        return
    try:
        w.write(payload)
        await w.drain()
    except (ConnectionError, OSError):
        writers.pop(channel, None)


class Link:
    """One end of the framed connection: serialised writes, the time anything was last heard."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.heard = asyncio.get_running_loop().time()
        self._lock = asyncio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._lock:
            self.writer.write(data)
            await self.writer.drain()

    async def recv(self):
        """The next frame; ``asyncio.TimeoutError`` when nothing came for ``SILENCE_S`` (heartbeats included)."""
        got = await asyncio.wait_for(read_frame(self.reader), SILENCE_S)
        self.heard = asyncio.get_running_loop().time()
        return got

    async def heartbeat(self) -> None:
        while True:
            await self.send(frame(PING))
            await asyncio.sleep(HEARTBEAT_S)
