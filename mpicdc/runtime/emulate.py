"""Emulating a slower device on the master (``--master-device``): each layer it runs takes the
device's modeled time.

Workers emulate ``--device`` by padding each block to the device model
(:func:`~mpicdc.runtime.worker.emulated_seconds`); the master is this machine unless told
otherwise, as in the experiments.  The one-device baseline (``--workers 0``) is only a Pi's
time when the master is emulated too, and a fair distributed run then emulates the master as
well.  The timing model is the simulator's: a linear layer's ``gemm_time``, a nonlinear
layer's roofline (:func:`~mpicdc.sim.engine.nonlinear_work`), a ReLU fused into a linear layer
costed as the ReLU layer it replaces.  Decoding is not padded (the simulator's model of it is
small).  Local.
"""
from __future__ import annotations

import math
import time


class MasterPacer:
    """Pads each layer the master runs to ``device``'s modeled time; ``modeled_s`` sums them."""

    def __init__(self, device, model):
        from mpicdc.sim.devices import get_device

        self.device, self.model = get_device(device), model
        self.shapes, self.wshapes = model.shapes(), model.weight_shapes()
        self.modeled_s = 0.0

    def seconds(self, layer, in_shapes: list, relu: bool = False) -> float:
        """Modeled seconds of ``layer`` (inputs of ``in_shapes``) on the device."""
        from mpicdc.sim.engine import nonlinear_work

        out_shape = tuple(self.shapes[layer.name])
        if layer.name in self.wshapes:
            rows, cols = self.wshapes[layer.name]
            t = float(self.device.gemm_time(rows, cols, math.prod(out_shape[1:])))
            if relu:
                t += float(self.device.compute_time(*nonlinear_work("relu", [out_shape], out_shape, {})))
            return t
        return float(self.device.compute_time(*nonlinear_work(layer.op, in_shapes, out_shape, layer.attrs)))

    def run(self, layer, in_shapes: list, compute, relu: bool = False):
        """``compute()``, then sleep until the device's modeled time has passed."""
        start = time.perf_counter()
        out = compute()
        modeled = self.seconds(layer, [tuple(s) for s in in_shapes], relu)
        self.modeled_s += modeled
        rest = modeled - (time.perf_counter() - start)
        if rest > 0:
            time.sleep(rest)
        return out
