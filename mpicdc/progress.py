"""A tiny progress bar: drawn on a terminal only, silent everywhere else (logs, pipes, CI).

>>> with Progress(total=3, label="layers") as bar:   # doctest: +SKIP
...     for _ in range(3):
...         bar.update(1)
"""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def _fmt_amount(value: float, unit: str) -> str:
    if unit == "B":
        for scale, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= scale:
                return f"{value / scale:.1f} {suffix}"
        return f"{value:.0f} B"
    return f"{value:.0f}{unit}"


class Progress:
    """Progress bar on ``stream`` (stderr by default), redrawn at most ``rate`` times a second.

    Parameters
    ----------
    total : amount that means 100 % (bytes with ``unit="B"``, or a count).
    label : text in front of the bar.
    enabled : ``None`` (default) draws only when ``stream`` is a terminal; ``False`` never
        draws; ``True`` draws even when the stream is not a terminal.
    stream : where to draw (``sys.stderr`` when omitted).
    unit : ``"B"`` to show amounts as kB/MB/GB, any other string is appended to counts.
    width : characters of the bar itself.
    rate : maximum redraws per second.

    Local, no I/O except writes to ``stream``.
    """

    def __init__(self, total: float, label: str = "", *, enabled: bool | None = None, stream=None,
                 unit: str = "B", width: int = 30, rate: float = 10.0):
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.total = max(float(total), 1e-12)
        self.label, self.unit, self.width = label, unit, width
        self.done = 0.0
        self.status = ""
        self._interval = 1.0 / rate
        self._start = time.monotonic()
        self._last = -1.0
        self._drawn = 0
        self._closed = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, amount: float = 0.0, status: str | None = None) -> None:
        """Advance by ``amount``; ``status`` (e.g. the current layer) is shown after the bar."""
        self.done = min(self.done + amount, self.total)
        if status is not None:
            self.status = status
        if self.enabled and not self._closed:
            now = time.monotonic()
            if now - self._last >= self._interval or self.done >= self.total:
                self._draw(now)

    def _draw(self, now: float) -> None:
        self._last = now
        frac = self.done / self.total
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"{self.label} [{bar}] {frac * 100:3.0f}% "
                f"{_fmt_amount(self.done, self.unit)}/{_fmt_amount(self.total, self.unit)} "
                f"{now - self._start:5.1f}s {self.status}").rstrip()
        pad = max(self._drawn - len(line), 0)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._drawn = len(line)

    def close(self) -> None:
        """Draw the final state and end the line (nothing at all when disabled)."""
        if self.enabled and not self._closed:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True
