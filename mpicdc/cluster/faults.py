"""Faults done from outside to a device of a running cluster, at any moment.

Each function returns ``time.monotonic()`` at the moment the fault took effect (for
measuring how long the job takes to notice).  ``device`` is an index, ``"d3"``, or a node.

=============  =====================================================================
``crash``      SIGKILL the device's rank (its ``python -m mpicdc.run``); daemon alive
``freeze``     SIGSTOP the rank; ``thaw`` sends SIGCONT
``power_off``  link down, then every process in the namespace killed (daemon too)
``link_cut``   link down, every process alive (out of radio range)
``loud_death`` every process in the namespace killed, link up (peers see resets)
``link_restore``  link up again
=============  =====================================================================
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from mpicdc.cluster.netns import Network, ip, kill_netns, netns_pids

RANK_MARKER = b"mpicdc.run"


def rank_pids(net: Network, device) -> list:
    """PIDs of the mpicdc ranks running in a device's namespace."""
    found = []
    for pid in netns_pids(net.node(device).netns):
        try:
            if RANK_MARKER in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def _signal_rank(net: Network, device, sig: int) -> float:
    pids = rank_pids(net, device)
    if not pids:
        raise LookupError(f"no mpicdc rank runs on {net.node(device).name}")
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return time.monotonic()


def crash(net: Network, device) -> float:
    return _signal_rank(net, device, signal.SIGKILL)


def freeze(net: Network, device) -> float:
    return _signal_rank(net, device, signal.SIGSTOP)


def thaw(net: Network, device) -> float:
    return _signal_rank(net, device, signal.SIGCONT)


def link_cut(net: Network, device) -> float:
    ip("link", "set", net.node(device).veth, "down")
    return time.monotonic()


def link_restore(net: Network, device) -> float:
    ip("link", "set", net.node(device).veth, "up")
    return time.monotonic()


def power_off(net: Network, device) -> float:
    at = link_cut(net, device)
    kill_netns(net.node(device).netns)
    return at


def loud_death(net: Network, device) -> float:
    kill_netns(net.node(device).netns)
    return time.monotonic()


KINDS = {f.__name__: f for f in (crash, freeze, thaw, power_off, link_cut, loud_death, link_restore)}
