"""``--master-device``: the master's own layers take the device's modeled time, the simulator's.

The one-device job (``--workers 0``) served in process: its padded time must be exactly what the
simulator models for one device (:func:`mpicdc.sim.autoplan.layer_costs` of the single-device
plan, an independent walk of the same cost model, without ReLU fusion), its latency at least
that, and its output the serial forward's.
"""
from __future__ import annotations

import numpy as np
import pytest
from fake_channel import FakeNetwork

from mpicdc.core.kernels import default_input, forward
from mpicdc.core.models import get_model
from mpicdc.core.plan import single_device_plan
from mpicdc.core.random_weights import init_weights
from mpicdc.runtime.master import Coordinator
from mpicdc.sim.autoplan import layer_costs


@pytest.mark.parametrize("name", ["tiny", "lenet"])
def test_one_emulated_device_takes_the_simulators_time(name):
    model = get_model(name)
    plan = single_device_plan(model)
    weights = init_weights(model)
    net = FakeNetwork(1)
    coord = Coordinator(net.endpoint(0), FakeNetwork(1).endpoint(0), model, plan, weights, master_device="rpi3")
    result = coord.infer(default_input(model))
    assert result.ok and result.layers == []
    np.testing.assert_array_equal(result.output, forward(model, weights, default_input(model)))
    modeled = sum(layer_costs(model, plan, "rpi3").values())
    assert coord.pacer.modeled_s == pytest.approx(modeled, rel=1e-9)
    assert result.latency_s >= modeled  # padded by sleeping: never shorter
    assert net.log == []  # one device: nothing on the wire
