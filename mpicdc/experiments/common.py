"""Shared plumbing for experiments: output folders, CSV, plots, MPI jobs, summaries."""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
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
