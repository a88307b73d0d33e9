"""The launcher removes session folders of killed Open MPI processes (a reused pid would make mpirun fail)."""
from __future__ import annotations

import os
import subprocess
import sys

from mpicdc.runtime.stale import remove_stale_session_dirs, stale_session_dirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folders_of_dead_processes_go_and_the_others_stay(tmp_path):
    dead = _dead_pid()
    for name in (f"ompi.{dead}", f"prted.{dead}", f"ompi.{os.getpid()}", "ompi.notapid", f"other.{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pmix.vm.tool").write_text("x")
    assert sorted(p.name for p in stale_session_dirs([tmp_path])) == sorted([f"ompi.{dead}", f"prted.{dead}"])
    assert remove_stale_session_dirs([tmp_path]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"ompi.{os.getpid()}", "ompi.notapid", f"other.{dead}"])


def test_a_file_or_a_missing_root_is_left_alone(tmp_path):
    dead = _dead_pid()
    (tmp_path / f"ompi.{dead}").write_text("a file, not a session folder")
    assert stale_session_dirs([tmp_path, tmp_path / "missing"]) == []
