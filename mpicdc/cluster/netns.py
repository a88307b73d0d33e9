"""Network namespaces that stand in for devices: a head (where ``mpirun`` runs) and N devices.

Layout of one cluster with prefix ``P`` (at most 10 characters: link names are at most 15):

* a bridge ``Pbr`` in the root namespace, with no address (nothing is routed through it);
* namespace ``P-head`` and ``P-d0`` ... ``P-d{N-1}``, each joined to the bridge by a veth pair
  (``Ph`` / ``Pd{i}`` on the bridge side, ``eth0`` inside), an address on the cluster's private
  /24 (head ``.1``, device i ``.{10+i}``), loopback up, IPv6 off and no default route, so no
  traffic leaves the machine;
* with a rate, ``tbf`` on both ends of every veth (each direction of every link shaped);
* ``net.ipv4.tcp_retries2=4`` in the head unless ``fast_give_up=False``: after a device dies
  silently, ``mpirun`` gives up retransmitting to its daemon in seconds instead of ~15 minutes.
  The master's MPI connections live there too, and the kernel then also gives up on a *live*
  worker's connection after ~6 s without an acknowledgement (a stalled or lossy link), which ULFM
  takes for that worker's death (docs/cluster.md, "VGG16 over 20 Mbit/s"): the daemons-on-the-head
  arrangement, which has no remote daemon to give up on, leaves the kernel's default.

The master (rank 0) runs on the head, next to ``mpirun``: losing the node that runs ``mpirun``
ends any Open MPI job whatever runs there, so the master adds no second fatal node, and every
device stays a worker that faults can be done to.  Its link is shaped like a device's.

Only iproute2 ``ip``/``tc`` and util-linux ``unshare``/``setsid`` are used.  Needs root (or
CAP_NET_ADMIN and CAP_SYS_ADMIN): :func:`check_available` says why not.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from mpicdc.core.traffic import rate_bits

STATE_ROOT = Path(tempfile.gettempdir()) / "mpicdc-cluster"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")


class ClusterUnavailable(RuntimeError):
    """This machine (or user) cannot make network namespaces."""


def check_available() -> None:
    """Raise :class:`ClusterUnavailable` saying why namespaces cannot be made here."""
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            raise ClusterUnavailable(f"`{tool}` is not installed (iproute2 / util-linux)")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise ClusterUnavailable("needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to make network namespaces")
    probe = f"mpicdcprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ClusterUnavailable(f"`ip netns add` failed: {done.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)


def subnet_of(prefix: str) -> str:
    """A private 10.x.y.0/24 for ``prefix`` (only ever inside its own namespaces)."""
    h = zlib.crc32(prefix.encode())
    return f"10.{100 + h % 100}.{(h >> 8) % 256}"


def default_prefix() -> str:
    return f"cdc{os.getpid() % 10 ** 7}"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def netns_pids(ns: str) -> list:
    out = ip("netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def kill_netns(ns: str, sig: int = signal.SIGKILL, settle_s: float = 2.0) -> None:
    """Send ``sig`` to every process in namespace ``ns``; with SIGKILL, until none is left."""
    end = time.monotonic() + settle_s
    while True:
        pids = netns_pids(ns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig != signal.SIGKILL or not pids or time.monotonic() > end:
            return
        time.sleep(0.02)


def list_netns() -> list:
    return [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]


def list_links() -> list:
    names = []
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return names


@dataclass
class Node:
    name: str        # "head" or "d{i}"
    netns: str       # namespace name
    veth: str        # bridge-side end in the root namespace
    address: str
    hostname: str


class Network:
    """The namespaces, links and addresses of one cluster (no MPI here: see :class:`mpicdc.cluster.Cluster`)."""

    def __init__(self, devices: int, rate: str | None = None, prefix: str | None = None, fast_give_up: bool = True):
        if devices < 1:
            raise ValueError(f"a cluster needs at least 1 device, got {devices}")
        if devices > 200:
            raise ValueError(f"at most 200 devices on one /24, got {devices}")
        self.prefix = prefix or default_prefix()
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(f"bad prefix {self.prefix!r}: a lowercase letter, then up to 9 letters or digits")
        self.rate = rate
        self.rate_bps = rate_bits(rate) if rate else None
        self.fast_give_up = fast_give_up
        self.subnet = subnet_of(self.prefix)
        self.bridge = f"{self.prefix}br"
        self.state = STATE_ROOT / self.prefix
        host = os.uname().nodename
        self.head = Node("head", f"{self.prefix}-head", f"{self.prefix}h", f"{self.subnet}.1", host)
        self.devices = [Node(f"d{i}", f"{self.prefix}-d{i}", f"{self.prefix}d{i}", f"{self.subnet}.{10 + i}",
                             f"{self.prefix}-d{i}") for i in range(devices)]

    @property
    def nodes(self) -> list:
        return [self.head, *self.devices]

    @property
    def cidr(self) -> str:
        return f"{self.subnet}.0/24"

    def up(self) -> None:
        """Make everything; on any error, remove what was made and raise."""
        check_available()
        if any(ns.startswith(self.prefix + "-") for ns in list_netns()):
            raise RuntimeError(f"a cluster with prefix {self.prefix!r} exists: "
                               f"python -m mpicdc.cluster down --prefix {self.prefix}")
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            ip("link", "add", self.bridge, "type", "bridge")
            ip("link", "set", self.bridge, "up")
            for node in self.nodes:
                self._add(node)
            self._write_state()
        except BaseException:
            self.down()
            raise

    def _add(self, node: Node) -> None:
        ns = node.netns
        ip("netns", "add", ns)
        _sysctl(ns, "net/ipv6/conf/all/disable_ipv6", "1")
        _sysctl(ns, "net/ipv6/conf/default/disable_ipv6", "1")
        if node is self.head and self.fast_give_up:
            _sysctl(ns, "net/ipv4/tcp_retries2", "4")
        ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", node.veth, "master", self.bridge)
        ip("link", "set", node.veth, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        if self.rate_bps:
            self._shape(["tc", "qdisc", "replace", "dev", node.veth])
            self._shape(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0"])

    def _shape(self, head: list) -> None:
        burst = max(15000, int(self.rate_bps / 8 / 100))  # 10 ms of traffic, at least a few MTUs
        done = subprocess.run([*head, "root", "tbf", "rate", self.rate, "burst", str(burst), "latency", "100ms"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(head)} tbf: {done.stderr.strip()}")

    def _write_state(self) -> None:
        hosts = {n.address: {"netns": n.netns, "hostname": n.hostname} for n in self.devices}
        (self.state / "hosts.json").write_text(json.dumps(hosts, indent=1))
        agent = self.state / "agent"
        script = Path(__file__).with_name("agent.py")
        agent.write_text(f"#!/bin/sh\nexec {sys.executable} {script} {self.state} \"$@\"\n")
        agent.chmod(0o755)
        (self.state / "hostfile").write_text("".join(f"{n.address} slots=1\n" for n in self.nodes))
        (self.state / "cluster.json").write_text(json.dumps({
            "prefix": self.prefix, "rate": self.rate, "subnet": self.cidr, "bridge": self.bridge,
            "nodes": [vars(n) for n in self.nodes]}, indent=1))

    @property
    def hostfile(self) -> str:
        return str(self.state / "hostfile")

    @property
    def agent(self) -> str:
        return str(self.state / "agent")

    def node(self, device) -> Node:
        """A device by index (``0``), name (``"d0"``), or ``"head"``."""
        if isinstance(device, Node):
            return device
        if device == "head":
            return self.head
        i = int(str(device).lstrip("d"))
        if not 0 <= i < len(self.devices):
            raise IndexError(f"no device {device!r}: the cluster has d0..d{len(self.devices) - 1}")
        return self.devices[i]

    def exec(self, device, cmd: list, **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside a node's namespace (and wait)."""
        kw.setdefault("check", False)
        return subprocess.run(["ip", "netns", "exec", self.node(device).netns, *cmd], **kw)  # noqa: PLW1510 (check in kw)

    def down(self) -> None:
        teardown(self.prefix)


