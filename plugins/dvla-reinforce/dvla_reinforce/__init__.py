"""dvla-reinforce: REINFORCE with a baseline, as a ``dvla.algorithms`` plugin.

Installing the package registers the ``reinforce`` algorithm through its entry point;
a pipeline file selects it with ``algorithm: {name: reinforce}``. Nothing is registered
by importing this module: dvla finds the class through package metadata and imports it
only when a pipeline names it.
"""

from __future__ import annotations

from dvla_reinforce.algorithm import Reinforce, ReinforceOptions

__all__ = ["Reinforce", "ReinforceOptions"]
__version__ = "0.1.0"
