"""What part of a layer's input each block needs: the master sends a worker nothing it does not read.

Output splitting sends a layer's whole input to every rank that computes a block of it, and
only to those (a rank without a block of a layer gets no job for it).  A grouped convolution
split by whole groups is the exception that saves bytes: a data block reads only the input
channels of its own groups, so it is sent just those channels (AlexNet's two towers: half the
input of conv2, conv4 and conv5 per worker).  A parity or replica block of such a layer
(:mod:`mpicdc.core.grouped`) computes one slab per data block it embeds, each against that
block's channels, so it is sent the span of those blocks' channels: a 2MR replica gets what its
data block gets, a sum parity over every block the whole input.  The worker rebuilds the full-size input with zeros in the channels
it was not sent, which its block never reads (:func:`~mpicdc.core.kernels.lower_gemm` lowers
only its groups' channels), so it computes exactly what it computed from the whole input.
A layer split into bands (:mod:`mpicdc.core.bands`) sends each block only its band of the input
rows (halo included; a parity block the code's combination of the bands): :func:`job_shape` is
then the band's shape, and the worker convolves what it received as it is.
Pure and local: the master and the worker derive the same slices from the plan.
"""
from __future__ import annotations

import numpy as np

from mpicdc.core.bands import layer_geometry
from mpicdc.core.grouped import embedded_blocks
from mpicdc.core.plan import layer_groups


def needed_channels(model, lp, block: int) -> tuple | None:
    """``(c0, c1)``: the input channels block ``block`` of layer plan ``lp`` reads, or ``None``
    when it reads the whole input (not a grouped conv, or a block that spans every group) or its band."""
    groups = layer_groups(model, lp.layer)
    if groups == 1 or lp.banded:
        return None
    sources = [block] if block < lp.n else embedded_blocks(lp.code_obj, block - lp.n)
    layer = model.layer(lp.layer)
    channels = model.shapes()[layer.inputs[0]][0]
    cpg, opg = channels // groups, layer.attrs["out"] // groups
    g0 = min(lp.rows[i][0] // opg for i in sources)
    g1 = max((lp.rows[i][1] - 1) // opg + 1 for i in sources)
    if (g0, g1) == (0, groups):
        return None
    return g0 * cpg, g1 * cpg


def job_shape(model, lp, block: int) -> tuple:
    """Shape of the input block ``block`` of ``lp`` is sent (the layer's input shape, its channels or its band)."""
    if lp.banded:
        return layer_geometry(model, lp).input_shape
    shape = tuple(model.shapes()[model.layer(lp.layer).inputs[0]])
    channels = needed_channels(model, lp, block)
    return shape if channels is None else (channels[1] - channels[0],) + shape[1:]


def job_input(model, lp, block: int, x: np.ndarray) -> np.ndarray:
    """Master: the part of the layer input ``x`` to send for ``block`` (a view)."""
    channels = needed_channels(model, lp, block)
    return x if channels is None else x[channels[0]:channels[1]]


def full_input(model, lp, block: int, received: np.ndarray) -> np.ndarray:
    """Worker: the layer input rebuilt from what ``block`` was sent (zeros in channels it does not read)."""
    channels = needed_channels(model, lp, block)
    if channels is None:  # the whole input, or a band: convolved as received
        return received
    full = np.zeros(model.shapes()[model.layer(lp.layer).inputs[0]], dtype=np.float32)
    full[channels[0]:channels[1]] = received
    return full


def reply_shape(model, lp) -> tuple:
    """Shape of every block's product as it travels and is decoded: ``(block rows, output spatial size)``,
    or for a band split ``(output channels, band height * output width)``."""
    if lp.banded:
        return layer_geometry(model, lp).block_shape
    out_shape = model.shapes()[lp.layer]
    return lp.block_rows, int(np.prod(out_shape[1:])) if len(out_shape) > 1 else 1
