"""The simulator: a discrete-event model of the protocol (:mod:`.engine`), device models and coverage.

``python -m mpicdc.sim`` runs the simulator's command line.
"""
from mpicdc.sim.engine import (
           Decodability,
           Link,
           SimConfig,
           SimResult,
           decode_structure,
           main,
           nonlinear_work,
           simulate,
)

__all__ = ["Decodability", "Link", "SimConfig", "SimResult", "decode_structure", "main", "nonlinear_work",
           "simulate"]
