"""Backend interfaces and dvla's built-in backends.

The interfaces live in :mod:`dvla.backends.base`; built-in implementations live in the
sub-packages and are registered through entry points like any third-party plugin.
"""

from dvla.backends.base import (
    Algorithm,
    OptimizerFactory,
    Policy,
    PolicyOutput,
    Simulator,
    SimulatorSpec,
    TaskSpec,
)

__all__ = [
    "Algorithm",
    "OptimizerFactory",
    "Policy",
    "PolicyOutput",
    "Simulator",
    "SimulatorSpec",
    "TaskSpec",
]
