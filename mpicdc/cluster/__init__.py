"""A cluster of devices on one machine: network namespaces, shaped links, mpirun across them, faults.

>>> with Cluster(5, rate="20mbit") as c:            # head (mpirun, master) + 5 devices
...     job = c.launch(6, ["tiny", "--repeat", "20", "--check"])
...     job.wait_for("request 3:")
...     c.crash(2)                                    # SIGKILL the rank on device 2
...     done = job.finish()

``python -m mpicdc.cluster up N`` / ``down`` / ``status`` does the same from a shell.
See docs/cluster.md.  Needs root (CAP_NET_ADMIN): :class:`ClusterUnavailable` says why not.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mpicdc.cluster import faults, headmode
from mpicdc.cluster.netns import (
    ClusterUnavailable,
    Network,
    check_available,
    kill_netns,
    teardown,
)

__all__ = ["Cluster", "ClusterJob", "ClusterUnavailable", "check_available", "teardown"]

ROOT = Path(__file__).resolve().parents[2]


def mpirun_extra(net: Network) -> list:
    """The mpirun options that run a job across the cluster's namespaces (design.md, measured)."""
    return ["--prtemca", "plm_ssh_agent", net.agent,       # our agent instead of ssh
            "--prtemca", "plm_ssh_no_tree_spawn", "1",     # every daemon started from the head
            "--prtemca", "prte_if_include", net.cidr,
            "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", net.cidr,
            "--mca", "mpi_ft_propagator_with_rbcast", "true",  # failures across nodes reach rank 0
            # no keepalive timer on the daemons' connections: after a silent device loss the runtime ends
            # the job only when it next talks to the lost daemon (a second failure, the job's end), not
            # 480 s later by default (measured: docs/cluster.md, "Keeping the job alive")
            "--prtemca", "oob_tcp_keepalive_time", "0"]


#: where PRRTE's daemons run: one per device (a real cluster's default) or all on the head (relays)
ARRANGEMENTS = ("device", "head")


class Cluster(Network):
    """:class:`~mpicdc.cluster.netns.Network` made on entry and always removed on exit, plus faults and jobs.

    ``daemons="device"``: one PRRTE daemon per device, started by ``mpirun`` through the launch
    agent; ``daemons="head"``: every daemon on the head, each device's rank behind a relay
    (:mod:`mpicdc.cluster.headmode`), so no device's death can end the job."""

    def __init__(self, devices: int, rate: str | None = None, prefix: str | None = None, daemons: str = "device"):
        if daemons not in ARRANGEMENTS:
            raise ValueError(f"daemons={daemons!r}: choose one of {', '.join(ARRANGEMENTS)}")
        # no remote daemon for mpirun to give up on with daemons on the head: the head's TCP keeps
        # the kernel's patience, so a stalled link never kills a live worker's MPI connection
        super().__init__(devices, rate=rate, prefix=prefix, fast_give_up=daemons == "device")
        self.daemons = daemons

    def up(self) -> None:
        super().up()
        if self.daemons == "head":
            try:
                headmode.start_device_daemons(self)
            except BaseException:
                self.down()
                raise

    def launch_options(self) -> tuple:
        """``(hostfile or None, extra mpirun options, wrap)`` of this cluster's arrangement."""
        if self.daemons == "head":
            return None, headmode.mpirun_extra(self), headmode.relay_wrap(self)
        return self.hostfile, mpirun_extra(self), []

    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        self.down()

    def down(self) -> None:
        for job in list(getattr(self, "_jobs", [])):
            job.kill()
        super().down()

    def kill_everything(self) -> None:
        """SIGKILL every process in every namespace of the cluster (the namespaces stay)."""
        for node in self.nodes:
            kill_netns(node.netns)

    def leftovers(self) -> dict:
        """``{namespace: [pids]}`` of processes still inside the cluster's namespaces."""
        from mpicdc.cluster.netns import netns_pids
        return {n.netns: p for n in self.nodes if (p := netns_pids(n.netns))}

    def mpirun_command(self, np_ranks: int, run_args: list) -> list:
        from mpicdc.runtime.launch import mpirun_command
        hostfile, extra, wrap = self.launch_options()
        return mpirun_command(np_ranks, run_args, hostfile=hostfile, extra=extra, wrap=wrap)

    def launcher_args(self, np_ranks: int) -> list:
        """``python -m mpicdc.launch`` options (before the model) that run ``np_ranks`` ranks on this cluster."""
        hostfile, extra, wrap = self.launch_options()
        return ["-np", str(np_ranks), *(["--hostfile", hostfile] if hostfile else []),
                *(f"--mpirun-arg={a}" for a in extra), *([f"--wrap={shlex.join(wrap)}"] if wrap else [])]

    def launch(self, np_ranks: int, run_args: list, timeout: float = 120, env: dict | None = None,
               mpirun_args: tuple = ()) -> ClusterJob:
        """Start ``mpicdc.launch`` (so the mpirun line of :meth:`mpirun_command` and the master's exit
        code) from the head namespace; master on the head, worker i on device i-1; ``mpirun_args``
        are added to the mpirun line.  Bounded: after ``timeout`` seconds every process of the
        cluster is killed."""
        if np_ranks > len(self.nodes):
            raise ValueError(f"{np_ranks} ranks on {len(self.nodes)} nodes (head + {len(self.devices)} devices)")
        launcher = [sys.executable, "-m", "mpicdc.launch", *self.launcher_args(np_ranks),
                    *(f"--mpirun-arg={a}" for a in mpirun_args), *run_args]
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        job = ClusterJob(self, ["ip", "netns", "exec", self.head.netns, *launcher], env, timeout)
        self._jobs = [*getattr(self, "_jobs", []), job]
        return job

    # faults (see mpicdc.cluster.faults): each takes a device and returns when it took effect
    crash, freeze, thaw = faults.crash, faults.freeze, faults.thaw
    power_off, link_cut, loud_death, link_restore = faults.power_off, faults.link_cut, faults.loud_death, \
        faults.link_restore


