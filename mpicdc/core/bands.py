"""Spatial split of a conv layer: bands of output rows, coded on the input.

Output splitting (the default, ``LayerPlan.split == "rows"``) sends a conv's whole input
to every rank.  A *band* split gives data block ``i`` the output rows ``bands[i]`` of the
layer's output height instead: its rank receives only the input rows that band reads (the
halo of ``kernel - stride`` rows included) and convolves them with the layer's full kernel,
without bias.  Every band is made the same height (the last one runs past the image and is
cropped), and the master zero-pads input rows outside the image, so every block is an
equal-shaped array.

A conv without bias is linear in its input, so a parity rank that receives the code's
combination of the data bands' inputs, ``sum_i G[j, i] x_i``, computes the same combination
of the data bands' outputs: the master decodes a missing band with the layer's
:class:`~mpicdc.core.codes.Code` exactly like a missing output block, then adds the bias.
The master's link carries about ``(1 + r/n) x`` the input (plus halos) instead of
``(n + r) x``.

The master may compute a band itself (``LayerPlan.master_rows``: the last rows of the output)
while the workers compute theirs: it cannot fail alone, so its band carries no parity, and the
code covers the worker bands only.  Pure and local: the master, the worker, the simulator and
prepare all derive the same geometry from the model and the layer plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from mpicdc.core.models import Layer, Model, pad_pairs

DTYPE = np.float32


def band_problem(model: Model, name: str) -> str:
    """Why layer ``name`` cannot be split into bands (``""``: it can): only 2-D convs can."""
    layer = model.layer(name)
    if layer.op != "conv":
        return f"{layer.op} layer (only conv layers split into bands)"
    if len(model.shapes()[layer.inputs[0]]) != 3:
        return "not a 2-D conv (bands split the height of (C, H, W) inputs)"
    return ""


@dataclass(frozen=True)
class BandGeometry:
    """Where each output band of one 2-D conv reads its input.

    Attributes
    ----------
    bands : ``((o0, o1), ...)`` output rows of each data block, tiling ``0..out_shape[1]``.
    height : output rows of every block (the tallest band; shorter ones are cropped).
    in_height : input rows of every block, halo included: ``(height - 1) * stride + kernel``.
    """

    layer: Layer
    in_shape: tuple
    out_shape: tuple
    bands: tuple
    kernel: int
    stride: int
    top: int          # the layer's top padding: input row of output row o starts at o * stride - top
    height: int
    in_height: int
    master: tuple = None  # ``(o0, o1)``: the output rows the master computes (after the workers' bands)

    @property
    def n(self) -> int:
        return len(self.bands)

    @property
    def input_shape(self) -> tuple:
        """Shape of the input every block receives: ``(C, in_height, W)``."""
        return (self.in_shape[0], self.in_height, self.in_shape[2])

    @property
    def block_shape(self) -> tuple:
        """Shape of every block's product as it travels and is decoded: ``(C_out, height * W_out)``."""
        return (self.out_shape[0], self.height * self.out_shape[2])

    def input_rows(self, block: int) -> tuple:
        """``(i0, i1)``: the input rows data block ``block`` reads (may reach outside ``0..H``: zeros)."""
        start = self.bands[block][0] * self.stride - self.top
        return start, start + self.in_height

    def band_input(self, x: np.ndarray, block: int) -> np.ndarray:
        """Master: data block ``block``'s input, rows outside the image zero (a view when inside)."""
        return self._rows_of(x, *self.input_rows(block))

    def _rows_of(self, x: np.ndarray, i0: int, i1: int) -> np.ndarray:
        """Input rows ``i0..i1`` of ``x``, rows outside the image zero (a view when inside)."""
        H = x.shape[1]
        if 0 <= i0 and i1 <= H:
            return x[:, i0:i1]
        out = np.zeros((x.shape[0], i1 - i0, x.shape[2]), dtype=DTYPE)
        lo, hi = max(i0, 0), min(i1, H)
        if hi > lo:
            out[:, lo - i0:hi - i0] = x[:, lo:hi]
        return out

    def inputs(self, x: np.ndarray, code) -> list:
        """Master: the ``n + r`` blocks' inputs: the data bands, then the code's combinations of them."""
        x = np.asarray(x, dtype=DTYPE)
        if tuple(x.shape) != tuple(self.in_shape):
            raise ValueError(f"layer {self.layer.name!r}: input of shape {tuple(x.shape)}, expected {self.in_shape}")
        data = [self.band_input(x, i) for i in range(self.n)]
        return data + [np.asarray(p, dtype=DTYPE) for p in code.encode(data)]

    @property
    def band_layer(self) -> Layer:
        """The conv a block runs: the layer with no vertical padding (the master padded the rows)."""
        pairs = pad_pairs(self.layer.attrs.get("padding", 0), 2, self.layer.name)
        return replace(self.layer, attrs={**self.layer.attrs, "padding": [[0, 0], list(pairs[1])]})

    def master_input(self, x: np.ndarray) -> np.ndarray:
        """Master: the input rows its own band reads (``ValueError`` if it has none)."""
        if self.master is None:
            raise ValueError(f"layer {self.layer.name!r}: the plan gives the master no band")
        o0, o1 = self.master
        start = o0 * self.stride - self.top
        return self._rows_of(np.asarray(x, dtype=DTYPE), start, start + (o1 - o0 - 1) * self.stride + self.kernel)

    def assemble(self, blocks, bias: np.ndarray | None = None, master_out: np.ndarray | None = None) -> np.ndarray:
        """Master: the layer output ``(C_out, H_out, W_out)`` from the ``n`` decoded band products and,
        when the master has a band, its own product ``(C_out, rows, W_out)`` (no bias), plus bias."""
        C, H, W = self.out_shape
        out = np.empty(self.out_shape, dtype=DTYPE)
        for (o0, o1), block in zip(self.bands, blocks):
            out[:, o0:o1] = np.asarray(block).reshape(C, self.height, W)[:, :o1 - o0]
        if (master_out is None) != (self.master is None):
            raise ValueError(f"layer {self.layer.name!r}: the master's band is {self.master}, "
                             f"but its product was {'not ' if master_out is None else ''}given")
        if master_out is not None:
            o0, o1 = self.master
            if tuple(master_out.shape) != (C, o1 - o0, W):
                raise ValueError(f"layer {self.layer.name!r}: master band product of shape {tuple(master_out.shape)}, "
                                 f"expected {(C, o1 - o0, W)}")
            out[:, o0:o1] = master_out
        if bias is not None:
            out += np.asarray(bias, dtype=DTYPE)[:, None, None]
        return out


