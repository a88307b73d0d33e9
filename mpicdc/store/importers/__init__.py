"""Import trained models and weights into mpicdc: ONNX, Keras HDF5, PyTorch state_dicts, npz.

Local (no MPI); every function reads one file and returns ``(Model, weights)``
where ``weights`` is ``{layer: (W, b)}`` in the GEMM layout of
:meth:`mpicdc.core.models.Model.weight_shapes` (float32).  Importing this package
imports neither onnx, torch nor keras; each importer imports its optional
dependency when called and says what to install when it is missing.

============================  =========================  ====================================
file                          importer                   architecture comes from
============================  =========================  ====================================
``*.onnx``                    :func:`load_onnx`          the ONNX graph
``*.h5`` with model_config    :func:`load_keras_h5`      the Keras model config (h5py only)
``*.h5`` Keras 2 weights      :func:`load_keras_weights` ``model_name`` (zoo name or Model)
``*.weights.h5`` (Keras 3)    :func:`load_keras_weights` ``model_name``
``*.pt`` / ``*.pth``          :func:`load_torch_state`   ``model_name``
``*.npz``                     :func:`load_npz`           ``model_name`` or the embedded graph
============================  =========================  ====================================

See docs/importers.md for ops, layout conventions and the layer-matching rules.
"""
from __future__ import annotations

import os

from mpicdc.store.importers.common import (
    ModelImportError,
    UnsupportedOpError,
    WeightMismatchError,
    bind_weights,
    check_weights,
    rebind,
)

__all__ = ["load_source", "load_onnx", "load_keras_h5", "load_keras_weights", "load_torch_state",
           "load_npz", "save_npz", "check_weights", "bind_weights", "ModelImportError",
           "UnsupportedOpError", "WeightMismatchError", "SUFFIXES"]

#: file suffixes :func:`load_source` recognises.
SUFFIXES = (".onnx", ".h5", ".hdf5", ".pt", ".pth", ".npz")


def load_onnx(path, *, input_shape=None, name=None):
    """Import an ONNX model; see :func:`mpicdc.store.importers.onnx.load_onnx`."""
    from mpicdc.store.importers.onnx import load_onnx as _load
    return _load(path, input_shape=input_shape, name=name)


def load_keras_h5(path, model=None, *, input_shape=None):
    """Import a Keras HDF5 file; see :func:`mpicdc.store.importers.keras.load_keras_h5`."""
    from mpicdc.store.importers.keras import load_keras_h5 as _load
    return _load(path, model, input_shape=input_shape)


def load_keras_weights(path, model):
    """Import a Keras weights-only HDF5 file; see :func:`mpicdc.store.importers.keras.load_keras_weights`."""
    from mpicdc.store.importers.keras import load_keras_weights as _load
    return _load(path, model)


def load_torch_state(path, model):
    """Import a PyTorch state_dict; see :func:`mpicdc.store.importers.torch_state.load_torch_state`."""
    from mpicdc.store.importers.torch_state import load_torch_state as _load
    return _load(path, model)


def load_npz(path, model=None):
    """Import an npz of ``<layer>.weight`` / ``<layer>.bias`` arrays; see :mod:`mpicdc.store.importers.npz`."""
    from mpicdc.store.importers.npz import load_npz as _load
    return _load(path, model)


def save_npz(path, model, weights, *, embed_model=True):
    """Write weights in the npz convention read by :func:`load_npz`."""
    from mpicdc.store.importers.npz import save_npz as _save
    return _save(path, model, weights, embed_model=embed_model)


def load_source(path, model_name=None):
    """Import a model file, choosing the importer by file type.  Local.

    Parameters
    ----------
    path : ``.onnx``, Keras ``.h5`` (full model, Keras 2 weights, or Keras 3 ``.weights.h5``),
        PyTorch ``.pt``/``.pth`` state_dict, or ``.npz``.
    model_name : a zoo model name or a :class:`mpicdc.core.models.Model`.  Required for weights-only
        files (Keras weights, state_dicts, npz without an embedded graph).  For files that carry
        their own graph (ONNX, Keras full model) it is optional; when given, the imported graph
        must have the same ops and weight shapes as this architecture, and the result uses its
        layer names.

    Returns
    -------
    (Model, weights) : ``weights`` is ``{layer: (W, b)}``, float32, shapes checked.

    Raises
    ------
    FileNotFoundError : no such file.
    ModelImportError (a ValueError) : unknown file type, a file that is not what its suffix
        says, missing layers, shape mismatches; :class:`UnsupportedOpError` for ops mpicdc
        cannot represent.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no such model file: {source}")
    lower = source.lower()
    if lower.endswith(".onnx"):
        model, weights = load_onnx(source)
        return rebind(model, weights, model_name, source) if model_name is not None else (model, weights)
    if lower.endswith((".h5", ".hdf5")):
        from mpicdc.store.importers.keras import load_keras_h5 as _load
        return _load(source, model_name)
    if lower.endswith((".pt", ".pth")):
        return load_torch_state(source, model_name)
    if lower.endswith(".npz"):
        return load_npz(source, model_name)
    if lower.endswith(".keras"):
        raise ModelImportError(f"{source}: Keras v3 .keras archives are not supported; save the model with "
                               f"model.save('m.h5') (full model) or model.save_weights('m.weights.h5')")
    raise ModelImportError(f"{source}: unknown model file type; supported suffixes: {', '.join(SUFFIXES)}")
