"""Shared plumbing for experiments: output folders, CSV, plots, MPI jobs, summaries."""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every experiment shares."""
    p = argparse.ArgumentParser(prog=f"python -m mpicdc.experiments.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="reduced size that finishes in CI-sized time")
    p.add_argument("--out", default=f"results/{name}", help=f"output folder (default results/{name})")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


def out_dir(path) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_csv(path, rows: list, fields: list | None = None) -> Path:
    """Write a list of dicts as CSV (columns in ``fields`` order, or the first row's)."""
    path = Path(path)
    fields = fields or (list(rows[0]) if rows else [])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path) -> list:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def pyplot():
    """matplotlib's pyplot on the Agg backend, with a clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'mpicdc[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, title: str | None = None) -> None:
    """Give ``fig`` its title, lay it out, write it as a PNG and free it."""
    plt = pyplot()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(text: str, folder, problems: list) -> int:
    """Print and keep the summary, with any correctness problems appended; the job's exit code."""
    if problems:
        text += " PROBLEMS: " + "; ".join(problems)
    summary(text, folder)
    return 1 if problems else 0


def summary(text: str, folder: Path | None = None) -> None:
    """Print the one-paragraph summary (and keep a copy next to the data)."""
    print(text, flush=True)
    if folder is not None:
        (Path(folder) / "summary.txt").write_text(text + "\n")