def geometry(model: Model, name: str, bands, master_rows: int = 0) -> BandGeometry:
    """The :class:`BandGeometry` of conv ``name`` split into output-row ``bands`` and the master's last
    ``master_rows`` rows; ``ValueError`` if it is not a 2-D conv or the bands do not tile its output
    height less ``master_rows`` in order."""
    problem = band_problem(model, name)
    if problem:
        raise ValueError(f"layer {name!r} cannot be split into bands: {problem}")
    layer = model.layer(name)
    shapes = model.shapes()
    in_shape, out_shape = tuple(shapes[layer.inputs[0]]), tuple(shapes[name])
    bands = tuple((int(a), int(b)) for a, b in bands)
    H_all = out_shape[1]
    if not 0 <= master_rows < H_all:
        raise ValueError(f"layer {name!r}: the master's band of {master_rows} rows must be 0..{H_all - 1} rows "
                         f"of its {H_all} output rows")
    H_out, pos = H_all - master_rows, 0
    for a, b in bands:
        if a != pos or b <= a:
            raise ValueError(f"layer {name!r}: bands {list(bands)} must tile its {H_out} output rows in order")
        pos = b
    if pos != H_out:
        raise ValueError(f"layer {name!r}: bands {list(bands)} must tile its {H_out} output rows in order")
    kernel = layer.attrs.get("kernel", 1)
    stride = layer.attrs.get("stride", 1)
    kh = kernel if isinstance(kernel, int) else int(kernel[0])
    sh = stride if isinstance(stride, int) else int(stride[0])
    top = pad_pairs(layer.attrs.get("padding", 0), 2, name)[0][0]
    height = max(b - a for a, b in bands)
    return BandGeometry(layer, in_shape, out_shape, bands, kh, sh, top, height, (height - 1) * sh + kh,
                        (H_out, H_all) if master_rows else None)


def layer_geometry(model: Model, lp) -> BandGeometry:
    """The :class:`BandGeometry` of a band layer plan ``lp`` (its bands and master rows)."""
    return geometry(model, lp.layer, lp.rows, lp.master_rows)


def band_conv(geo: BandGeometry, W: np.ndarray, x_band: np.ndarray, *, workspace=None) -> np.ndarray:
    """Worker: one block's product ``(C_out, height * W_out)``: the full kernel over its band, no bias."""
    from mpicdc.core.kernels import linear_forward

    x_band = np.asarray(x_band, dtype=DTYPE)
    if tuple(x_band.shape) != geo.input_shape:
        raise ValueError(f"layer {geo.layer.name!r}: band input of shape {tuple(x_band.shape)}, "
                         f"expected {geo.input_shape}")
    y = linear_forward(geo.band_layer, W, None, x_band, workspace=workspace)
    return y.reshape(geo.block_shape)


def master_conv(geo: BandGeometry, W: np.ndarray, x: np.ndarray, *, workspace=None) -> np.ndarray:
    """Master: its own band's product ``(C_out, rows, W_out)`` from the whole input ``x``, no bias."""
    from mpicdc.core.kernels import linear_forward

    x_band = geo.master_input(x)
    C, _, W_out = geo.out_shape
    y = linear_forward(geo.band_layer, W, None, x_band, workspace=workspace)
    return y.reshape(C, geo.master[1] - geo.master[0], W_out)


def traffic(geo: BandGeometry, r: int) -> dict:
    """Elements per request of a band split with ``r`` parity blocks: ``send`` (every block's input)
    and ``reply`` (every block's product); the simulator and the docs use it."""
    return {"send": (geo.n + r) * math.prod(geo.input_shape), "reply": (geo.n + r) * math.prod(geo.block_shape)}
