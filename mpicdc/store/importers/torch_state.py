"""PyTorch ``state_dict`` files (``.pt`` / ``.pth``) -> weights of an mpicdc architecture.

Local.  Needs torch (``pip install mpicdc[torch]``), imported inside the function.  The file is
read with ``torch.load(path, map_location="cpu", weights_only=True)``: only tensors and plain
containers are accepted, never arbitrary pickled objects.

Key mapping: the state_dict's ``<prefix>.weight`` tensors with 2 or more dimensions are the
weight layers, in the state_dict's order (the order of ``module.state_dict()``, i.e. the order
in which the module's layers were defined); ``<prefix>.bias`` is the bias of the same layer
(zeros when absent).  They go onto the architecture's linear layers by name when every linear
layer name is a prefix in the file, otherwise in order per kind (see
:func:`mpicdc.store.importers.common.bind_weights`).  torch's layouts are mpicdc's: a conv weight
``(out, in, *kernel)`` reshaped to ``(out, -1)``, a Linear weight ``(out, in)``, flatten in
channel-first order.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import numpy as np

from mpicdc.store.importers.common import (
    ModelImportError,
    SourceWeight,
    UnsupportedOpError,
    bind_weights,
    resolve_model,
)

#: wrapper keys of training checkpoints that hold the actual state_dict.
_WRAPPERS = ("state_dict", "model_state_dict", "model")


def _require_torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError("reading PyTorch state_dicts needs torch: pip install mpicdc[torch]") from exc
    return torch


def read_state_dict(path) -> dict:
    """``{key: float32 ndarray}`` of a state_dict file, in file order.  Local."""
    torch = _require_torch()
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no such PyTorch file: {source}")
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelImportError(
            f"{source}: not loadable with torch.load(weights_only=True); mpicdc reads state_dicts of tensors only "
            f"and never unpickles arbitrary objects (save with torch.save(module.state_dict(), path)): "
            f"{str(exc).splitlines()[0]}") from None
    except Exception as exc:  # RuntimeError for non-zip / corrupt files, EOFError, ...
        raise ModelImportError(f"{source}: not a PyTorch file ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(torch.is_tensor(v) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelImportError(f"{source}: expected a state_dict (a mapping of names to tensors), found "
                               f"{type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            raise ModelImportError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor; expected "
                                   f"a plain state_dict")
        if not (value.is_floating_point() or key.endswith("num_batches_tracked")):
            raise ModelImportError(f"{source}: tensor {key!r} has dtype {value.dtype}, expected floating point")
        out[str(key)] = value.detach().cpu().to(torch.float32).numpy() if value.is_floating_point() \
            else value.detach().cpu().numpy()
    return out


def state_dict_entries(tensors: dict, source: str) -> list:
    """Group state_dict tensors into weight layers (see the module docstring)."""
    prefixes: dict = {}
    for key, value in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        prefixes.setdefault(prefix, {})[leaf] = value
    norms = [p for p, leaves in prefixes.items() if "running_mean" in leaves or "running_var" in leaves]
    if norms:
        raise UnsupportedOpError(
            f"{source}: the state_dict has batch-norm layers {norms}; mpicdc zoo architectures have none (batch norm "
            f"is folded into the preceding convolution). Export the model to ONNX instead, which folds it")
    entries, used = [], set()
    for prefix, leaves in prefixes.items():
        w = leaves.get("weight")
        if w is None or w.ndim < 2:
            continue
        b = leaves.get("bias")
        if b is not None and b.ndim != 1:
            raise ModelImportError(f"{source}: {prefix}.bias has shape {b.shape}, expected a vector")
        entries.append(SourceWeight(prefix, w, b))
        used.update(f"{prefix}.{leaf}" for leaf in ("weight", "bias") if leaf in leaves)
    unused = [k for k in tensors if k not in used]
    if unused:
        raise ModelImportError(f"{source}: state_dict entries {unused} belong to no conv/linear layer "
                               f"(only <layer>.weight with 2+ dimensions and <layer>.bias are understood)")
    if not entries:
        raise ModelImportError(f"{source}: no weight tensors (<layer>.weight with 2+ dimensions) found")
    return entries


def load_torch_state(path, model) -> tuple:
    """Import a PyTorch state_dict onto architecture ``model`` (zoo name or Model).  Local.

    Returns ``(Model, weights)``.  Errors name the file, the layer, the expected and found
    shapes (:class:`~mpicdc.store.importers.common.WeightMismatchError`).
    """
    source = os.fspath(path)
    target = resolve_model(model, source, "PyTorch state_dict")
    tensors = read_state_dict(source)
    weights = bind_weights(target, state_dict_entries(tensors, source), source)
    return target, {k: (np.ascontiguousarray(W), np.ascontiguousarray(b)) for k, (W, b) in weights.items()}
