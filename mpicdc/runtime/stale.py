"""Session folders that killed Open MPI processes left behind, removed before a launch.

``mpirun`` (prterun) and each PRRTE daemon keep their session in ``$TMPDIR/ompi.<pid>`` and
``$TMPDIR/prted.<pid>`` (the PMIx rendezvous files and sockets among them) and remove it when
they end normally.  A killed ``mpirun`` or daemon (SIGKILL from a launcher's deadline, a device
that died) leaves its folder.  Process ids are reused (``kernel.pid_max`` is 32768 on many
machines), and a new ``mpirun`` whose pid owns such a folder fails at once: "The PMIx server's
listener thread failed to start" (measured here: exit 213 in 0.3 s, about once in a few hundred
launches after a day of killed jobs).  So the launcher removes the folders of processes that no
longer exist, and only this user's.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

SESSION_NAME = re.compile(r"^(ompi|prted)\.(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def stale_session_dirs(roots=None) -> list:
    """This user's ``ompi.<pid>`` / ``prted.<pid>`` folders under ``roots`` whose process is gone."""
    roots = roots or sorted({tempfile.gettempdir(), "/tmp"})
    found = []
    for root in roots:
        try:
            entries = list(Path(root).iterdir())
        except OSError:
            continue
        for entry in entries:
            match = SESSION_NAME.match(entry.name)
            if not match:
                continue
            try:
                owned = entry.is_dir() and not entry.is_symlink() and entry.stat().st_uid == os.getuid()
            except OSError:
                continue
            if owned and not _alive(int(match.group(2))):
                found.append(entry)
    return found


def remove_stale_session_dirs(roots=None) -> int:
    """Remove the folders :func:`stale_session_dirs` finds; returns how many.  Never raises."""
    removed = 0
    for folder in stale_session_dirs(roots):
        shutil.rmtree(folder, ignore_errors=True)
        removed += not folder.exists()
    return removed
