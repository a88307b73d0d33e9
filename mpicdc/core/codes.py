"""Systematic erasure codes over row blocks: encode weight blocks, decode missing replies.

A layer's weight matrix is split by output rows into ``n`` data blocks ``W_0..W_{n-1}``
(zero-padded to equal height).  A systematic code adds ``r`` parity blocks
``W_{n+j} = sum_i P[j, i] W_i``, i.e. its generator is ``G = [I_n ; P]`` with ``P`` a real
``r x n`` matrix.  Because every block is a linear function of the weights, a worker's reply
``Y_k = W_k X + b_k`` obeys the same relation, so the master can rebuild the replies it lacks
from the ones in hand.  Block indices are ``0..n-1`` for data and ``n..n+r-1`` for parity.

With data replies ``D`` in hand, data blocks ``M`` missing and parity replies ``Q`` in hand, the
missing blocks are decodable exactly when ``rank(P[Q, M]) = |M|``.  The decoder picks ``|M|``
parity rows ``Q'`` (the best-conditioned square choice), and

    Y_M = P[Q', M]^{-1} (Z_{Q'} - P[Q', D] Y_D),

which it caches per erasure pattern as plain coefficients: decoding is then a few scaled block
additions (for the paper's single sum parity ``P = ones(1, n)`` just subtractions).

Codes: ``none`` (uncoded), ``replication`` (2MR: parity rows are rows of the identity),
``sum`` (the paper's eq. 1/2), ``groups`` (one sum parity per group of workers, the paper's
"summation of some rows" generalisation), and ``mds`` (any ``r`` losses among ``n + r``).
``docs/codes.md`` compares the MDS constructions; see :func:`mds`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Iterable, Mapping, Sequence

import numpy as np

from mpicdc.core.decodability import Decodability, decode_structure
from mpicdc.core.ranges import format_ranges, parse_ranges

KINDS = ("none", "replication", "sum", "groups", "mds")
MDS_CONSTRUCTIONS = ("optimized", "rotation", "vandermonde", "cauchy", "gaussian")

_DECODE_CHUNK = 1 << 16        # elements per add/subtract decode step: the chunks stay in cache
_GEMM_CHUNK_WORK = 1 << 17      # m * K * chunk of one decode GEMM: below OpenBLAS's threading threshold
_ENCODE_CHUNK = 1 << 22        # float64 elements per encode step (32 MB of temporaries)
_MAX_ROW_SUBSETS = 64          # square parity-row subsets the decoder compares by conditioning
_GAUSSIAN_DRAWS = 32           # draws of mds-gaussian, the best-conditioned one is kept
_GAUSSIAN_SEED = 20190602      # DAC 2019 opening day: any fixed seed, chosen once
_QUADRANT_MARGIN = 0.7         # mds-rotation r=2: gap to the axes, in units of the angle step


class DecodeError(ValueError):
    """The replies in hand do not determine every data block.

    Attributes ``missing`` (data blocks not received), ``received`` (sorted block indices in
    hand) and ``tolerance`` (losses the code always survives) say why.
    """

    def __init__(self, code: "Code", received: Iterable[int]):
        self.received = sorted(received)
        self.missing = code.missing(self.received)
        self.tolerance = code.tolerance
        parity = [i for i in self.received if i >= code.n]
        super().__init__(
            f"cannot decode code {code.spec!r} (n={code.n}, r={code.r}): data blocks "
            f"{self.missing} missing and only parity blocks {parity} in hand; this code "
            f"always survives {self.tolerance} lost block(s)")


@dataclass(frozen=True)
class _Plan:
    """How to rebuild the missing data blocks from one set of replies (cached per set).

    ``outputs[i] = sum_k coef[i, k] * reply[sources[k]]`` for ``targets[i]``; ``copies`` are
    blocks that are a single reply as-is (replication).  When every coefficient is 0 or +-1,
    ``signs[i] = (positions of +1, positions of -1)`` and additions and subtractions suffice.
    """

    targets: tuple
    sources: tuple
    coef: np.ndarray
    copies: tuple
    signs: tuple | None


@dataclass(frozen=True, eq=False)
class Code:
    """A systematic code ``G = [I_n ; P]`` over ``n`` equal-shape data blocks.

    Parameters
    ----------
    kind : one of :data:`KINDS`.
    n : number of data blocks.
    parity : ``P``, shape ``(r, n)``; stored as a read-only float64 copy.
    spec : canonical spec string, ``make_code(spec, n, r)`` rebuilds this code.

    Every method is local (no communication).  Caches (decodability, decode plans) are
    per instance and grow with the erasure patterns actually seen, at most ``2**(n+r)``.
    """

    kind: str
    n: int
    parity: np.ndarray
    spec: str
    _decodable: dict = field(default_factory=dict, init=False, repr=False)
    _plans: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown code kind {self.kind!r}; expected one of {KINDS}")
        n = _check_int("n", self.n, 1)
        P = np.array(self.parity, dtype=np.float64, copy=True)
        if P.ndim != 2 or P.shape[1] != n:
            raise ValueError(f"parity matrix must have shape (r, n={n}), got {P.shape}")
        if not np.all(np.isfinite(P)):
            raise ValueError(f"parity matrix of code {self.spec!r} has non-finite entries")
        P.setflags(write=False)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "parity", P)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Code):
            return NotImplemented
        return (self.kind, self.n, self.spec) == (other.kind, other.n, other.spec) \
            and np.array_equal(self.parity, other.parity)

    def __hash__(self) -> int:
        return hash((self.kind, self.n, self.spec, self.parity.tobytes()))

    def __repr__(self) -> str:
        return f"Code(spec={self.spec!r}, n={self.n}, r={self.r}, tolerance={self.tolerance})"

    # ------------------------------------------------------------------ shape

    @property
    def r(self) -> int:
        """Number of parity blocks."""
        return self.parity.shape[0]

    @property
    def size(self) -> int:
        """Total number of blocks (ranks) ``n + r``."""
        return self.n + self.r

    @property
    def generator(self) -> np.ndarray:
        """``G = [I_n ; P]``, shape ``(n + r, n)``: block ``k`` is ``sum_i G[k, i] W_i``."""
        return np.vstack([np.eye(self.n), self.parity])

    @cached_property
    def tolerance(self) -> int:
        """Largest ``t`` such that *every* loss of ``t`` blocks (data or parity) is decodable.

        Computed by enumeration: 0 for uncoded, 1 for sum and groups, ``r`` for MDS, 1 for
        replication of every block and 0 for partial replication.
        """
        everything = frozenset(range(self.size))
        for t in range(1, self.r + 1):
            for lost in itertools.combinations(range(self.size), t):
                if not self.decodable(everything.difference(lost)):
                    return t - 1
        return self.r

    # ------------------------------------------------------------------ decodability

    def decodable(self, received: Iterable[int]) -> bool:
        """True when the blocks ``received`` determine every data block.

        Cached per set of indices, so calling it on every reply arrival costs one dict
        lookup once a pattern has been seen.
        """
        key = received if isinstance(received, frozenset) else frozenset(received)
        ok = self._decodable.get(key)
        if ok is None:
            ok = self._rank_check(key)
            self._decodable[key] = ok
        return ok

    def missing(self, received: Iterable[int]) -> list:
        """Data blocks (``0..n-1``) not among ``received``."""
        have = set(received)
        return [i for i in range(self.n) if i not in have]

    def _split(self, key: frozenset) -> tuple:
        bad = sorted((i for i in key if not _is_index(i, self.size)), key=repr)
        if bad:
            raise ValueError(f"block indices {bad} out of range for code {self.spec!r} "
                             f"with n + r = {self.size} blocks (0..{self.size - 1})")
        missing = [i for i in range(self.n) if i not in key]
        have = [i for i in range(self.n) if i in key]
        rows = [j for j in range(self.r) if self.n + j in key]
        return missing, have, rows

    def _rank_check(self, key: frozenset) -> bool:
        missing, _, rows = self._split(key)
        if not missing:
            return True
        if len(rows) < len(missing):
            return False
        return int(np.linalg.matrix_rank(self.parity[np.ix_(rows, missing)])) == len(missing)

    # ------------------------------------------------------------------ decoding

    def _plan(self, key: frozenset) -> _Plan:
        """Cached decode plan for the reply set ``key``; raises DecodeError when impossible."""
        plan = self._plans.get(key)
        if plan is None:
            if not self.decodable(key):
                raise DecodeError(self, key)
            missing, have, _ = self._split(key)
            plan = self._solve(missing, have, self._choose_rows(missing, key)) if missing \
                else _Plan((), (), np.zeros((0, 0)), (), ())
            self._plans[key] = plan
        return plan

    def _choose_rows(self, missing: list, key: frozenset) -> list:
        """The ``|M|`` parity rows to decode with: the square choice of best conditioning.

        Only rows in hand that touch a missing block count.  Up to ``_MAX_ROW_SUBSETS``
        choices are compared exactly; beyond that QR with column pivoting picks the rows.
        """
        P = self.parity
        useful = [j for j in range(self.r) if self.n + j in key and np.any(P[j, missing])]
        m = len(missing)
        if len(useful) == m:
            return useful
        if math.comb(len(useful), m) > _MAX_ROW_SUBSETS:
            from scipy.linalg import qr
            pivots = qr(P[np.ix_(useful, missing)].T, pivoting=True, mode="r")[1]
            return sorted(useful[k] for k in pivots[:m])
        subsets = [list(s) for s in itertools.combinations(useful, m)
                   if np.linalg.matrix_rank(P[np.ix_(s, missing)]) == m]
        conds = _system_conditions(P, [(missing, s) for s in subsets])
        return subsets[int(np.argmin(conds))]

    def _solve(self, missing: list, have: list, rows: list) -> _Plan:
        """LU-solve ``P[Q', M] C = [I | -P[Q', D]]`` once: row ``k`` of ``C`` rebuilds ``M[k]``."""
        P = self.parity
        used = [d for d in have if np.any(P[rows, d])]
        rhs = np.hstack([np.eye(len(rows)), -P[np.ix_(rows, used)]])
        coef = np.linalg.solve(P[np.ix_(rows, missing)], rhs)
        sources = [self.n + j for j in rows] + used
        copies = [(t, sources[int(np.flatnonzero(c)[0])]) for t, c in zip(missing, coef)
                  if np.count_nonzero(c) == 1 and c[np.flatnonzero(c)[0]] == 1.0]
        keep = [i for i, t in enumerate(missing) if t not in dict(copies)]
        coef = coef[keep]
        live = [k for k in range(len(sources)) if np.any(coef[:, k])]
        coef = coef[:, live]
        signs = tuple((tuple(np.flatnonzero(c == 1.0)), tuple(np.flatnonzero(c == -1.0)))
                      for c in coef) if np.all(np.isin(coef, (-1.0, 0.0, 1.0))) else None
        return _Plan(tuple(missing[i] for i in keep), tuple(sources[k] for k in live), coef,
                     tuple(copies), signs)

    def decode(self, replies: Mapping[int, np.ndarray], *,
               out: Mapping[int, np.ndarray] | None = None) -> list:
        """Every data block from a decodable set of replies.

        Parameters
        ----------
        replies : ``{block index: reply}``; replies are equal-shape float arrays (float32 or
            float64, any shape, e.g. ``(rows, L)``).  Extra replies beyond what is needed are
            ignored.
        out : optional ``{missing data block: array}`` buffers to write rebuilt blocks into
            (e.g. row slices of the layer output, or memory reused across requests); every
            missing block with a buffer is written there, the others are allocated.

        Returns
        -------
        list of the ``n`` data blocks.  Received data blocks are returned as-is (no copy); a
        block rebuilt from a single copy (replication) is that reply itself unless ``out``
        has a buffer for it; the others are the ``out`` buffers or new arrays of the replies'
        dtype.

        Raises
        ------
        DecodeError : the replies do not determine every data block.
        ValueError : indices out of range, or replies of different shapes or dtypes.
        """
        plan = self._plan(frozenset(replies))
        blocks = [replies.get(i) for i in range(self.n)]
        for target, source in plan.copies:
            blocks[target] = replies[source]
            if out is not None and out.get(target) is not None:
                np.copyto(out[target], replies[source])
                blocks[target] = out[target]
        if not plan.targets:
            return blocks
        arrays = [np.asarray(replies[k]) for k in plan.sources]
        shape, dtype = arrays[0].shape, arrays[0].dtype
        if any(a.shape != shape or a.dtype != dtype for a in arrays):
            raise ValueError(f"replies {list(plan.sources)} must share one shape and dtype, got "
                             f"shapes {[a.shape for a in arrays]} and dtypes {[str(a.dtype) for a in arrays]}")
        if dtype.kind != "f":
            raise ValueError(f"replies must be float32 or float64 arrays, got dtype {dtype}")
        outs = []
        for target in plan.targets:
            buf = None if out is None else out.get(target)
            if buf is None:
                buf = np.empty(shape, dtype)
            elif buf.shape != shape or buf.dtype != dtype:
                raise ValueError(f"out[{target}] has shape {buf.shape} and dtype {buf.dtype}, "
                                 f"expected {shape} and {dtype}")
            blocks[target] = buf
            outs.append(buf)
        if plan.signs is not None:
            _add_subtract(plan.signs, arrays, outs)
        else:
            _mix(plan.coef, arrays, outs)
        return blocks

    # ------------------------------------------------------------------ encoding

    def encode(self, blocks: Sequence[np.ndarray]) -> list:
        """The ``r`` parity blocks ``sum_i P[j, i] blocks[i]``.

        Computed in float64 (chunk by chunk along the first axis, so memory stays bounded)
        and returned in the blocks' dtype (float64 for integer input).
        """
        if len(blocks) != self.n:
            raise ValueError(f"code {self.spec!r} encodes n={self.n} data blocks, got {len(blocks)}")
        arrays = [np.asarray(b) for b in blocks]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"data blocks must share one shape (pad them), got {[a.shape for a in arrays]}")
        dtype = np.result_type(*arrays)
        if not np.issubdtype(dtype, np.floating):
            dtype = np.dtype(np.float64)
        shape = arrays[0].shape
        parity = [np.empty(shape, dtype) for _ in range(self.r)]
        if self.r == 0:
            return parity
        if not shape:       # scalar blocks
            values = self.parity @ np.array([float(a) for a in arrays])
            return [np.asarray(v, dtype) for v in values]
        per_row = max(1, math.prod(shape[1:]) * self.n)
        step = max(1, _ENCODE_CHUNK // per_row)
        for lo in range(0, shape[0], step):
            part = np.stack([a[lo:lo + step] for a in arrays]).astype(np.float64, copy=False)
            mixed = np.tensordot(self.parity, part, axes=1)
            for j in range(self.r):
                parity[j][lo:lo + step] = mixed[j]
        return parity

    # ------------------------------------------------------------------ simulation

    def decodability(self, verify: int = 200) -> Decodability:
        """The closed-form rule of when a set of replies decodes (:func:`decode_structure`),
        found once per code: equal codes share it, so a plan's layers pay for it once."""
        return _decodability(self, verify)

    # ------------------------------------------------------------------ numerics

    @cached_property
    def _worst_condition(self) -> float:
        t = self.tolerance
        systems = []
        for lost in itertools.combinations(range(self.size), t):
            key = frozenset(range(self.size)).difference(lost)
            missing, _, _ = self._split(key)
            if missing:
                systems.append((missing, self._choose_rows(missing, key)))
        if not systems:
            return 1.0
        return float(max(_system_conditions(self.parity, systems)))

    def worst_condition(self) -> float:
        """Worst 2-norm condition number of the systems decoded over all loss patterns of size
        :attr:`tolerance`.

        For each pattern it is ``cond([I[D] ; P_hat[Q']])``, the ``n x n`` rows of the
        generator the decoder uses, with every parity row scaled to unit length (decoding
        error does not depend on a parity row's scale, so neither should the number).  Float32
        decode error grows roughly in proportion: see ``docs/codes.md``.
        """
        return self._worst_condition


