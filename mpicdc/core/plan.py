"""Which layers are split over which ranks, with which code: the distribution plan.

A plan is pure data (JSON in the manifest).  Rank 0 is the master; data
workers come next and parity workers last, so a world of ``1 + n + r`` ranks
runs a plan with ``n`` data workers and ``r`` parity workers.  Every
distributed linear layer has a :class:`LayerPlan` naming, for each of its
``n + r`` blocks, the rank that computes it; linear layers without a
``LayerPlan`` run on the master.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

from mpicdc.core import grouped
from mpicdc.core.bands import band_problem
from mpicdc.core.codes import (
    Code,
    make_code,
    parse_code_spec,
    row_blocks_problem,
    split_rows,
)
from mpicdc.core.grouped import layer_groups
from mpicdc.core.models import Model
from mpicdc.core.ranges import format_ranges

#: How a layer is distributed: ``rows`` of its weight matrix (output channels; every rank reads the
#: whole input) or ``bands`` of a conv's output height (every rank holds the whole kernel and reads
#: only its band of the input, :mod:`mpicdc.core.bands`).
SPLITS = ("rows", "bands")

_FIX = "build the plan for this model with make_plan (python -m mpicdc.prepare MODEL --workers N ...)"


def parity_count(code: str, parity: int | None) -> int:
    """Number of parity blocks implied by a code spec, checked against ``--parity`` when given."""
    implied = parse_code_spec(code).parity
    if implied is None:  # mds, replication without explicit blocks: r comes from --parity
        if parity is None or parity < 1:
            raise ValueError(f"code {code!r} needs --parity R with R >= 1")
        return parity
    if parity is not None and parity != implied:
        raise ValueError(f"code {code!r} uses {implied} parity worker(s), but --parity {parity} was given")
    return implied


@dataclass(frozen=True)
class LayerPlan:
    """How one linear layer is distributed.

    ``ranks[i]`` computes block ``i``: blocks ``0..n-1`` are the data row blocks
    ``rows[i] = (start, stop)``, blocks ``n..n+r-1`` are parity blocks of the code.  With
    ``split == "bands"`` (a 2-D conv, :mod:`mpicdc.core.bands`) ``rows`` are bands of the
    layer's output height instead, and a parity block is computed on the code's combination
    of the data bands' inputs.  ``master_rows`` (bands only) are the last output rows, which the
    master computes itself while the workers compute theirs: no rank, no parity; the bands
    tile the rows above them.
    """

    layer: str
    code: str
    ranks: tuple
    rows: tuple
    split: str = "rows"
    master_rows: int = 0

    @property
    def banded(self) -> bool:
        """Whether the layer is split into bands of its output height (every rank holds the whole kernel)."""
        return self.split == "bands"

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def r(self) -> int:
        return len(self.ranks) - len(self.rows)

    @cached_property
    def block_rows(self) -> int:
        """Rows of every block after zero-padding to the largest data block."""
        return max(stop - start for start, stop in self.rows)

    @cached_property
    def _block_index(self) -> dict:
        """``{rank: block}``: :meth:`block_of` in O(1), so a plan over thousands of ranks stays linear."""
        return {rank: block for block, rank in enumerate(self.ranks)}

    @cached_property
    def code_obj(self) -> Code:
        """The layer's :class:`~mpicdc.core.codes.Code`, built once from the spec string ``code``."""
        return make_code(self.code, self.n, self.r)

    def validate(self, model: Model, world_size: int | None = None) -> None:
        """Raise ``ValueError`` unless this layer plan fits ``model``: a linear layer of it, row
        blocks tiling its rows in order, one distinct worker rank per block (in ``1..world_size-1``
        when given) and a code that can be built for ``n`` data and ``r`` parity blocks."""
        shapes = model.weight_shapes()
        if self.layer not in shapes:
            raise ValueError(f"plan layer {self.layer!r} is not a linear layer of {model.name}; "
                             f"linear layers: {', '.join(shapes)}; {_FIX}")
        if self.split not in SPLITS:
            raise ValueError(f"plan for layer {self.layer!r}: split {self.split!r} is not one of {', '.join(SPLITS)}")
        m, what = shapes[self.layer][0], "rows"
        if self.banded:
            problem = band_problem(model, self.layer)
            if problem:
                raise ValueError(f"plan for layer {self.layer!r}: cannot split it into bands: {problem}; {_FIX}")
            m, what = model.shapes()[self.layer][1], "output rows (bands)"
            if not (isinstance(self.master_rows, int) and 0 <= self.master_rows < m):
                raise ValueError(f"plan for layer {self.layer!r}: master_rows {self.master_rows!r} must be an "
                                 f"integer in 0..{m - 1} ({m} output rows); {_FIX}")
            m, what = m - self.master_rows, f"output rows (bands) above the master's {self.master_rows}"
        elif self.master_rows:
            raise ValueError(f"plan for layer {self.layer!r}: master_rows {self.master_rows} needs a band split, "
                             f"not {self.split!r}; {_FIX}")
        problem = row_blocks_problem(self.rows, m)
        if problem:
            raise ValueError(f"plan for layer {self.layer!r} ({m} {what}): {problem}; {_FIX}")
        top = "" if world_size is None else f" in 1..{world_size - 1}"
        outside = [x for x in self.ranks if x < 1 or (world_size is not None and x >= world_size)]
        if outside or len(set(self.ranks)) != len(self.ranks) or len(self.ranks) < self.n:
            raise ValueError(f"plan for layer {self.layer!r} gives blocks to ranks {list(self.ranks)}: it needs "
                             f"one distinct worker rank{top} for each of its {self.n} data blocks and parity "
                             f"blocks; {_FIX}")
        try:
            self.code_obj  # noqa: B018 -- builds the code (cached)
        except ValueError as exc:
            raise ValueError(f"plan for layer {self.layer!r}: code {self.code!r} cannot be built for "
                             f"n={self.n} data and r={self.r} parity blocks: {exc}") from None

    def block_of(self, rank: int) -> int | None:
        return self._block_index.get(rank)

    def to_dict(self) -> dict:
        out = {"layer": self.layer, "code": self.code, "ranks": list(self.ranks),
               "rows": [list(r) for r in self.rows]}
        if self.banded:  # a row split writes what older plan files hold
            out["split"] = self.split
        if self.master_rows:  # and a band split without a master band too
            out["master_rows"] = self.master_rows
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        return cls(d["layer"], d["code"], tuple(d["ranks"]), tuple(tuple(r) for r in d["rows"]),
                   d.get("split", "rows"), d.get("master_rows", 0))


