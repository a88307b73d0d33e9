"""``run --link RATE``: the failure detector scaled to the links, set before ``MPI_Init``.

The same time bounds how long a layer's replies may take to arrive: ``run`` raises its default
``--layer-timeout`` (30 s) to it (measured: VGG16's conv1_2 takes 27 s over 20 Mbit/s, so a
power-off during it failed the request at the 30 s default).

Every rank computes the same settings on its own (no communication: MPI is not started yet)
from the job's plan, the one in ``--weights`` or the default plan for this world size, and
:func:`mpicdc.runtime.mpienv.detector_for_link`.  Values the user exported
(``OMPI_MCA_mpi_ft_detector_period/timeout``) are left alone.
"""
from __future__ import annotations

import os

from mpicdc.core.models import get_model
from mpicdc.core.plan import make_plan, parity_count
from mpicdc.core.traffic import link_backlog_bytes, rate_bits
from mpicdc.runtime.mpienv import detector_for_link


def job_plan(model_name: str, weights: str | None, code: str, parity: int | None, world_size: int):
    """``(model, plan)`` this job will run: the manifest's, or the default one of ``world_size`` ranks."""
    if weights:
        from mpicdc.store import open_manifest
        manifest = open_manifest(weights)
        return manifest.model, manifest.plan
    model = get_model(model_name)
    r = parity_count(code, parity)
    return model, make_plan(model, max(1, world_size - 1 - r), r, code)


def scale_detector(rate: str, model_name: str, weights: str | None, code: str, parity: int | None,
                   world_size: int) -> tuple:
    """Set the detector's period and timeout for links of ``rate`` in ``os.environ``.  Returns one line
    saying what, and the timeout the link needs (seconds: also the least a layer may take to arrive)."""
    model, plan = job_plan(model_name, weights, code, parity, world_size)
    backlog = link_backlog_bytes(model, plan)
    settings = detector_for_link(rate_bits(rate), backlog)
    kept = [k for k in settings if k in os.environ]
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    period, timeout = (os.environ[k] for k in settings)
    note = (f"failure detector for {rate} links: heartbeat every {period} s, timeout {timeout} s "
            f"(up to {_size(backlog)} queued on the master's link)"
            + (f"; kept the exported {', '.join(kept)}" if kept else ""))
    return note, float(settings["OMPI_MCA_mpi_ft_detector_timeout"])


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.0f} KB"