@lru_cache(maxsize=256)
def _decodability(code: Code, verify: int) -> Decodability:
    return decode_structure(code, verify=verify)


# ---------------------------------------------------------------------- helpers

def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    return int(value)


def _is_index(i, size: int) -> bool:
    return isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < size


def _system_conditions(P: np.ndarray, systems: list) -> np.ndarray:
    """Condition numbers of ``G_S = [I[D] ; P_hat[Q]]`` for each ``(M, Q)`` with ``|M| = |Q|``.

    ``D`` is the other data rows and ``P_hat`` is ``P`` with unit rows.  Ordering the
    columns ``(D, M)``, ``G_S = [[I, 0], [B, A]]`` with ``A = P_hat[Q, M]`` and
    ``B = P_hat[Q, D]``; its singular values are those of the ``2m x 2m`` matrix
    ``[[I, 0], [L, A]]`` with ``L L^T = B B^T``, plus ones (``n - 2m`` of them).  That keeps
    the cost independent of ``n`` for the few-parity codes used here.
    """
    norms = np.linalg.norm(P, axis=1, keepdims=True)
    Pn = P / np.where(norms > 0, norms, 1.0)
    n = P.shape[1]
    out = np.empty(len(systems))
    for m, (members, rows, cols) in _group_systems(_as_key(systems)).items():
        sub = Pn[rows]                                                  # (k, m, n)
        A = np.take_along_axis(sub, cols[:, None, :].repeat(m, axis=1), axis=2)
        if n >= 2 * m:
            BBt = np.einsum("kij,klj->kil", sub, sub) - np.einsum("kij,klj->kil", A, A)
            lam, V = np.linalg.eigh(BBt)
            L = V * np.sqrt(np.maximum(lam, 0.0))[:, None, :]
            H = np.zeros((len(members), 2 * m, 2 * m))
            H[:, :m, :m] = np.eye(m)
            H[:, m:, :m] = L
            H[:, m:, m:] = A
            s = np.linalg.svd(H, compute_uv=False)
            top, bottom = np.maximum(s[:, 0], 1.0), np.minimum(s[:, -1], 1.0 if n > 2 * m else np.inf)
        else:
            G = np.repeat(np.eye(n)[None], len(members), axis=0)
            G[np.arange(len(members))[:, None], cols] = sub
            s = np.linalg.svd(G, compute_uv=False)
            top, bottom = s[:, 0], s[:, -1]
        with np.errstate(divide="ignore"):
            out[members] = np.where(bottom > 0, top / bottom, np.inf)
    return out


