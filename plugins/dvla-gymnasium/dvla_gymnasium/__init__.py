"""dvla-gymnasium: any Gymnasium environment with image observations as a dvla simulator.

Importing the package registers the example environment ``dvla_gymnasium/ColorReach-v0``
with Gymnasium, so ``gymnasium.make`` finds it once the plugin (or any module of it) is
imported. The adapter itself, :class:`dvla_gymnasium.simulator.GymnasiumSimulator`, is
reached through the ``dvla.simulators`` entry point ``gymnasium``; it is not imported
here so that making the example environment does not import dvla and torch.
"""

from __future__ import annotations

from dvla_gymnasium.envs import ENV_ID, ColorReachEnv, register

register()

__all__ = ["ENV_ID", "ColorReachEnv", "register"]