@dataclass(frozen=True)
class Plan:
    """The distribution of one model over a world of ``world_size`` ranks."""

    model: str
    world_size: int
    workers: int
    parity: int
    code: str
    layers: tuple = field(default_factory=tuple)

    @property
    def tag(self) -> str:
        return f"w{self.workers}-p{self.parity}-{self.code.replace(':', '').replace('/', '_').replace(',', '_')}"

    def for_layer(self, name: str) -> LayerPlan | None:
        for lp in self.layers:
            if lp.layer == name:
                return lp
        return None

    def rank_blocks(self, rank: int) -> list:
        """``[(LayerPlan, block index)]`` for every layer block that ``rank`` computes."""
        return [(lp, block) for lp in self.layers if (block := lp.block_of(rank)) is not None]

    def validate(self, model: Model) -> None:
        """Raise ``ValueError`` unless the plan fits ``model``: its name, each layer planned once,
        and every :meth:`LayerPlan.validate`.  Local; what prepare, the simulator and a loaded
        manifest rely on."""
        if self.model != model.name:
            raise ValueError(f"the plan is for model {self.model!r}, not {model.name!r}; {_FIX}")
        names = [lp.layer for lp in self.layers]
        twice = sorted({x for x in names if names.count(x) > 1})
        if twice:
            raise ValueError(f"the plan distributes layers {twice} more than once; {_FIX}")
        for lp in self.layers:
            lp.validate(model, self.world_size)

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "world_size": self.world_size, "workers": self.workers,
                           "parity": self.parity, "code": self.code,
                           "layers": [lp.to_dict() for lp in self.layers]})

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        return cls(d["model"], d["world_size"], d["workers"], d["parity"], d["code"],
                   tuple(LayerPlan.from_dict(x) for x in d["layers"]))


