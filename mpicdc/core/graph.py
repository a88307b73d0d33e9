"""The one walk over a model graph, with a pluggable way to run its layers.

The serial reference forward (:func:`mpicdc.core.kernels.forward`), the MPI
master (:meth:`mpicdc.runtime.master.Coordinator.infer`) and the simulator
(:func:`mpicdc.sim.engine.simulate`) all visit the layers of a model in
topological order, gather each layer's inputs, and run it.  They differ only in
*how* a layer runs -- numpy on one process, a coded product over MPI, a cost in
simulated seconds -- which a :class:`LayerExecutor` supplies.  What a walk
decides is here, once: the visiting order, which ReLU may be fused into the
linear layer before it, and when an activation can be dropped.

Pure and local: no MPI, no I/O.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod

from mpicdc.core.models import Layer, Model

__all__ = ["LayerExecutor", "fused_relu", "walk"]


class LayerExecutor(ABC):
    """How a walk runs one layer; values are whatever the executor works with.

    Values are opaque to :func:`walk`: numpy activations for the forward and
    the master, shapes for the simulator.  ``fuses_relu`` declares that
    :meth:`linear` can apply a following ReLU itself; only then does the walk
    ever pass ``relu=True``.
    """

    #: whether :meth:`linear` accepts ``relu=True`` (see :func:`fused_relu` for when it is passed)
    fuses_relu: bool = False

    @abstractmethod
    def linear(self, layer: Layer, x, *, relu: bool):
        """Output of the linear layer ``layer`` for input ``x``, with ReLU applied if ``relu``."""

    @abstractmethod
    def nonlinear(self, layer: Layer, inputs: list):
        """Output of the parameter-free layer ``layer``; ``inputs`` in the layer's input order."""


def fused_relu(model: Model, layer: Layer) -> Layer | None:
    """The ReLU layer that may be fused into the linear ``layer``, or None.

    Legal only when the ReLU is the *only* reader of ``layer``'s output (no one
    else needs the values before the ReLU) and ``layer`` is not the model
    output (its pre-ReLU value is returned).
    """
    after = model.readers().get(layer.name, ())
    if layer.is_linear and len(after) == 1 and after[0].op == "relu" and layer.name != model.output:
        return after[0]
    return None


def walk(model: Model, x, executor: LayerExecutor, *, keep_all: bool = False,
         timings: dict | None = None):
    """Run ``model`` on ``x`` with ``executor``, layer by layer in graph order.

    Parameters
    ----------
    model : the graph (``model.layers`` are in topological order).
    x : the value of ``"input"`` (already validated by the caller).
    executor : runs each layer, see :class:`LayerExecutor`.
    keep_all : return ``{name: value}`` of every layer plus ``"input"``; then
        no ReLU is fused (every layer's own value is kept) and nothing dropped.
    timings : if a dict, filled with ``{layer: seconds}`` (wall clock, in
        layer order); a fused ReLU is timed with its linear layer and gets 0.

    Returns
    -------
    The output layer's value, or the dict of all values with ``keep_all``.

    Notes
    -----
    Each layer's executor call is made exactly once, except a fused ReLU's:
    it happens inside the linear layer's :meth:`LayerExecutor.linear` call.
    Without ``keep_all`` a value is dropped right after its last reader ran,
    which bounds the peak memory by the graph's widest cut instead of its size.
    """
    readers = model.readers()
    output = model.output
    fuse = executor.fuses_relu and not keep_all
    clock = time.perf_counter
    values = {"input": x}
    fused: set = set()
    for layer in model.layers:
        if layer.name in fused:
            continue
        start = clock() if timings is not None else 0.0
        ins = [values[i] for i in layer.inputs]
        relu = fused_relu(model, layer) if fuse else None
        if layer.is_linear:
            value = executor.linear(layer, ins[0], relu=relu is not None)
        else:
            value = executor.nonlinear(layer, ins)
        values[layer.name if relu is None else relu.name] = value
        del ins, value
        if not keep_all:
            for name in dict.fromkeys(layer.inputs):
                if name != output and readers[name][-1] is layer:
                    values.pop(name, None)
        if timings is not None:
            timings[layer.name] = clock() - start
        if relu is not None:
            fused.add(relu.name)
            if timings is not None:
                timings[relu.name] = 0.0
    return values if keep_all else values[output]
