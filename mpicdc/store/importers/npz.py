"""``.npz`` weight files: the simplest interchange format.  Local, numpy only.

Key convention
--------------
* ``<layer>.weight``: the weight of mpicdc linear layer ``<layer>``, either in the GEMM layout
  ``(out, in * prod(kernel))`` / ``(out, in)`` or in torch layout ``(out, in, *kernel)``;
* ``<layer>.bias``: its bias ``(out,)``; optional (zeros when absent);
* ``__model__`` (optional): the architecture as a JSON string (``Model.to_json()``), so that the
  file is self-contained and needs no ``model_name``.

Layer names are those of the mpicdc architecture (e.g. ``conv1``, ``fc6`` for the zoo).  Any
other key is an error, so a typo cannot silently leave a layer at zero.  Files are read with
``allow_pickle=False``.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

from mpicdc.core.models import Model
from mpicdc.store.importers.common import (
    ModelImportError,
    WeightMismatchError,
    as_float32,
    check_weights,
    resolve_model,
)

MODEL_KEY = "__model__"


def save_npz(path, model: Model, weights: dict, *, embed_model: bool = True) -> None:
    """Write ``weights`` (``{layer: (W, b)}``, checked against ``model``) as ``<layer>.weight/.bias``.  Local."""
    check_weights(model, weights, os.fspath(path))
    arrays = {}
    for name, (W, b) in weights.items():
        arrays[f"{name}.weight"] = np.asarray(W, np.float32)
        arrays[f"{name}.bias"] = np.asarray(b, np.float32)
    if embed_model:
        arrays[MODEL_KEY] = np.array(model.to_json())
    with open(path, "wb") as fh:  # a file object: numpy would append ".npz" to a bare path
        np.savez(fh, **arrays)


def load_npz(path, model=None) -> tuple:
    """Read an npz in the convention above as ``(Model, weights)``.  Local.

    ``model`` (zoo name or Model) is required unless the file embeds ``__model__``; when both
    are present the given ``model`` wins and the weights must fit it.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no such npz file: {source}")
    try:
        data = np.load(source, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelImportError(f"{source}: not an npz archive ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ModelImportError(f"{source}: a single .npy array, not an npz archive of <layer>.weight arrays")
    with data:
        try:
            arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise ModelImportError(f"{source}: unreadable array in the archive ({exc})") from None
    strays = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
    if strays:
        raise ModelImportError(f"{source}: a zip archive but not an npz of arrays (members {strays[:5]} are not "
                               f".npy arrays)")
    embedded = arrays.pop(MODEL_KEY, None)
    if model is None and embedded is not None:
        try:
            target = Model.from_json(str(embedded[()]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelImportError(f"{source}: {MODEL_KEY} is not a valid mpicdc model graph ({exc})") from None
    else:
        target = resolve_model(model, source, "npz weights")
    return target, weights_from_arrays(target, arrays, source)


def weights_from_arrays(model: Model, arrays: dict, source: str) -> dict:
    """Map ``{"<layer>.weight": ..., "<layer>.bias": ...}`` onto ``model``'s linear layers."""
    expected = model.weight_shapes()
    shapes = model.shapes()
    known = {f"{n}.{leaf}" for n in expected for leaf in ("weight", "bias")}
    unknown = sorted(k for k in arrays if k not in known)
    if unknown:
        raise WeightMismatchError(f"{source}: keys {unknown} match no linear layer of model {model.name!r} "
                                  f"(expected <layer>.weight / <layer>.bias for layers {list(expected)})")
    missing = [n for n in expected if f"{n}.weight" not in arrays]
    if missing:
        raise WeightMismatchError(f"{source}: no weights for layers {missing} of model {model.name!r}")
    weights = {}
    for name, (rows, cols) in expected.items():
        W = as_float32(arrays[f"{name}.weight"], f"{name}.weight", source)
        layer = model.layer(name)
        if layer.op == "conv" and W.ndim > 2:
            full = (rows, shapes[layer.inputs[0]][0]) + tuple(layer.attrs["kernel"])
            if W.shape != full:
                raise WeightMismatchError(f"{source}: layer {name!r}: expected weight of shape {full} (or "
                                          f"{(rows, cols)}), found {W.shape}")
            W = W.reshape(rows, cols)
        if W.shape != (rows, cols):
            raise WeightMismatchError(f"{source}: layer {name!r}: expected weight of shape {(rows, cols)}, "
                                      f"found {W.shape}")
        if f"{name}.bias" in arrays:
            b = as_float32(arrays[f"{name}.bias"], f"{name}.bias", source)
            if b.shape != (rows,):
                raise WeightMismatchError(f"{source}: layer {name!r}: expected bias of shape {(rows,)}, "
                                          f"found {b.shape}")
        else:
            b = np.zeros(rows, np.float32)
        weights[name] = (W, b)
    return check_weights(model, weights, source)