def _row_ranges(m: int, n: int, speeds=None) -> tuple:
    return tuple((s.start, s.stop) for s in split_rows(m, n, speeds))


def single_device_plan(model: Model) -> Plan:
    """The plan of one device doing everything: a world of the master alone, no layer distributed.

    The baseline of "x times faster than one device": ``simulate`` of it charges every layer
    to the master's device.  (The MPI runtime does not run worlds of one rank.)
    """
    return Plan(model.name, 1, 0, 0, "none", ())


def grouped_choice(model: Model, name: str, n: int, r: int) -> str:
    """Why a grouped convolution cannot be distributed (``""``: it may be).

    Depthwise layers (one input channel per group) stay on the master: too cheap per
    byte of input to send out.  Without parity workers, other grouped layers are
    split over the ``n`` data workers by whole groups when there are at least ``n``
    groups.  With parity workers :func:`mpicdc.core.grouped.choose` picks the
    protection (code, 2MR or master) by cost.
    """
    groups = layer_groups(model, name)
    if groups == 1:
        return ""
    if grouped.is_depthwise(model, name):
        return "depthwise"
    if not r and groups < n:
        return f"{groups} groups < {n} workers"
    return ""


def make_plan(model: Model, workers: int, parity: int | None = None, code: str = "none", *,
              keep_on_master=(), layer_workers: dict | None = None, speeds=None,
              min_rows_per_worker: int = 1, bands=(), master_rows: dict | None = None) -> Plan:
    """Build a plan: every conv and dense layer split over the data workers, plus parity workers.

    Grouped convolutions are split by whole groups; with parity workers each is coded,
    replicated (2MR) or kept on the master, whichever costs least
    (:func:`mpicdc.core.grouped.choose`); depthwise ones stay on the master
    (:func:`grouped_choice`).

    Parameters
    ----------
    model : the model graph.
    workers : number of data workers ``n`` (ranks ``1..n``); 0 gives :func:`single_device_plan`
        (code ``none``, no parity).
    parity : number of parity workers ``r`` (ranks ``n+1..n+r``); implied by ``code`` when omitted.
    code : code spec (``none``, ``replication``, ``sum``, ``groups:G``, ``mds``).
    keep_on_master : linear layer names that the master computes itself.
    layer_workers : ``{layer: [data ranks]}`` to run a layer on a subset of the data workers
        (the paper's distributions assign layers to device groups); parity ranks serve every layer.
    speeds : relative speed of each data worker, for proportional row blocks.
    min_rows_per_worker : layers with fewer output rows per worker stay on the master.
    bands : conv layer names split into bands of their output height instead of by output
        channels (:mod:`mpicdc.core.bands`; grouped and depthwise convs too).
    master_rows : ``{band layer: rows}``, the last output rows the master computes itself.
    """
    if workers < 0:
        raise ValueError(f"workers must be 0 (one device) or more, got workers={workers}")
    r = parity_count(code, parity)
    if workers == 0:
        if r or layer_workers or speeds:
            raise ValueError(f"a plan with 0 workers runs every layer on the master: it takes no parity "
                             f"workers (code {code!r} uses {r}), layer_workers or speeds")
        return single_device_plan(model)
    if speeds is not None and len(speeds) != workers:
        raise ValueError(f"speeds has {len(speeds)} entries but there are {workers} workers")
    linear = {layer.name for layer in model.linear_layers}
    for name in list(keep_on_master) + list(layer_workers or {}) + list(bands):
        if name not in linear:
            raise ValueError(f"{name!r} is not a linear layer of {model.name}; linear layers: {sorted(linear)}")
    master_rows = dict(master_rows or {})
    if set(master_rows) - set(bands):
        raise ValueError(f"master_rows names layers not split into bands: {sorted(set(master_rows) - set(bands))}")
    for name in bands:
        if band_problem(model, name):
            raise ValueError(f"layer {name!r} cannot be split into bands: {band_problem(model, name)}")
    data_ranks = tuple(range(1, workers + 1))
    parity_ranks = tuple(range(workers + 1, workers + 1 + r))
    layers = []
    for name, (rows, _) in model.weight_shapes().items():
        if name in keep_on_master:
            continue
        ranks = tuple(layer_workers[name]) if layer_workers and name in layer_workers else data_ranks
        bad = [x for x in ranks if not 1 <= x <= workers]
        if bad:
            raise ValueError(f"layer {name!r}: ranks {bad} are not data workers (1..{workers})")
        layer_speeds = None if speeds is None else [speeds[x - 1] for x in ranks]
        if name in bands:
            height = model.shapes()[name][1] - master_rows.get(name, 0)
            if height >= len(ranks) * min_rows_per_worker:
                layers.append(LayerPlan(name, code, ranks + parity_ranks, _row_ranges(height, len(ranks), layer_speeds),
                                        "bands", master_rows.get(name, 0)))
            continue
        if rows < len(ranks) * min_rows_per_worker or grouped_choice(model, name, len(ranks), r):
            continue
        groups = layer_groups(model, name)   # units of whole groups (of rows // groups rows) or of rows
        if groups > 1 and r:
            pick = grouped.choose(grouped.options(model, name, ranks, parity_ranks, code, layer_speeds))
            if pick.kind != "master":
                layers.append(LayerPlan(name, pick.code, pick.ranks, pick.rows))
            continue
        units, per = (groups, rows // groups) if groups > 1 else (rows, 1)
        blocks = tuple((a * per, b * per) for a, b in _row_ranges(units, len(ranks), layer_speeds))
        layers.append(LayerPlan(name, code, ranks + parity_ranks, blocks))
    plan = Plan(model.name, 1 + workers + r, workers, r, code, tuple(layers))
    plan.validate(model)  # codes built for each layer's block count now, not at run time
    return plan


# ---------------------------------------------------------------- plan table (used by ``prepare --show``)

def _rank_ranges(ranks) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3,5"`` (``"-"`` for none)."""
    return format_ranges(sorted(ranks)) or "-"


def rank_role(plan: Plan, rank: int) -> str:
    """``"master"``, ``"data"`` or ``"parity"`` for a rank of ``plan``'s world."""
    if not 0 <= rank < plan.world_size:
        raise ValueError(f"rank {rank} is outside the plan's world of {plan.world_size} ranks")
    return "master" if rank == 0 else "data" if rank <= plan.workers else "parity"


def rank_bytes(plan: Plan, model: Model) -> dict:
    """``{rank: bytes}`` of float32 weights and biases each rank holds (padding included)."""
    totals = dict.fromkeys(range(plan.world_size), 0)
    for name, (rows, cols) in model.weight_shapes().items():
        lp = plan.for_layer(name)
        if lp is None:
            totals[0] += 4 * rows * (cols + 1)
        else:
            if lp.banded:  # every rank, the master too (it adds the bias), holds the whole layer
                for rank in {0, *lp.ranks}:
                    totals[rank] += 4 * rows * (cols + 1)
                continue
            for block, rank in enumerate(lp.ranks):
                totals[rank] += 4 * lp.block_rows * (grouped.stored_cols(model, lp, block) + 1)
    return totals


def _mb(nbytes: int) -> str:
    mb = nbytes / 1e6
    return f"{mb:.2f}" if mb >= 0.1 or mb == 0 else f"{mb:.2g}"


def format_plan_table(plan: Plan, model: Model, rank_extra: dict | None = None, extra_header: str = "",
                      layer_extra: dict | None = None, layer_header: str = "") -> str:
    """The plan as a text table: one line per linear layer, then per-rank totals.

    Columns: layer, weight shape (rows x cols), split (``n+r`` blocks, with the groups of a grouped
    convolution split by whole groups, ``+ master K`` for a band split whose last K output rows the
    master computes, or ``master``, with why for a grouped one), the ranks
    (data ranks, then parity ranks after ``|``), code, rows per block (after padding) and MB
    (1e6 bytes, float32 weights plus bias) held by each rank computing a block.  The per-rank
    lines give role, number of blocks and MB; ``rank_extra`` (``{rank: text}``, headed by
    ``extra_header``) appends a column, e.g. the shard file of each rank; ``layer_extra``
    (``{layer: text}``, headed by ``layer_header``) appends one to the layer lines, e.g. modeled time.
    """
    head = ("layer", "shape", "split", "ranks", "code", "block rows", "MB/rank")
    if layer_extra is not None:
        head += (layer_header,)
    lines = []
    blocks = dict.fromkeys(range(plan.world_size), 0)
    for name, (rows, cols) in model.weight_shapes().items():
        lp = plan.for_layer(name)
        for rank in ((0,) if lp is None else lp.ranks):
            blocks[rank] += 1
        tail = () if layer_extra is None else (layer_extra.get(name, ""),)
        if lp is None:
            why = grouped_choice(model, name, plan.workers, plan.parity) or (
                "cheapest" if layer_groups(model, name) > 1 and plan.parity else "")
            lines.append((name, f"{rows}x{cols}", f"master ({why})" if why else "master", "0", "-", str(rows),
                          _mb(4 * rows * (cols + 1))) + tail)
            continue
        ranks = _rank_ranges(lp.ranks[:lp.n]) + (f" | {_rank_ranges(lp.ranks[lp.n:])}" if lp.r else "")
        sizes = sorted({stop - start for start, stop in lp.rows})
        block = str(lp.block_rows) if len(sizes) == 1 else f"{lp.block_rows} ({sizes[0]}-{sizes[-1]})"
        groups = layer_groups(model, name)
        split = (f"{lp.n}+{lp.r}" + (" bands" if lp.banded else "") + (f" + master {lp.master_rows}" if lp.master_rows
                                                                          else "")
                 + (f" ({groups} groups)" if groups > 1 else ""))
        if lp.banded:
            blocks[0] += 1  # the master holds the layer too: it adds the bias
            block = f"{block} out rows"
        held = rows if lp.banded else lp.block_rows
        lines.append((name, f"{rows}x{cols}", split, ranks, lp.code, block,
                      _mb(4 * held * (cols + 1))) + tail)
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]
    right = {1, 5, 6, 7}

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [f"plan {plan.tag} for {plan.model}: world of {plan.world_size} ranks "
           f"(1 master + {plan.workers} data + {plan.parity} parity workers), code {plan.code}",
           "", fmt(head), fmt(tuple("-" * w for w in widths))]
    out += [fmt(row) for row in lines]
    choices = grouped.format_choices(plan, model)
    out += [""] + choices if choices else []
    extra = rank_extra or {}
    out += ["", f"{'rank':>4}  {'role':<6}  {'blocks':>6}  {'MB':>9}  {extra_header}".rstrip(),
            f"{'-' * 4}  {'-' * 6}  {'-' * 6}  {'-' * 9}  {'-' * len(extra_header)}".rstrip()]
    for rank, size in rank_bytes(plan, model).items():
        out.append(f"{rank:>4}  {rank_role(plan, rank):<6}  {blocks[rank]:>6}  {_mb(size):>9}  "
                   f"{extra.get(rank, '')}".rstrip())
    return "\n".join(out)
