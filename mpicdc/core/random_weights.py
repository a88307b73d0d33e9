"""Seeded random weights, so every zoo model runs (and prepares shards) without a download.

Each layer's ``(W, b)`` depends only on the seed and the layer's name, so a shard writer can
make one layer at a time and get exactly what :func:`init_weights` gives for the whole model.
"""
from __future__ import annotations

import math
import zlib

import numpy as np

from mpicdc.core.kernels import DTYPE
from mpicdc.core.models import Model

__all__ = ["layer_weights", "init_weights"]


def layer_weights(model: Model, name: str, seed: int = 0) -> tuple:
    """Deterministic He-initialised ``(W, b)`` of one linear layer, independent of the other layers."""
    rows, cols = model.weight_shapes()[name]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    W = rng.standard_normal((rows, cols), dtype=DTYPE)
    W *= DTYPE(math.sqrt(2.0 / cols))  # in place: one full-size array at a time (fc6 is 411 MB)
    b = rng.standard_normal(rows, dtype=DTYPE)
    b *= DTYPE(0.01)
    return W, b


def init_weights(model: Model, seed: int = 0) -> dict:
    """``{layer: (W, b)}`` for every linear layer; seeded so every model runs without a download."""
    return {layer.name: layer_weights(model, layer.name, seed) for layer in model.linear_layers}
