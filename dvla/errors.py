"""Errors that reach a user as one line.

Every failure a user can cause or must act on (a bad YAML file, an unknown backend, a
simulator that raises, a diverging loss) is a :class:`DvlaError`. The CLI prints its
message on one line and exits non-zero without a traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class DvlaError(Exception):
    """Base of all user-facing errors; ``str(err)`` is the one line a user sees."""

    exit_code = 1


class ConfigError(DvlaError):
    """A pipeline file or a backend option is malformed or inconsistent."""

    exit_code = 2


class PluginError(DvlaError):
    """A backend cannot be found, is registered twice, or fails to import."""

    exit_code = 2


class ModelError(DvlaError):
    """A model backend cannot load its weights or files (missing, corrupt, wrong kind)."""

    exit_code = 2


class SimulatorError(DvlaError):
    """A simulator backend raised while creating, resetting or stepping an environment."""


class TrainingError(DvlaError):
    """Training cannot go on, e.g. the loss became NaN or infinite."""


class LaneError(DvlaError):
    """A pipeline lane failed; wraps the lane name so the user knows where."""
