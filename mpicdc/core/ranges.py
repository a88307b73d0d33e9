"""Integer lists written as runs, ``"1-3,5"``: one parser and one formatter for every option.

Rank lists (``--inject``, ``--layer-workers``) and block lists (code specs) share this
syntax, so they share these two functions; each caller puts the error in its own context.
"""
from __future__ import annotations


def format_ranges(values) -> str:
    """Increasing integers as runs: ``[1, 2, 3, 5]`` -> ``"1-3,5"``."""
    group = list(values)
    runs, start = [], None
    for k, i in enumerate(group):
        if start is None:
            start = i
        if k + 1 == len(group) or group[k + 1] != i + 1:
            runs.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(runs)


def parse_ranges(text: str, what: str = "number") -> list:
    """``"0,3-5"`` -> ``[0, 3, 4, 5]``, the inverse of :func:`format_ranges`.

    Items are non-negative integers or ``a-b`` runs with ``a <= b``, separated by commas
    (spaces around items are fine); order and repeats are kept.  ``what`` names an item in
    the error message (``"rank"``, ``"block index"``).

    Raises
    ------
    ValueError : an empty or non-numeric item, or a run that goes backwards.
    """
    out = []
    for item in text.split(","):
        item = item.strip()
        lo, dash, hi = (part.strip() for part in item.partition("-"))
        if not _digits(lo) or (dash and not _digits(hi)):
            raise ValueError(f"{item!r} is not a {what} or a range like 2-5")
        a = int(lo)
        b = int(hi) if dash else a
        if a > b:
            raise ValueError(f"range {item!r} runs backwards")
        out.extend(range(a, b + 1))
    return out


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
