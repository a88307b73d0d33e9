"""The daemons-on-the-head arrangement: every PRRTE daemon on the head, each device's rank behind a relay.

``mpirun`` runs in the head namespace alone (no hostfile, no launch agent), so PRRTE has one daemon
and every rank is its local child.  That child is :mod:`relay`, which starts the real rank on its
device through the device daemon :mod:`devd` (started here, one per device namespace, in a UTS
namespace with the device's hostname) and ends like a crashed local process when the device dies or
goes silent.  PRRTE never loses a daemon, so no device's death can end the job (docs/cluster.md).

PRRTE believes every rank is on one node, so shared memory must be kept out of the data path:
``--mca btl tcp,self`` over the cluster's subnet, and out of PMIx: the head's daemon keeps the job's
data in its ``hash`` store (``--pmixmca gds hash``) and sends it over each rank's PMIx connection,
instead of a shared-memory segment that only the head can map.  So a device needs no file system,
``/tmp`` or ``/dev/shm`` shared with the head; the device daemons prove it by giving every rank its
own (``devd.py --private-tmp``).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mpicdc.cluster import tunnel

HERE = Path(__file__).resolve().parent
START_S = 10.0


def mpirun_extra(net) -> list:
    """mpirun options of the head arrangement: ranks talk TCP over the cluster's links only, and get the
    job's PMIx data over their PMIx connection (``gds`` ``hash``), not from the head's shared memory."""
    return ["--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", net.cidr,
            "--mca", "mpi_ft_propagator_with_rbcast", "true",
            "--pmixmca", "gds", "hash"]


def relay_wrap(net) -> list:
    """The command every rank's python runs through: the relay, told where the cluster's state is."""
    return [sys.executable, str(HERE / "relay.py"), str(net.state)]


def start_device_daemons(net) -> None:
    """Start :mod:`devd` in every device namespace (detached, logging to the state folder) and wait
    until each one accepts connections from the head; raise naming the ones that did not."""
    for node in net.devices:
        with open(net.state / f"devd-{node.name}.log", "ab") as log:
            subprocess.Popen(["ip", "netns", "exec", node.netns, "unshare", "--uts", "sh", "-c",
                              'hostname "$0" && exec "$@"', node.hostname,
                              sys.executable, str(HERE / "devd.py"), node.address, "--head", net.head.address,
                              "--private-tmp"],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                             close_fds=True)
    probe = ("import socket, sys, time\nend = time.monotonic() + float(sys.argv[2])\nwhile True:\n"
             " try:\n  socket.create_connection((sys.argv[1], int(sys.argv[3])), timeout=1).close(); break\n"
             " except OSError:\n  if time.monotonic() > end: sys.exit(1)\n  time.sleep(0.05)\n")
    late = [n.name for n in net.devices
            if net.exec("head", [sys.executable, "-c", probe, n.address, str(START_S), str(tunnel.PORT)],
                        timeout=START_S + 10).returncode != 0]
    if late:
        logs = "; ".join(f"{name}: {(net.state / f'devd-{name}.log').read_text().strip()[-300:]}" for name in late)
        raise RuntimeError(f"device daemons did not start within {START_S:g} s on {', '.join(late)} ({logs})")


