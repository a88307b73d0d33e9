"""Run a module or code and write its own peak RSS (``VmHWM``, bytes) to a file when it exits.

``python -m mpicdc.bench.peak_rss REPORT -m MODULE [ARGS...]`` or ``... REPORT -c CODE``.

Why not ``ru_maxrss`` of the child: on Linux a child's ``ru_maxrss`` starts from its parent's
RSS at ``fork`` (``exec`` folds the old address space's high-water mark into it), so a child of a
large process (pytest with torch loaded, a benchmark that just wrote a 550 MB ONNX file) reports
the parent's size.  ``VmHWM`` in ``/proc/self/status`` belongs to the address space made by
``exec``: the process's own peak.  Imports only the standard library itself.
"""
from __future__ import annotations

import atexit
import runpy
import sys


def own_peak_bytes() -> int:
    """``VmHWM`` of this process in bytes (Linux ``/proc``); else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) < 3 or argv[1] not in ("-m", "-c"):
        print("usage: python -m mpicdc.bench.peak_rss REPORT (-m MODULE [ARGS...] | -c CODE)", file=sys.stderr)
        sys.exit(2)
    report, mode, target = argv[0], argv[1], argv[2]

    def write():
        with open(report, "w") as fh:
            fh.write(f"{own_peak_bytes()}\n")
    atexit.register(write)            # runs after sys.exit() too
    if mode == "-c":
        sys.argv = ["-c"] + argv[3:]
        exec(compile(target, "<peak_rss -c>", "exec"), {"__name__": "__main__"})  # noqa: S102 -- as python -c
    else:
        sys.argv = [target] + argv[3:]
        runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
