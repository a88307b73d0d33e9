"""An in-process network of :class:`~mpicdc.runtime.channel.Channel` endpoints for protocol tests.

Each rank gets an endpoint; messages are copied into per-``(source, dest, tag)``
queues.  A ``rule(source, dest, tag, message)`` decides what the network does
with each message: return ``[(delay_s, bytes)]`` -- ``[]`` drops it, two entries
duplicate it, a delay holds it back, other bytes alter it.  ``kill(rank)``
makes a rank dead the way ULFM reports it: sends to it fail, receives from it
complete in error, and :meth:`FakeChannel.failed` lists it.  MPI's
non-overtaking order holds per ``(source, dest, tag)`` unless a rule delays
one message past a later one.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict

import numpy as np

from mpicdc.runtime.channel import Channel, PeerLost


class FakeNetwork:
    def __init__(self, size: int, rule=None, tag_ub: int = (1 << 31) - 1):
        self.size, self.rule, self.tag_ub = size, rule, tag_ub
        self.lock = threading.Lock()
        self.queues = defaultdict(list)  # (source, dest, tag) -> [(deliver_at, seq, bytes)]
        self.dead: set = set()
        self.held: set = set()  # ranks whose incoming messages wait (a stalled or frozen process)
        self.seq = 0
        self.log: list = []  # (source, dest, tag, nbytes) of every message sent

    def endpoint(self, rank: int) -> "FakeChannel":
        return FakeChannel(self, rank)

    def kill(self, rank: int) -> None:
        with self.lock:
            self.dead.add(rank)

    def hold(self, rank: int) -> None:
        with self.lock:
            self.held.add(rank)

    def release(self, rank: int) -> None:
        with self.lock:
            self.held.discard(rank)

    def post(self, source: int, dest: int, tag: int, buf) -> None:
        data = np.array(buf, dtype=np.uint8, copy=True)
        with self.lock:
            if source in self.dead:
                return
            if dest in self.dead:
                raise PeerLost(dest, "dead")
            self.log.append((source, dest, tag, data.nbytes))
            copies = [(0.0, data)] if self.rule is None else self.rule(source, dest, tag, data)
            now = time.monotonic()
            for delay, message in copies:
                self.seq += 1
                self.queues[source, dest, tag].append((now + delay, self.seq, np.asarray(message, np.uint8)))

    def take(self, source: int, dest: int, tag: int, peek: bool = False):
        """The next deliverable message, ``"dead"`` if the source is dead and nothing waits, or ``None``."""
        with self.lock:
            if dest in self.held:
                return None
            queue = self.queues[source, dest, tag]
            now = time.monotonic()
            ready = [m for m in queue if m[0] <= now]
            if ready:
                first = min(ready, key=lambda m: (m[0], m[1]))
                if not peek:
                    queue.remove(first)
                return first[2]
            return "dead" if source in self.dead else None


class _Recv:
    def __init__(self, buf, source, tag):
        self.buf, self.source, self.tag, self.done = buf, source, tag, False


class FakeChannel(Channel):
    def __init__(self, net: FakeNetwork, rank: int):
        self.net, self.rank, self.size, self.tag_ub = net, rank, net.size, net.tag_ub

    def _check_alive(self):
        if self.rank in self.net.dead:  # a dead rank's thread must stop talking
            raise PeerLost(self.rank, "this rank is dead")

    def isend(self, buf, dest, tag):
        self._check_alive()
        self.net.post(self.rank, dest, tag, buf)
        return None

    def send(self, buf, dest, tag):
        self.isend(buf, dest, tag)

    def irecv(self, buf, source, tag):
        self._check_alive()
        return _Recv(buf, source, tag)

    def testsome(self, handles):
        self._check_alive()
        done = []
        for i, h in enumerate(handles):
            if h.done:
                continue
            message = self.net.take(h.source, self.rank, h.tag)
            if message is None:
                continue
            h.done = True
            if isinstance(message, str) or message.nbytes > h.buf.nbytes:  # dead source, or truncation
                done.append((i, None))
                continue
            h.buf[:message.nbytes] = message
            done.append((i, message.nbytes))
        return done

    def test(self, handle):
        return True

    def probe(self, source, tag):
        self._check_alive()
        message = self.net.take(source, self.rank, tag, peek=True)
        if isinstance(message, str):
            raise PeerLost(source, "dead")
        return None if message is None else message.nbytes

    def recv(self, buf, source, tag):
        message = self.net.take(source, self.rank, tag)
        if message is None or isinstance(message, str):
            raise PeerLost(source, "no message")
        buf[:message.nbytes] = message

    def failed(self):
        return set(self.net.dead)