def run_mpi_job(np_ranks: int, run_args: list, timeout: float = 600, hostfile: str | None = None) -> dict:
    """Run ``python -m mpicdc.run`` under the launcher; return its JSON results.

    Raises RuntimeError with the job's output when it fails or times out.
    """
    with tempfile.TemporaryDirectory(prefix="mpicdc-exp-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "mpicdc.launch", "-np", str(np_ranks)]
        if hostfile:
            cmd += ["--hostfile", hostfile]
        cmd += [*run_args, "--output", str(out), "--quiet"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ), start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher, mpirun and every rank
            proc.communicate()
            raise RuntimeError(f"MPI job timed out after {timeout}s: {' '.join(cmd)}") from exc
        if not out.exists():
            raise RuntimeError(f"MPI job failed (exit {proc.returncode}): {' '.join(cmd)}\n{stdout}\n{stderr}")
        result = json.loads(out.read_text())
        result["_returncode"] = proc.returncode
        return result


# ------------------------------------------------------------------ cluster mode (network namespaces)

#: One-way time of a small message between two namespaces of the cluster (veth, bridge, veth): a 32-byte
#: TCP round trip took 9.4 us (median, p90 17 us) on this machine; MPI's own per-message costs are the
#: runtime overheads of :mod:`mpicdc.experiments.simval`, not the link's.
CLUSTER_LATENCY_S = 1e-5
#: TCP goodput through a tbf-shaped link of the cluster as a fraction of its rate: one 8 MB transfer between two
#: namespaces took 27.2 Mbit/s on a 30mbit link and 18.4 on 20mbit (0.91-0.92; 82.4 on 100mbit, with the
#: machine's 2 cores loaded).  tbf counts every frame's Ethernet, IP and TCP headers (66 bytes per 1448 of
#: payload: 0.956) and TCP's acknowledgements and pacing take the rest.
LINK_GOODPUT = 0.91


@dataclass(frozen=True)
class ClusterMode:
    """``--cluster``: every job runs on a fresh cluster of network namespaces (:class:`mpicdc.cluster.Cluster`:
    master on the head, worker i on device i-1, every link shaped to ``rate`` both ways), so transfers
    cross real shaped links; workers emulate only their device's compute (``--device NAME:compute``).
    ``daemons="device"``: one Open MPI daemon per device (no faults are done in these experiments)."""

    rate: str
    daemons: str = "device"

    def worker_device(self, device: str) -> str:
        """The ``--device`` the workers emulate: the device's compute; the network is real."""
        from mpicdc.sim.devices import COMPUTE_ONLY
        return device if device.endswith(COMPUTE_ONLY) else device + COMPUTE_ONLY

    def sim_device(self, device):
        """``device`` as the simulator sees it on this cluster: its compute, the TCP goodput of the cluster's
        links (:data:`LINK_GOODPUT` of the rate) and their one-way latency (:data:`CLUSTER_LATENCY_S`)."""
        from dataclasses import replace

        from mpicdc.sim.devices import get_device, parse_rate, with_link
        base = get_device(device)
        return replace(with_link(base, LINK_GOODPUT * parse_rate(self.rate)), name=f"{base.name}@cluster-{self.rate}",
                       latency_s=CLUSTER_LATENCY_S)

    def as_dict(self) -> dict:
        return {"rate": self.rate, "daemons": self.daemons, "latency_s": CLUSTER_LATENCY_S,
                "goodput": LINK_GOODPUT}


def device_rate(device) -> str:
    """A device model's link rate as ``--rate`` text (``rpi3``: 3.75 MB/s -> ``30mbit``)."""
    from mpicdc.sim.devices import get_device
    return f"{8 * get_device(device).bandwidth_MBps:g}mbit"


def add_cluster_options(p, rate_help: str) -> None:
    """``--cluster`` and ``--rate`` for the experiments that have a cluster mode."""
    p.add_argument("--cluster", action="store_true",
                   help="run every job on a cluster of network namespaces on this machine (root): transfers cross "
                        "real tbf-shaped links instead of sleep padding; compute stays emulated (docs/cluster.md)")
    p.add_argument("--rate", default=None, help=f"with --cluster: every link's rate, both ways ({rate_help})")


def cluster_mode(args, p, default_rate: str) -> ClusterMode | None:
    """The :class:`ClusterMode` asked for by ``args`` (None without ``--cluster``); argparse errors for options
    that do not fit, and exit 2 saying why when namespaces cannot be made here."""
    if not args.cluster:
        if args.rate is not None:
            p.error("--rate applies only with --cluster")
        return None
    if getattr(args, "hostfile", None):
        p.error("--cluster makes its own cluster of network namespaces on this machine; --hostfile does not apply")
    rate = args.rate or default_rate
    from mpicdc.sim.devices import parse_rate
    try:
        parse_rate(rate)
    except ValueError as exc:
        p.error(f"--rate: {exc}")
    from mpicdc.cluster import ClusterUnavailable, check_available
    try:
        check_available()
    except ClusterUnavailable as exc:
        print(f"{p.prog} --cluster: cannot make network namespaces here: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return ClusterMode(rate)


def run_cluster_job(np_ranks: int, run_args: list, mode: ClusterMode, timeout: float = 600) -> dict:
    """Run ``python -m mpicdc.run`` on a fresh cluster of ``np_ranks - 1`` devices; return its JSON results
    (plus ``_returncode`` and ``_cluster``: the mode and the cluster's prefix).  Every file path in
    ``run_args`` must be absolute (the job runs from the cluster's state folder).  The cluster is always
    removed, whatever happened; raises RuntimeError with the job's output when it fails or times out."""
    from mpicdc.cluster import Cluster

    prefix = f"x{random.randrange(10 ** 8)}"
    with Cluster(np_ranks - 1, rate=mode.rate, prefix=prefix, daemons=mode.daemons) as c:
        out = c.state / "result.json"
        job = c.launch(np_ranks, [*run_args, "--link", mode.rate, "--output", str(out), "--quiet"], timeout=timeout,
                       env=one_blas_thread_env())
        done = job.finish()
        if done.timed_out:
            raise RuntimeError(f"cluster job timed out after {timeout}s: {run_args}\n{done.explain()}")
        if not out.exists():
            raise RuntimeError(f"cluster job failed: {run_args}\n{done.explain()}")
        result = json.loads(out.read_text())
    result["_returncode"] = done.returncode
    result["_cluster"] = {**mode.as_dict(), "prefix": prefix, "devices": np_ranks - 1}
    return result


def one_blas_thread_env() -> dict:
    """This environment with one BLAS thread per rank: the devices of a namespace cluster share this machine's
    cores, but each rank is alone on its "node", so the launcher would give each all of them (measured: 6
    AlexNet ranks with 2 threads each on 2 cores took 6-18x the modeled Pi time for their compute)."""
    from mpicdc._threads import THREAD_VARS
    return {**os.environ, **{var: "1" for var in THREAD_VARS}}


def run_job(np_ranks: int, run_args: list, timeout: float = 600, hostfile: str | None = None,
            cluster: ClusterMode | None = None) -> dict:
    """:func:`run_cluster_job` with ``cluster``, else :func:`run_mpi_job` (ranks of this machine or ``hostfile``)."""
    if cluster is not None:
        return run_cluster_job(np_ranks, run_args, cluster, timeout)
    return run_mpi_job(np_ranks, run_args, timeout, hostfile)
