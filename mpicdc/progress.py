"""Progress bar (``tqdm``): drawn on a terminal only, silent everywhere else (logs, pipes, CI).

>>> with Progress(total=3, label="layers", unit="") as bar:   # doctest: +SKIP
...     for _ in range(3):
...         bar.update(1)
"""
from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """A ``tqdm`` bar on ``stream`` (stderr by default) with the status text of the current step.

    Parameters
    ----------
    total : amount that means 100 % (bytes with ``unit="B"``, or a count).
    label : text in front of the bar.
    enabled : ``None`` (default) draws only when ``stream`` is a terminal; ``False`` never
        draws; ``True`` draws even when the stream is not a terminal.
    stream : where to draw (``sys.stderr`` when omitted).
    unit : ``"B"`` to show amounts as kB/MB/GB, any other string is appended to counts.
    rate : maximum redraws per second.

    Local, no I/O except writes to ``stream``.
    """

    def __init__(self, total: float, label: str = "", *, enabled: bool | None = None, stream=None,
                 unit: str = "B", rate: float = 10.0):
        stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = bool(enabled)
        self.status = ""
        self._bar = tqdm(total=total, desc=label or None, file=stream, disable=not self.enabled, unit=unit or "it",
                         unit_scale=unit == "B", unit_divisor=1000, mininterval=1.0 / rate, leave=True,
                         dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, amount: float = 0.0, status: str | None = None) -> None:
        """Advance by ``amount``; ``status`` (e.g. the current layer) is shown after the bar."""
        if status is not None and status != self.status:
            self.status = status
            self._bar.set_postfix_str(status, refresh=False)
        self._bar.update(amount)

    def close(self) -> None:
        """Draw the final state and end the line (nothing at all when disabled)."""
        self._bar.close()