def _as_key(systems) -> tuple:
    return systems if isinstance(systems, tuple) else tuple((tuple(M), tuple(Q)) for M, Q in systems)


@lru_cache(maxsize=64)
def _group_systems(systems: tuple) -> dict:
    """``{m: (positions, parity rows (k, m), missing columns (k, m))}`` for systems of size m."""
    by_size = {}
    for b, (missing, rows) in enumerate(systems):
        by_size.setdefault(len(missing), []).append(b)
    return {m: (np.array(members), np.array([systems[b][1] for b in members]),
                np.array([systems[b][0] for b in members])) for m, members in by_size.items()}


def _contiguous(arrays: list) -> bool:
    return all(a.flags.c_contiguous for a in arrays)


def _add_subtract(signs: tuple, sources: list, outs: list) -> None:
    """``outs[i] = sum(sources[plus]) - sum(sources[minus])`` for ``signs[i] = (plus, minus)``:
    the sum-parity path, subtractions into the output buffer, no multiplication.

    Chunks of ``_DECODE_CHUNK`` elements keep the running sum in cache, so every reply is read
    from memory once and every output written once (decoding is memory-bound).
    """
    whole = outs[0].size <= _DECODE_CHUNK or not _contiguous(sources + outs)
    flat = (lambda a: a) if whole else (lambda a: a.reshape(-1))
    step = max(outs[0].size, 1) if whole else _DECODE_CHUNK
    for (plus, minus), out in zip(signs, outs):
        plus = [flat(sources[k]) for k in plus]
        minus = [flat(sources[k]) for k in minus]
        out = flat(out)
        for lo in range(0, max(out.size, 1), step):
            part = slice(lo, lo + step) if not whole else Ellipsis
            o = out[part]
            if plus and minus:
                np.subtract(plus[0][part], minus[0][part], out=o)
                rest_plus, rest_minus = plus[1:], minus[1:]
            elif plus:
                np.copyto(o, plus[0][part])
                rest_plus, rest_minus = plus[1:], minus
            else:
                np.negative(minus[0][part], out=o)
                rest_plus, rest_minus = plus, minus[1:]
            for x in rest_plus:
                np.add(o, x[part], out=o)
            for x in rest_minus:
                np.subtract(o, x[part], out=o)