def _sysctl(ns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > /proc/sys/{key}"], check=True,
                   capture_output=True)


def teardown(prefix: str) -> list:
    """Remove every namespace (after killing every process in it), link and state file of cluster
    ``prefix``, found by name (works without the state, after a crash).  Returns what it removed."""
    removed = []
    spaces = [ns for ns in list_netns() if ns.startswith(prefix + "-")]
    for ns in spaces:  # first everything inside, so no daemon reacts to another's death by relaunching
        kill_netns(ns, signal.SIGSTOP)
    for ns in spaces:
        kill_netns(ns, signal.SIGKILL)
        ip("netns", "del", ns, check=False)
        removed.append(ns)
    for link in list_links():
        if link == f"{prefix}br" or re.fullmatch(re.escape(prefix) + r"(h|d\d+)", link):
            ip("link", "del", link, check=False)
            removed.append(link)
    shutil.rmtree(STATE_ROOT / prefix, ignore_errors=True)
    return removed


def known_prefixes() -> list:
    """Prefixes of the clusters made on this machine (from their state, and their namespaces)."""
    found = {p.name for p in STATE_ROOT.iterdir()} if STATE_ROOT.is_dir() else set()
    for ns in list_netns():
        name, sep, node = ns.rpartition("-")
        if sep and (node == "head" or re.fullmatch(r"d\d+", node)) and PREFIX_RE.match(name):
            found.add(name)
    return sorted(found)
