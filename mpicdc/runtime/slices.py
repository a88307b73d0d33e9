"""What part of a layer's input each block needs: the master sends a worker nothing it does not read.

Output splitting sends a layer's whole input to every rank that computes a block of it, and
only to those (a rank without a block of a layer gets no job for it).  A grouped convolution
split by whole groups is the exception that saves bytes: a data block reads only the input
channels of its own groups, so it is sent just those channels (AlexNet's two towers: half the
input of conv2, conv4 and conv5 per worker).  A parity block would sum blocks of every group,
so it gets the whole input.  The worker rebuilds the full-size input with zeros in the channels
it was not sent, which its block never reads (:func:`~mpicdc.core.kernels.lower_gemm` lowers
only its groups' channels), so it computes exactly what it computed from the whole input.
Pure and local: the master and the worker derive the same slices from the plan.
"""
from __future__ import annotations

import numpy as np

from mpicdc.core.plan import layer_groups


def needed_channels(model, lp, block: int) -> tuple | None:
    """``(c0, c1)``: the input channels block ``block`` of layer plan ``lp`` reads, or ``None``
    when it reads the whole input (not a grouped conv, a parity block, or every group)."""
    groups = layer_groups(model, lp.layer)
    if groups == 1 or block >= lp.n:
        return None
    layer = model.layer(lp.layer)
    channels = model.shapes()[layer.inputs[0]][0]
    cpg, opg = channels // groups, layer.attrs["out"] // groups
    start, stop = lp.rows[block]
    g0, g1 = start // opg, (stop - 1) // opg + 1
    if (g0, g1) == (0, groups):
        return None
    return g0 * cpg, g1 * cpg


def job_shape(model, lp, block: int) -> tuple:
    """Shape of the input block ``block`` of ``lp`` is sent (the layer's input shape, or its channels)."""
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
    if channels is None:
        return received
    full = np.zeros(model.shapes()[model.layer(lp.layer).inputs[0]], dtype=np.float32)
    full[channels[0]:channels[1]] = received
    return full