@dataclass
class ClusterResult:
    returncode: int
    output: str
    seconds: float
    timed_out: bool
    lines: list = field(default_factory=list)  # (monotonic time, line)

    def explain(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.1f}s{' (TIMED OUT)' if self.timed_out else ''}\n" \
               f"{self.output}"

    def first(self, fragment: str) -> float | None:
        """When the first line containing ``fragment`` was read (monotonic), or None."""
        return next((t for t, line in self.lines if fragment in line), None)


class ClusterJob:
    """A job running from the head; its output (stdout and stderr) read by a thread, line by line, with the
    time each line arrived (for measuring how soon the job notices a fault)."""

    def __init__(self, cluster: Cluster, cmd: list, env: dict, timeout: float):
        self.cluster, self.timed_out = cluster, False
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=str(cluster.state), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        self.lines: list = []
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._guard = threading.Timer(timeout, self._timeout)
        self._guard.daemon = True
        self._guard.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._arrived:
                self.lines.append((time.monotonic(), line))
                self._arrived.notify_all()
        with self._arrived:
            self.lines.append((time.monotonic(), None))  # end of output
            self._arrived.notify_all()

    def _timeout(self) -> None:
        self.timed_out = True
        self.kill()

    def kill(self) -> None:
        """SIGKILL the launcher's group and every process in the cluster's namespaces."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.cluster.kill_everything()

    def wait_for(self, fragment: str) -> float:
        """Wait until a line contains ``fragment``; its arrival time (monotonic).  Raises if the job ends first."""
        seen = 0
        with self._arrived:
            while True:
                for at, line in self.lines[seen:]:
                    if line is None:
                        raise RuntimeError(f"the job ended before printing {fragment!r}\n{self.text}")
                    if fragment in line:
                        return at
                seen = len(self.lines)
                self._arrived.wait()

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines if line is not None)

    def finish(self) -> ClusterResult:
        """Wait for the end (bounded by the job's timeout), then stop the guard."""
        self.proc.wait()
        self._reader.join()
        self._guard.cancel()
        lines = [(t, line) for t, line in self.lines if line is not None]
        return ClusterResult(self.proc.returncode, self.text, time.monotonic() - self.start, self.timed_out, lines)
