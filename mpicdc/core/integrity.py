"""Checking replies against the code: the parity the job already has catches wrong values.

A systematic code's blocks obey ``Y_K = G_K Y_D`` (``G = [I ; P]``, ``K`` the blocks in hand).
Every vector ``h`` with ``h G_K = 0`` (the left null space of ``G_K``) gives a check
``h Y_K = 0``; for a parity row ``j`` whose inputs are all in hand it is the residual
``Z_j - sum_i P[j, i] Y_i``.  Replies computed in float32 miss it by rounding only; a wrong
block ``k`` (value error ``e``) adds ``H[:, k] e`` to the syndrome ``S = H Y_K``.  With two or
more independent checks (MDS, ``r >= 2``, ``n + 2`` blocks in hand) only one block's column
fits the syndrome: that block is *located* and can be decoded around.

Tolerance (derived in ``docs/integrity.md``): check row ``q`` may miss zero by

    tau_q = C_TOL * u * sqrt(K) * sum_k |H[q, k]| * max|Y_k|,

``u = 2**-24`` (float32 unit roundoff), ``K`` the GEMM's accumulation length (the weight
matrix's columns), ``max|Y_k|`` the largest magnitude in block ``k``.  Replies carried in a
16-bit wire format (``--wire``) were each rounded once more, by at most ``u_w |Y_k|``; the
tolerance then adds ``2 u_w sum_k |H[q, k]| max|Y_k|`` (``u_w`` the format's unit roundoff).
Pure numpy, local.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

U32 = 2.0 ** -24    # float32 unit roundoff
C_TOL = 8.0         # safety factor over the rounding model; see docs/integrity.md for the measurements


@dataclass
class Verdict:
    """The outcome of checking one layer's replies.

    ``checks`` is the number of independent checks (0: nothing to compare, ``ok`` is True);
    ``residual`` and ``tolerance`` belong to the check row with the largest residual/tolerance
    ratio; ``suspect`` is the located wrong block, or None (consistent, or not locatable).
    """

    checks: int
    ok: bool
    residual: float = 0.0
    tolerance: float = 0.0
    suspect: int | None = None


@lru_cache(maxsize=4096)
def checks_for(code, blocks: frozenset) -> np.ndarray:
    """``H`` (orthonormal rows, columns in sorted ``blocks`` order): the checks ``blocks`` allow."""
    keys = sorted(blocks)
    G = code.generator[keys]
    if not keys:
        return np.zeros((0, 0))
    u, s, _ = np.linalg.svd(G, full_matrices=True)
    rank = int(np.sum(s > 1e-10 * max(1.0, s[0] if s.size else 1.0)))
    H = u[:, rank:].T.copy()
    H[np.abs(H) < 1e-12] = 0.0
    H.setflags(write=False)
    return H


def coverage(code, blocks) -> tuple:
    """``(checks, every block checked)`` for a set of blocks in hand (what strict mode waits for)."""
    H = checks_for(code, frozenset(blocks))
    return H.shape[0], bool(H.shape[0]) and bool(np.all(np.any(H != 0, axis=0)))


def tolerance_factor(accumulation: int) -> float:
    """``C_TOL * u * sqrt(K)``: the relative rounding a check may show for GEMMs of length K."""
    return C_TOL * U32 * math.sqrt(max(1, accumulation))


def check(code, replies: dict, accumulation: int, wire_roundoff: float = 0.0) -> Verdict:
    """Check ``{block: reply}`` (equal shapes) against ``code``; locate a single wrong block if it can.

    ``accumulation`` is the layer's GEMM length (weight columns), setting the tolerance;
    ``wire_roundoff`` the unit roundoff of a 16-bit wire format the replies came in (0: float32).
    """
    keys = sorted(replies)
    H = checks_for(code, frozenset(keys))
    if H.shape[0] == 0:
        return Verdict(0, True)
    Y = np.stack([np.asarray(replies[k], dtype=np.float64).reshape(-1) for k in keys])
    scale = np.max(np.abs(Y), axis=1)
    S = H @ Y
    tol = (tolerance_factor(accumulation) + 2.0 * wire_roundoff) * (np.abs(H) @ scale)
    res = np.max(np.abs(S), axis=1)
    ratio = res / np.where(tol > 0, tol, np.inf)
    ratio[(tol == 0) & (res > 0)] = np.inf
    worst = int(np.argmax(ratio))
    if ratio[worst] <= 1.0:
        return Verdict(H.shape[0], True, float(res[worst]), float(tol[worst]))
    return Verdict(H.shape[0], False, float(res[worst]), float(tol[worst]), _locate(H, S, tol, keys))


def _locate(H: np.ndarray, S: np.ndarray, tol: np.ndarray, keys: list) -> int | None:
    """The one block whose column explains the syndrome within tolerance, or None (zero or several)."""
    if H.shape[0] < 2:
        return None
    fits = []
    for c, k in enumerate(keys):
        h = H[:, c]
        norm = float(h @ h)
        if norm < 1e-12:
            continue
        remainder = S - np.outer(h, (h @ S) / norm)
        if np.all(np.max(np.abs(remainder), axis=1) <= tol):
            fits.append(k)
    return fits[0] if len(fits) == 1 else None
