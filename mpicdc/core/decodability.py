"""When does a set of replies decode?  Closed-form rules per code, for fast simulation.

The simulator asks, for thousands of requests at once, when the replies in hand first
determine every data block.  Asking :meth:`Code.decodable` per request and arrival is exact
but slow; most codes have a closed form (every data block; any ``n`` of ``n + r``; each
independent component on its own) that vectorises over requests.  :func:`decode_structure`
finds it and checks it against the code; :meth:`Code.decodability` caches it per code.
Pure: numpy only.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mpicdc.core.codes import Code

log = logging.getLogger(__name__)

__all__ = ["Decodability", "decode_structure"]


@dataclass(frozen=True)
class Decodability:
    """When a layer can be decoded, as a function of its reply arrival times.

    ``kind`` is ``"all"`` (uncoded: every data block), ``"kofn"`` (any ``k`` of the
    ``m`` blocks: sum and MDS codes), ``"components"`` (blocks fall into
    independent components, component ``c`` needing any ``k_c`` of its members:
    groups and replication codes) or ``"generic"`` (ask ``code.decodable`` on
    growing prefixes of the arrival order).
    """

    kind: str
    n: int
    m: int
    k: int = 0
    components: tuple = ()
    code: object = field(default=None, compare=False, repr=False)

    def decodable(self, received) -> bool:
        """Closed-form answer for a set of received block indices."""
        rec = set(received)
        if self.kind == "all":
            return all(i in rec for i in range(self.n))
        if self.kind == "kofn":
            return len(rec & set(range(self.m))) >= self.k
        if self.kind == "components":
            return all(len(rec & set(idx)) >= k for idx, k in self.components)
        return bool(self.code.decodable(tuple(sorted(rec))))

    def time(self, arrival: np.ndarray) -> np.ndarray:
        """Earliest decodable time per row of ``arrival`` (``(requests, m)``, inf = never)."""
        if self.kind == "all":
            return arrival[:, :self.n].max(axis=1)
        if self.kind == "kofn":
            return _kth(arrival, self.k)
        if self.kind == "components":
            out = np.full(arrival.shape[0], -np.inf)
            for (size, k), idx in self._component_groups().items():
                sub = arrival[:, idx]                       # (R, C, size)
                np.maximum(out, _kth(sub, k, axis=2).max(axis=1), out=out)
            return out
        return self._generic_time(arrival)

    def _component_groups(self) -> dict:
        groups: dict = {}
        for idx, k in self.components:
            groups.setdefault((len(idx), k), []).append(idx)
        return {key: np.array(v, dtype=np.intp) for key, v in groups.items()}

    def _generic_time(self, arrival: np.ndarray) -> np.ndarray:
        order = np.argsort(arrival, axis=1, kind="stable")
        ranked = np.take_along_axis(arrival, order, axis=1)
        finite = np.isfinite(ranked).sum(axis=1)
        out = np.full(arrival.shape[0], np.inf)
        dec = self.code.decodable
        for i in range(arrival.shape[0]):
            f = int(finite[i])
            row = order[i]
            if f < self.n or not dec(tuple(sorted(row[:f].tolist()))):
                continue
            lo, hi = self.n, f  # smallest decodable prefix length lies in [lo, hi]
            while lo < hi:
                mid = (lo + hi) // 2
                if dec(tuple(sorted(row[:mid].tolist()))):
                    hi = mid
                else:
                    lo = mid + 1
            out[i] = ranked[i, lo - 1]
        return out


def _kth(a: np.ndarray, k: int, axis: int = 1) -> np.ndarray:
    """k-th smallest (1-based) along ``axis``."""
    size = a.shape[axis]
    if k == size:
        return a.max(axis=axis)
    if k == 1:
        return a.min(axis=axis)
    return np.take(np.partition(a, k - 1, axis=axis), k - 1, axis=axis)


def _components_from(P: np.ndarray, code: Code) -> tuple | None:
    """``((blocks, data blocks needed), ...)`` per connected component of ``P``, None when a
    component with several parities and several data blocks is not MDS on its own."""
    r, n = P.shape
    parent = list(range(n + r))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for j in range(r):
        for i in np.flatnonzero(P[j]):
            parent[find(n + j)] = find(int(i))
    members: dict = {}
    for b in range(n + r):
        members.setdefault(find(b), []).append(b)
    comps = []
    everything = set(range(n + r))
    for idx in members.values():
        data = [b for b in idx if b < n]
        par = [b for b in idx if b >= n]
        if not data:
            continue  # an all-zero parity row helps nobody
        if len(data) > 1 and len(par) > 1:
            # several parities over several blocks: closed form only if any |par| losses decode
            if math.comb(len(idx), len(par)) > 5000:
                return None
            if not all(code.decodable(tuple(sorted(everything - set(lost))))
                       for lost in combinations(idx, len(par))):
                return None
        comps.append((tuple(idx), len(data)))
    return tuple(comps)


def _cheap_tolerance(code: Code, limit: int = 20000) -> int | None:
    """``code.tolerance`` when enumerating its erasure patterns is cheap, else None."""
    m, r = code.n + code.r, code.r
    if sum(math.comb(m, t) for t in range(1, r + 1)) > limit:
        return None
    return code.tolerance


def decode_structure(code: Code, *, verify: int = 200, seed: int = 0) -> Decodability:
    """Find the closed-form decodability rule of ``code`` (uncached: see :meth:`Code.decodability`).

    Uncoded (``r = 0``) needs every data block; sum and MDS codes (or any code that
    tolerates any ``r`` losses) need any ``n`` of ``n + r`` blocks; a code whose parity
    matrix splits into components with one parity or one data block each (groups,
    replication) needs each component to be decodable on its own.  Any closed form is
    checked against ``code.decodable`` on ``verify`` random erasure patterns and dropped
    (with a log message) if it ever disagrees; the fallback asks ``code.decodable``.
    ``code.tolerance`` is only consulted when enumerating its patterns is cheap.
    """
    n, r = int(code.n), int(code.r)
    m = n + r
    rule = None
    if r == 0:
        rule = Decodability("all", n, m, k=n, code=code)
    elif code.kind in ("sum", "mds") and _cheap_tolerance(code) in (None, r):
        rule = Decodability("kofn", n, m, k=n, code=code)  # exact check when small, else verified
    else:
        comps = _components_from(code.parity, code)
        if comps:
            rule = Decodability("components", n, m, components=comps, code=code)
        elif _cheap_tolerance(code) == r:
            rule = Decodability("kofn", n, m, k=n, code=code)
    if rule is None:
        return Decodability("generic", n, m, code=code)
    rng = np.random.default_rng(seed)
    for _ in range(verify):
        lost = rng.choice(m, size=int(rng.integers(0, min(m, r + 2, 16) + 1)), replace=False)
        received = tuple(sorted(set(range(m)) - set(lost.tolist())))
        if rule.decodable(received) != bool(code.decodable(received)):
            log.warning("code %s: closed-form rule %r disagrees with code.decodable on %s; "
                        "using code.decodable", code.spec, rule.kind, received)
            return Decodability("generic", n, m, code=code)
    return rule
