"""Protecting grouped convolutions: code them, replicate them (2MR), or keep them on the master.

A grouped convolution is block-diagonal: output channels of group ``g`` read only
input channels of group ``g``.  Split by whole groups, data block ``i`` computes
``W_i X_i`` with its own slice ``X_i`` of the input, so a parity block
``sum_i P[j, i] W_i X_i`` is no row block of the layer: it is the *block-diagonal
embedding* of the data blocks.  A parity worker stores it compactly, one slab
``P[j, i] W_i`` per data block it touches (``(block_rows, s_j * cols)`` for
``s_j`` touched blocks), and computes each slab against its block's own input
channels: it does ``s_j`` times a data block's work (for the sum code ``s_j = n``:
as much as all data blocks together).  Replication (2MR, the paper's CDC+2MR) is
the embedding with ``s_j = 1``: a replica is a plain copy of one data block.

Which to use is a cost question, answered per layer by :func:`choose` in FLOPs:
the work of the slowest block the master waits for after losing any one rank
(ties: the work it waits for with no loss).  Depthwise layers (one input
channel per group) stay on the master: 2 * kernel FLOPs per input value, cheaper
to compute than to send (``docs/codes.md``, "Grouped convolutions").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mpicdc.core.codes import Code, make_code, split_rows
from mpicdc.core.kernels import lower_gemm
from mpicdc.core.models import Layer, Model, conv_groups

KINDS = ("code", "2mr", "master")


def layer_groups(model: Model, name: str) -> int:
    """``groups`` of linear layer ``name`` (1 for dense and ordinary convolutions)."""
    layer = model.layer(name)
    if layer.op != "conv" or layer.attrs.get("groups", 1) == 1:
        return 1
    return conv_groups(layer, model.shapes()[layer.inputs[0]][0])


def is_depthwise(model: Model, name: str) -> bool:
    """A grouped convolution with one input channel per group."""
    groups = layer_groups(model, name)
    return groups > 1 and groups == model.shapes()[model.layer(name).inputs[0]][0]


def layer_flops(model: Model, name: str) -> float:
    """Multiply-add FLOPs of linear layer ``name``: ``2 * rows * cols * output positions``."""
    rows, cols = model.weight_shapes()[name]
    return 2.0 * rows * cols * math.prod(model.shapes()[name][1:])


def embedded_blocks(code: Code, j: int) -> tuple:
    """The data blocks parity ``j`` (0-based among the parities) combines: non-zero ``P[j, i]``."""
    return tuple(int(i) for i in np.flatnonzero(code.parity[j]))


def stored_cols(model: Model, lp, block: int) -> int:
    """Columns of the weight block ``block`` of layer plan ``lp`` as stored and computed.

    ``cols`` of the layer, except a parity block of a grouped convolution split by rows: one
    slab of ``cols`` per data block it embeds (a band split codes the input, not the weights).
    """
    cols = model.weight_shapes()[lp.layer][1]
    if block < lp.n or getattr(lp, "banded", False) or layer_groups(model, lp.layer) == 1:
        return cols
    return cols * len(embedded_blocks(lp.code_obj, block - lp.n))


def embed(code: Code, j: int, parts) -> np.ndarray:
    """Parity ``j``'s slabs ``[P[j, i] * parts[i] for embedded i]`` side by side, in float64.

    ``parts`` are equal-shape rows of the (zero-padded) data blocks' weights.
    """
    return np.hstack([code.parity[j, i] * np.asarray(parts[i], np.float64) for i in embedded_blocks(code, j)])


def block_gemm(layer: Layer, lp, block: int, W: np.ndarray, b, x: np.ndarray, *, workspace=None) -> tuple:
    """The product a worker computes for block ``block`` of layer plan ``lp``: ``(Y, lowered)``.

    Plain layers: one :func:`~mpicdc.core.kernels.lower_gemm`.  A grouped data block
    reads its own groups' channels (``row0``); a grouped parity block sums its slabs,
    each against the channels of the data block it embeds.  Local.
    """
    grouped = layer.op == "conv" and conv_groups(layer, np.shape(x)[0]) > 1
    if not grouped or block < lp.n:
        return lower_gemm(layer, W, b, x, workspace=workspace, row0=lp.rows[block][0] if block < lp.n else 0)
    blocks = embedded_blocks(lp.code_obj, block - lp.n)
    cols = W.shape[1] // len(blocks)
    Y = lowered = None
    for k, i in enumerate(blocks):
        part, lowered = lower_gemm(layer, W[:, k * cols:(k + 1) * cols], None, x, workspace=workspace,
                                   row0=lp.rows[i][0])
        Y = part if Y is None else np.add(Y, part, out=Y)
    if b is not None:
        Y += b[:, None]
    return Y, lowered


@dataclass(frozen=True)
class Option:
    """One way to run a grouped layer, with its modeled cost in FLOPs.

    ``ranks`` and ``rows`` are those of its layer plan (data ranks, then parity or
    replica ranks); empty for ``master``.  ``block`` is a data block's work (what the
    master waits for with no loss), ``parity`` the largest parity or replica block's,
    ``loss`` what it waits for after losing the worst single rank.
    """

    kind: str
    code: str
    ranks: tuple
    rows: tuple
    block: float
    parity: float
    loss: float

    def describe(self) -> str:
        g = 1e9
        if self.kind == "master":
            return f"master {self.block / g:.3g} GFLOP"
        n = len(self.rows)
        what = "replica" if self.kind == "2mr" else "parity"
        return (f"{self.kind if self.kind == '2mr' else 'code ' + self.code} {n}+{len(self.ranks) - n}: "
                f"block {self.block / g:.3g}, {what} {self.parity / g:.3g} GFLOP "
                f"({self.parity / self.block:.1f}x), after a loss {self.loss / g:.3g}")


def _group_blocks(groups: int, rows: int, k: int, speeds=None) -> tuple:
    per = rows // groups
    return tuple((s.start * per, s.stop * per) for s in split_rows(groups, k, speeds))


def options(model: Model, name: str, data_ranks, parity_ranks, code: str, speeds=None) -> list:
    """Every way to protect grouped layer ``name`` on these ranks, with costs (see :class:`Option`).

    ``code``: the plan's code over ``data_ranks`` (whole groups, at least one per rank,
    and only when it survives any single loss); ``2mr``: ``k`` blocks of whole groups on
    ``k`` data ranks, each copied on another rank (parity ranks first, then the data
    ranks left over), ``k = min(groups, (n + r) // 2, n)``, only when the plan's code survives
    at most one loss (2MR survives one, never less protection than the code); ``master``: always.
    """
    groups = layer_groups(model, name)
    rows = model.weight_shapes()[name][0]
    flops = layer_flops(model, name)
    n, r = len(data_ranks), len(parity_ranks)
    out = []
    tolerance = make_code(code, n, r).tolerance if r else 0
    if r and groups >= n:
        c = make_code(code, n, r)
        if tolerance >= 1:
            blocks = _group_blocks(groups, rows, n, speeds)
            unit = flops * max(b - a for a, b in blocks) / rows
            slabs = [len(embedded_blocks(c, j)) for j in range(r)]
            worst = max(min(slabs[j] for j in range(r) if c.parity[j, i]) for i in range(n))
            out.append(Option("code", code, tuple(data_ranks) + tuple(parity_ranks), blocks, unit,
                              unit * max(slabs), unit * max(1, worst)))
    k = min(groups, (n + r) // 2, n)
    if r and k >= 1 and tolerance <= 1:  # 2MR survives one loss: never offered below a stronger code
        blocks = _group_blocks(groups, rows, k, None if speeds is None else speeds[:k])
        unit = flops * max(b - a for a, b in blocks) / rows
        spare = (tuple(parity_ranks) + tuple(data_ranks[k:]))[:k]
        out.append(Option("2mr", "replication", tuple(data_ranks[:k]) + spare, blocks, unit, unit, unit))
    out.append(Option("master", "", (), (), flops, 0.0, flops))
    return out


def choose(opts: list) -> Option:
    """The option with the least work after a loss; ties: least work with no loss, then code, 2MR, master."""
    return min(opts, key=lambda o: (o.loss, o.block, KINDS.index(o.kind)))


def format_choices(plan, model: Model) -> list:
    """Lines for ``prepare --show``: each grouped layer's options, their costs and the one the plan took."""
    data = tuple(range(1, plan.workers + 1))
    parity = tuple(range(plan.workers + 1, plan.world_size))
    lines = []
    for name in model.weight_shapes():
        groups = layer_groups(model, name)
        if groups == 1:
            continue
        lp = plan.for_layer(name)
        head = f"  {name} ({groups} groups, {layer_flops(model, name) / 1e9:.3g} GFLOP): "
        if is_depthwise(model, name):
            lines.append(head + "depthwise, on the master (2 x kernel FLOPs per input value: cheaper to compute "
                                "than to send)")
            continue
        if not parity or not plan.code or plan.code == "none":
            lines.append(head + ("split, unprotected (no parity workers)" if lp else "on the master"))
            continue
        opts = options(model, name, data, parity, plan.code)
        taken = "master" if lp is None else next(
            (o.kind for o in opts if (o.code, o.ranks, o.rows) == (lp.code, lp.ranks, lp.rows)), "as planned")
        lines.append(head + "; ".join(o.describe() for o in opts) + f" -> {taken}")
    if lines:
        lines = ["grouped convolutions, protection by modeled cost (GFLOP the master waits for):"] + lines
    return lines