def _mix(coef: np.ndarray, sources: list, outs: list) -> None:
    """``outs[i] = sum_k coef[i, k] sources[k]`` for general coefficients.

    One small GEMM per chunk: the chunk of every reply is copied into a ``(K, chunk)`` scratch
    and multiplied by ``coef`` (``m x K``).  That is 2 to 4 times faster than numpy
    multiply-add passes, and the chunk keeps ``m * K * chunk`` under OpenBLAS's threshold for
    threading, so the GEMM runs on the calling thread without waking the BLAS pool.
    """
    dtype = outs[0].dtype
    coef = coef.astype(dtype)
    if not _contiguous(sources + outs):
        mixed = np.tensordot(coef, np.stack(sources), axes=1)
        for i, out in enumerate(outs):
            out[...] = mixed[i]
        return
    m, K = coef.shape
    src = [a.reshape(-1) for a in sources]
    dst = [a.reshape(-1) for a in outs]
    size = dst[0].size
    if size == 0:
        return
    step = min(size, max(1024, _GEMM_CHUNK_WORK // (m * K)))
    S, O = np.empty((K, step), dtype), np.empty((m, step), dtype)
    for lo in range(0, size, step):
        w = min(step, size - lo)
        for k, x in enumerate(src):
            S[k, :w] = x[lo:lo + w]
        np.matmul(coef, S[:, :w], out=O[:, :w])
        for i, x in enumerate(dst):
            x[lo:lo + w] = O[i, :w]


# ---------------------------------------------------------------------- constructors

def uncoded(n: int) -> Code:
    """No parity: every block must arrive (tolerance 0)."""
    n = _check_int("n", n, 1)
    return Code("none", n, np.zeros((0, n)), "none")


def replication(n: int, copies: int | Sequence[int]) -> Code:
    """2MR: parity block ``j`` is a copy of data block ``blocks[j]``.

    ``copies`` is a count (copy blocks ``0..copies-1``) or the data block indices to copy.
    Tolerance is 1 when every block is copied, else 0.
    """
    n = _check_int("n", n, 1)
    if isinstance(copies, (int, np.integer)) and not isinstance(copies, bool):
        count = _check_int("copies", copies, 1)
        if count > n:
            raise ValueError(f"replication copies at most the n={n} data blocks, got copies={count}")
        blocks = list(range(count))
    else:
        blocks = list(copies)
        if not blocks:
            raise ValueError("replication needs at least one block to copy, got none")
        bad = [b for b in blocks if not _is_index(b, n)]
        if bad:
            raise ValueError(f"replicated blocks {bad} are not data blocks 0..{n - 1}")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"replicated blocks must be distinct, got {blocks}")
    P = np.eye(n)[[int(b) for b in blocks]]
    return Code("replication", n, P, "replication:" + ",".join(str(int(b)) for b in blocks))


def sum_parity(n: int) -> Code:
    """The paper's single parity ``P = ones(1, n)`` (eq. 1/2): one loss, decoded by subtraction."""
    n = _check_int("n", n, 1)
    return Code("sum", n, np.ones((1, n)), "sum")


def group_parity(n: int, groups: int | Sequence[Sequence[int]]) -> Code:
    """One sum parity per group of data blocks: survives one loss in every group.

    ``groups`` is a count ``G`` (contiguous near-equal groups, as :func:`split_rows` splits
    ``n`` items) or an explicit partition of ``0..n-1`` such as ``[[0, 1, 2], [3, 4, 5]]``.
    """
    n = _check_int("n", n, 1)
    if isinstance(groups, (int, np.integer)) and not isinstance(groups, bool):
        count = _check_int("groups", groups, 1)
        if count > n:
            raise ValueError(f"cannot make {count} groups of n={n} data blocks")
        parts = [list(range(s.start, s.stop)) for s in split_rows(n, count)]
    else:
        parts = [list(g) for g in groups]
        flat = [i for g in parts for i in g]
        if any(not g for g in parts) or not all(_is_index(i, n) for i in flat) \
                or sorted(flat) != list(range(n)):
            raise ValueError(f"groups must partition the data blocks 0..{n - 1} into non-empty "
                             f"groups, got {parts}")
        parts = [[int(i) for i in g] for g in parts]
    P = np.zeros((len(parts), n))
    for j, g in enumerate(parts):
        P[j, g] = 1.0
    contiguous = [list(range(s.start, s.stop)) for s in split_rows(n, len(parts))]
    spec = f"groups:{len(parts)}" if parts == contiguous else \
        "groups:" + "/".join(format_ranges(g) for g in parts)
    return Code("groups", n, P, spec)


def mds(n: int, r: int, construction: str | None = None) -> Code:
    """A code that decodes from *any* ``n`` of its ``n + r`` blocks.

    Parameters
    ----------
    construction : ``None`` for the default, or one of :data:`MDS_CONSTRUCTIONS`:

        - ``optimized``: parity found by a minimax search of the worst condition number
          (``python -m mpicdc.bench codes --search``), stored in this module for
          ``r = 3, n <= 16``; other sizes use ``rotation``, which is already near-optimal.
        - ``rotation``: unit vectors on a circle.  ``r = 1``: the sum parity; ``r = 2``:
          column ``i`` is the unit vector at angle ``theta_i``, the angles evenly spread over
          the two open quadrants (every pair of columns independent, no zero entry; this is
          within 2% of the best found by search); ``r >= 3``: columns are one unit vector
          rotated about the diagonal (the real embedding ``(1, cos t, sin t, ...)`` of complex
          Vandermonde columns on the unit circle), no ``r`` of them dependent, cone angle and
          phase picked on a fixed grid (a second or two for n = 16).
        - ``vandermonde``: ``P[j, i] = (i + 1) ** j``, totally positive so exactly MDS, and
          badly conditioned (kept as the textbook baseline).
        - ``cauchy``: ``P[j, i] = 1 / (x_j - y_i)`` on interlaced integer nodes, exactly MDS.
        - ``gaussian``: the best-conditioned of 32 seeded standard normal draws.

    The default is ``optimized`` (which is ``rotation`` outside its table): the best worst-case
    condition number of the five for every n <= 16, r <= 3 measured in ``docs/codes.md``.
    """
    n = _check_int("n", n, 1)
    r = _check_int("r", r, 1)
    name = "optimized" if construction is None else construction
    if name not in MDS_CONSTRUCTIONS:
        raise ValueError(f"unknown MDS construction {name!r}; choose one of {MDS_CONSTRUCTIONS}")
    P = _mds_parity(name, n, r)
    return Code("mds", n, P, "mds" if construction is None else f"mds-{name}")


@lru_cache(maxsize=None)
def _mds_parity(name: str, n: int, r: int) -> np.ndarray:
    if n == 1 or r == 1:
        return np.ones((r, n))          # all-ones columns/rows are optimal here
    if name == "optimized":
        table = _OPTIMIZED.get((n, r))
        return np.array(table).reshape(r, n) if table else _mds_parity("rotation", n, r)
    if name == "rotation":
        return _rotation_parity(n, r)
    if name == "vandermonde":
        return np.arange(1.0, n + 1) ** np.arange(r)[:, None]
    if name == "cauchy":
        # n + r evenly spaced nodes; every ((n+r)/r)-th one (centred) is an x, the rest y.
        xs = [int((j + 0.5) * (n + r) / r) for j in range(r)]
        ys = [k for k in range(n + r) if k not in xs]
        return 1.0 / (np.array(xs, float)[:, None] - np.array(ys, float)[None, :])
    # gaussian: best of a fixed set of draws
    rng = np.random.default_rng([_GAUSSIAN_SEED, n, r])
    draws = [rng.standard_normal((r, n)) for _ in range(_GAUSSIAN_DRAWS)]
    systems = _all_square_systems(n, r)
    best = draws[_stable_argmin([np.max(_system_conditions(D, systems)) for D in draws])]
    return best / np.linalg.norm(best, axis=1, keepdims=True)


@lru_cache(maxsize=64)
def _all_square_systems(n: int, r: int) -> tuple:
    """Every ``(M, Q)`` with ``|M| = |Q|``: the systems of all loss patterns of size ``r``."""
    return tuple((M, Q) for m in range(1, min(n, r) + 1)
                 for M in itertools.combinations(range(n), m)
                 for Q in itertools.combinations(range(r), m))


def _rotation_parity(n: int, r: int) -> np.ndarray:
    if r == 2:
        # k angles per open quadrant, step s, margin c*s to both axes: 2cs + (k-1)s = 90 deg.
        angles = []
        for k, offset in (((n + 1) // 2, 0.0), (n // 2, 90.0)):
            step = 90.0 / (2 * _QUADRANT_MARGIN + k - 1)
            angles += [offset + (_QUADRANT_MARGIN + i) * step for i in range(k)]
        t = np.radians(angles)
        return np.vstack([np.cos(t), np.sin(t)])
    # r >= 3: the columns are one unit vector rotated about the diagonal axis (1, ..., 1)
    # by n evenly spaced angles (r > 3: at 1, 1, 2, 2, ... times the rate in the successive
    # planes, the real trigonometric moment curve).  Around the diagonal every coordinate
    # stays away from zero, and no r columns are linearly dependent.  Exact coincidences of
    # two columns' 2-D projections depend on the cone angle and the phase, so both are picked
    # on a fixed grid, by the worst condition number.
    systems = _all_square_systems(n, r)
    step = 2 * np.pi / n
    grid = [(a, f) for a in np.linspace(0.35, 1.4, 15) for f in np.linspace(0, 1, 8, endpoint=False)]
    conds = [np.max(_system_conditions(_cone(n, r, a, f * step), systems)) for a, f in grid]
    a0, f0 = grid[_stable_argmin(conds)]
    fine = [(a0 + da, (f0 + df) * step) for da in np.linspace(-0.04, 0.04, 5)
            for df in np.linspace(-1 / 16, 1 / 16, 5)]
    conds = [np.max(_system_conditions(_cone(n, r, a, f), systems)) for a, f in fine]
    return _cone(n, r, *fine[_stable_argmin(conds)])


def _stable_argmin(conds: list) -> int:
    """First index of the smallest condition number, compared to 6 digits: ties (from symmetric
    choices) and last-bit differences between machines cannot change which one is picked."""
    return int(np.argmin(np.round(np.log(conds), 6)))


def _cone(n: int, r: int, angle: float, phase: float) -> np.ndarray:
    """``n`` unit vectors at ``angle`` from the diagonal of R^r, evenly rotated about it."""
    axis = np.full(r, 1 / math.sqrt(r))
    basis = np.linalg.qr(np.column_stack([axis, np.eye(r)[:, :r - 1]]))[0][:, 1:]
    t = phase + 2 * np.pi * np.arange(n) / n
    waves = np.vstack([np.cos((j // 2 + 1) * t) if j % 2 == 0 else np.sin((j // 2 + 1) * t)
                       for j in range(r - 1)])
    return math.cos(angle) * axis[:, None] + math.sin(angle) * basis @ waves


# mds-optimized, r = 3: row-normalised P, row-major, found by
# ``python -m mpicdc.bench codes --search 3 2,3,...,16`` (a minimax search of the worst
# condition number from mds-rotation and 16 (n <= 10) or 8 seeded Gaussian starts; rounded to
# 6 decimals).  Only sizes where it beats mds-rotation are kept.
_OPTIMIZED = {
    # worst condition 3.732 (mds-rotation 3.756)
    (2, 3): (0.707107, 0.707107, -0.5, 0.866025, 0.866025, -0.5),
    # worst condition 5.652 (mds-rotation 5.923)
    (3, 3): (-0.738508, 0.476764, 0.476762, -0.476764, -0.476757, 0.738512, -0.476749,
             0.738524, -0.476753),
    # worst condition 9.76 (mds-rotation 20.44)
    (4, 3): (-0.345673, -0.322337, -0.857445, -0.203463, -0.781919, -0.202884, 0.20327,
             0.553283, 0.3037, 0.805503, 0.203012, -0.466602),
    # worst condition 13.04 (mds-rotation 27.34)
    (5, 3): (-0.666472, 0.566532, -0.402563, 0.22233, 0.152867, 0.313049, 0.209624, 0.392552,
             0.271473, 0.793891, -0.154499, 0.537885, 0.448029, -0.596757, 0.3605),
    # worst condition 17.41 (mds-rotation 19.3)
    (6, 3): (0.577672, 0.115236, -0.391177, -0.391172, 0.115236, 0.577669, -0.391176,
             -0.391173, 0.115238, 0.577668, 0.577673, 0.115237, 0.115237, 0.577667, 0.577675,
             0.115236, -0.391175, -0.391173),
    # worst condition 25.4 (mds-rotation 61.55)
    (7, 3): (0.624186, 0.189999, -0.170067, -0.30122, -0.170074, 0.19, 0.624187, -0.359978,
             -0.333534, -0.14012, 0.301109, 0.666699, 0.419418, 0.168739, 0.168742, 0.419396,
             0.666703, 0.301111, -0.140124, -0.333551, -0.359975),
    # worst condition 35.31 (mds-rotation 66.43)
    (8, 3): (0.560473, 0.282907, -0.056618, -0.320352, -0.320352, -0.056616, 0.282892,
             0.560487, -0.257867, -0.286557, -0.177139, 0.217588, 0.454923, 0.657539, 0.340406,
             0.132205, 0.13219, 0.340393, 0.657551, 0.454919, 0.217595, -0.177117, -0.286557,
             -0.257879),
    # worst condition 48.32 (mds-rotation 50.8)
    (9, 3): (-0.441792, 0.467783, 0.181358, -0.395083, 0.041584, -0.233475, -0.235544,
             0.473879, -0.246447, -0.041715, -0.275226, 0.253567, 0.427942, 0.156556,
             -0.200745, 0.190989, -0.204422, 0.729388, -0.334728, -0.446189, -0.387298,
             0.147844, 0.579053, -0.118309, -0.405297, 0.041623, 0.041437),
    # worst condition 59.67 (mds-rotation 117.2)
    (10, 3): (0.129996, 0.444079, -0.095175, -0.173986, -0.228026, 0.067343, 0.326888,
              0.499698, 0.435233, -0.379544, 0.266636, 0.244683, 0.29774, 0.226615, -0.327471,
              0.566856, -0.325055, -0.248713, -0.363047, -0.033869, -0.469893, 0.18756,
              -0.428834, 0.443718, -0.326338, -0.072491, 0.094129, -0.033959, -0.20778,
              -0.445307),
    # worst condition 85.97 (mds-rotation 141.7)
    (11, 3): (0.149985, 0.308071, 0.059079, 0.271544, 0.298893, -0.376993, -0.155263,
              -0.026402, -0.545991, 0.201411, 0.45873, 0.545708, -0.324069, -0.470367,
              -0.239828, 0.380609, -0.094159, 0.261654, -0.188043, 0.023309, 0.023272,
              0.244503, -0.023298, 0.242965, 0.260249, -0.101825, -0.243723, -0.354555,
              -0.368247, 0.356298, -0.26043, 0.586784, 0.050244),
    # worst condition 102.8 (mds-rotation 110.1)
    (12, 3): (0.472874, 0.363662, 0.183084, -0.019675, -0.181712, -0.277876, -0.277875,
              -0.181712, -0.019673, 0.183081, 0.363663, 0.472874, -0.181712, -0.277875,
              -0.277875, -0.18171, -0.019673, 0.183083, 0.363662, 0.472875, 0.472875, 0.363662,
              0.183081, -0.019674, -0.019672, 0.183081, 0.363662, 0.472877, 0.472876, 0.363662,
              0.183082, -0.019673, -0.181711, -0.277873, -0.277874, -0.18171),
    # worst condition 104.9 (mds-rotation 194.8)
    (13, 3): (0.484662, 0.383706, 0.23464, 0.086023, -0.095926, -0.164804, -0.195239,
              -0.164807, -0.095926, 0.086013, 0.234633, 0.3837, 0.484662, -0.124667, -0.215997,
              -0.212901, -0.15022, -0.025412, 0.116442, 0.259896, 0.388349, 0.5854, 0.397418,
              0.311644, 0.197316, 0.025601, 0.025601, 0.197311, 0.311646, 0.397426, 0.585406,
              0.388354, 0.259891, 0.116443, -0.025412, -0.150207, -0.212889, -0.215989,
              -0.124661),
    # worst condition 168.3 (mds-rotation 247.5)
    (14, 3): (0.453398, 0.341935, 0.237589, 0.080604, -0.076828, -0.202736, -0.259925,
              -0.259925, -0.202735, -0.076828, 0.080603, 0.23759, 0.341935, 0.453397,
              -0.169479, -0.261254, -0.297915, -0.239553, -0.128947, 0.011966, 0.180594,
              0.299447, 0.430726, 0.430834, 0.378793, 0.286563, 0.133231, -0.057754, -0.057754,
              0.133231, 0.286564, 0.378793, 0.430835, 0.430725, 0.299447, 0.180595, 0.011966,
              -0.128947, -0.239552, -0.297915, -0.261254, -0.169479),
    # worst condition 180.1 (mds-rotation 182.9)
    (15, 3): (0.413237, 0.348577, 0.267014, 0.136755, -0.011337, -0.148584, -0.238102,
              -0.277782, -0.238233, -0.14864, -0.011315, 0.136783, 0.267186, 0.348879,
              0.413374, -0.148582, -0.238103, -0.27778, -0.238234, -0.148637, -0.01132,
              0.136777, 0.267186, 0.348882, 0.413376, 0.413237, 0.348581, 0.267013, 0.13675,
              -0.011325, -0.011315, 0.136785, 0.267184, 0.348878, 0.413378, 0.413237, 0.348582,
              0.267014, 0.136751, -0.011329, -0.148582, -0.238102, -0.277779, -0.23823,
              -0.148643),
    # worst condition 197.3 (mds-rotation 329.5)
    (16, 3): (-0.398463, 0.026756, 0.343576, 0.207202, -0.349073, -0.210312, -0.078348,
              0.280805, 0.216827, -0.01016, -0.340572, -0.010223, -0.266848, -0.391184,
              -0.084525, 0.184046, 0.102631, -0.188376, 0.120111, -0.252909, 0.161589,
              0.324094, -0.317441, -0.308653, 0.305228, -0.109984, 0.101543, 0.445819,
              -0.13992, -0.032949, -0.436025, -0.152649, -0.127288, -0.278494, 0.342091,
              0.235737, 0.262962, -0.044836, -0.105955, -0.13849, -0.027955, 0.516058,
              0.200113, -0.079492, 0.272288, -0.304821, 0.021978, -0.388682),
}


# ---------------------------------------------------------------------- spec strings

_GRAMMAR = ("none | sum | replication[:i,j,...] | groups:G | groups:0-2/3-5 | mds | "
            "mds-" + " | mds-".join(MDS_CONSTRUCTIONS))


@dataclass(frozen=True)
class CodeSpec:
    """A parsed code spec string (grammar in :data:`_GRAMMAR`), before ``n`` is known.

    ``kind`` is one of :data:`KINDS`; ``arg`` is the replicated block list (tuple) or None for
    ``replication``, the group count (int) or the groups (tuple of lists) for ``groups``, the
    construction name or None for ``mds``, None otherwise; ``parity`` is the number of parity
    blocks the spec implies, None when it comes from ``r`` (``mds``, bare ``replication``).
    """

    text: str
    kind: str
    arg: object
    parity: int | None


def parse_code_spec(spec: str) -> CodeSpec:
    """Parse a code spec; the one place that knows the grammar (``make_code``, ``parity_count``).

    Raises
    ------
    ValueError : the spec does not follow the grammar; the message lists it.
    """
    if not isinstance(spec, str):
        raise ValueError(f"code spec must be a string ({_GRAMMAR}), got {spec!r}")
    text = spec.strip()
    kind, colon, arg = text.partition(":")
    if kind in ("none", "sum") and not colon:
        return CodeSpec(text, kind, None, 0 if kind == "none" else 1)
    if kind == "replication":
        if not colon:
            return CodeSpec(text, kind, None, None)
        blocks = tuple(_parse_blocks(arg, text))
        return CodeSpec(text, kind, blocks, len(blocks))
    if kind == "groups" and arg:
        if arg.isascii() and arg.isdigit():
            return CodeSpec(text, kind, int(arg), int(arg))
        groups = tuple(_parse_blocks(g, text) for g in arg.split("/"))
        return CodeSpec(text, kind, groups, len(groups))
    if kind == "groups":
        raise ValueError(f"code {text!r} needs a group count or the groups, e.g. groups:2 or "
                         f"groups:0-2/3-5; expected {_GRAMMAR}")
    if kind == "mds" and not colon:
        return CodeSpec(text, "mds", None, None)
    if kind.startswith("mds-") and not colon:
        name = kind[4:]
        if name not in MDS_CONSTRUCTIONS:
            raise ValueError(f"unknown MDS construction {name!r} in code spec {text!r}; expected {_GRAMMAR}")
        return CodeSpec(text, "mds", name, None)
    raise ValueError(f"unknown code spec {spec!r}; expected {_GRAMMAR}")


def make_code(spec: str, n: int, r: int | None = None) -> Code:
    """Build a code from its spec string.

    Parameters
    ----------
    spec : ``none`` (r = 0), ``sum`` (r = 1), ``replication`` (copies of data blocks
        ``0..r-1``), ``replication:i,j`` (copies of those blocks), ``groups:G`` (``G``
        contiguous near-equal groups, r = G), ``groups:0-2/3-5`` (explicit groups; a group is
        a comma list of indices or ``a-b`` ranges), ``mds`` (default construction) or
        ``mds-NAME`` for NAME in :data:`MDS_CONSTRUCTIONS`.
    n : number of data blocks.
    r : number of parity blocks; required for ``replication`` without indices and for
        ``mds``, otherwise checked against the spec when given.

    Raises
    ------
    ValueError : unknown spec, ``n < 1``, ``r < 0``, ``r`` inconsistent with the spec,
        groups that do not partition ``0..n-1``, replicated blocks out of range.
    """
    parsed = parse_code_spec(spec)
    n = _check_int("n", n, 1)
    if r is not None:
        r = _check_int("r", r, 0)
    kind, arg = parsed.kind, parsed.arg
    if parsed.parity is None:
        if r is None or r < 1:
            raise ValueError(f"code {spec!r} needs r >= 1 parity blocks, got r={r}")
    elif r is not None and r != parsed.parity:
        raise ValueError(f"code {spec!r} has {parsed.parity} parity block(s), but r={r} was given")
    if kind == "none":
        return uncoded(n)
    if kind == "sum":
        return sum_parity(n)
    if kind == "replication":
        return replication(n, r if arg is None else list(arg))
    if kind == "groups":
        return group_parity(n, arg if isinstance(arg, int) else list(arg))
    return mds(n, r, arg)


def _parse_blocks(text: str, spec: str) -> list:
    """``"0,3-5"`` -> ``[0, 3, 4, 5]``, with the code spec named in the error."""
    try:
        return parse_ranges(text, "block index")
    except ValueError as exc:
        raise ValueError(f"bad block list {text!r} in code spec {spec!r}: {exc}; "
                         f"expected comma-separated indices or ranges like 0,3-5") from None


# ---------------------------------------------------------------------- row blocks

def split_rows(m: int, n: int, weights: Sequence[float] | None = None) -> list:
    """``n`` contiguous row blocks covering ``0..m-1``, each at least one row.

    Near-equal (the first ``m % n`` blocks get one extra row), or proportional to positive
    ``weights`` (e.g. device speeds) by largest remainder.  Pure: every rank computes the
    same answer without communication.
    """
    n = _check_int("n", n, 1)
    m = _check_int("m", m, 1)
    if m < n:
        raise ValueError(f"cannot split m={m} rows into n={n} non-empty blocks")
    if weights is None:
        sizes = [m // n + (i < m % n) for i in range(n)]
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"weights must be {n} finite positive numbers, got {weights!r}")
        ideal = m * w / w.sum()
        sizes = np.maximum(1, np.floor(ideal)).astype(int)
        while sizes.sum() < m:
            sizes[np.argmax(ideal - sizes)] += 1
        while sizes.sum() > m:
            sizes[np.argmax(np.where(sizes > 1, sizes - ideal, -np.inf))] -= 1
        sizes = sizes.tolist()
    edges = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def row_blocks_problem(rows: Sequence[tuple], m: int) -> str | None:
    """Why ``(start, stop)`` pairs do not tile rows ``0..m-1`` with non-empty blocks in order
    (None when they do); shared by :func:`encode_rows` and the plan's own check."""
    edge = 0
    for start, stop in rows:
        if start != edge or stop is None or stop <= start:
            return f"row blocks {list(rows)} must be contiguous non-empty ranges tiling 0..{m - 1} in order"
        edge = stop
    if edge != m:
        return f"row blocks end at row {edge}, but there are {m} rows"
    return None


def block_rows(blocks: Sequence[slice]) -> int:
    """Rows of every block after zero-padding: the longest block's length."""
    if not blocks:
        raise ValueError("need at least one row block")
    return max(s.stop - s.start for s in blocks)


def encode_rows(W: np.ndarray, b: np.ndarray | None, code: Code, blocks: Sequence[slice]) -> list:
    """The ``n + r`` ``(weight block, bias block)`` pairs a layer's ranks hold.

    Data blocks are ``W[blocks[i]]`` zero-padded to :func:`block_rows` rows; parity blocks are
    encoded from the padded float32 data blocks in float64 (so they match what data workers
    hold exactly); everything is returned float32.  A full-height float32 data block is a view
    of ``W``.  ``b=None`` means a zero bias.

    Raises
    ------
    ValueError : ``W`` not 2-D, ``b`` not of shape ``(rows,)``, or ``blocks`` not ``code.n``
        contiguous slices tiling ``0..rows-1`` in order.
    """
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"W must be a (rows, cols) matrix, got shape {W.shape}")
    m = W.shape[0]
    b = np.zeros(m, np.float32) if b is None else np.asarray(b)
    if b.shape != (m,):
        raise ValueError(f"bias must have shape ({m},) to match W {W.shape}, got {b.shape}")
    if len(blocks) != code.n:
        raise ValueError(f"code {code.spec!r} has n={code.n} data blocks, got {len(blocks)} row blocks")
    if not all(isinstance(s, slice) and s.step in (None, 1) for s in blocks):
        raise ValueError(f"row blocks must be unit-step slices, got {list(blocks)}")
    problem = row_blocks_problem([(s.start, s.stop) for s in blocks], m)
    if problem:
        raise ValueError(f"{problem} (W has shape {W.shape})")
    rows = block_rows(blocks)
    weights, biases = [], []
    for s in blocks:
        length = s.stop - s.start
        if length == rows:
            weights.append(np.ascontiguousarray(W[s], dtype=np.float32))
            biases.append(np.ascontiguousarray(b[s], dtype=np.float32))
            continue
        Wi = np.zeros((rows, W.shape[1]), np.float32)
        Wi[:length] = W[s]
        bi = np.zeros(rows, np.float32)
        bi[:length] = b[s]
        weights.append(Wi)
        biases.append(bi)
    pairs = list(zip(weights, biases))
    return pairs + list(zip(code.encode(weights), code.encode(biases)))
