"""The four backend interfaces every plugin implements.

Each backend class declares an ``Options`` model (a :class:`dvla.config.BackendOptions`
subclass): the keys of its YAML section other than ``name`` are validated against it, so
a typo in a plugin's option fails at load time like a typo in dvla's own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from dvla.config import BackendOptions
from dvla.data import ObsBatch, StepBatch, TrajectoryGroup
from dvla.errors import ConfigError

if TYPE_CHECKING:
    from dvla.pipeline.memory import BufferPool


@dataclass(frozen=True)
class TaskSpec:
    """One task a simulator offers."""

    instruction: str
    num_init_states: int


@dataclass(frozen=True)
class SimulatorSpec:
    """What a model needs to know about a simulator's observations and actions."""

    cameras: dict[str, tuple[int, int]]  # name -> (height, width)
    proprio_dim: int
    action_dim: int
    max_episode_steps: int
    tasks: tuple[TaskSpec, ...]


class Simulator(ABC):
    """A vectorised set of ``num_envs`` environments stepped as one batch.

    Batching is part of the interface because every real backend batches: the toy
    simulator vectorises in numpy, LIBERO steps one process per environment in parallel.
    Methods run in a worker thread (or process), never on the event loop, so they may
    block. Environments are addressed by index in ``[0, num_envs)``.
    """

    Options: ClassVar[type[BackendOptions]] = BackendOptions

    def __init__(self, options: Any, num_envs: int, seed: int) -> None:
        self.options = options
        self.num_envs = num_envs
        self.seed = seed

    @property
    @abstractmethod
    def spec(self) -> SimulatorSpec:
        """Cameras, proprioception, action size, episode limit and tasks."""

    @classmethod
    def describe(cls, options: Any) -> SimulatorSpec | None:
        """The spec without starting any environment, where that is cheap; else None.

        The coordinator needs only the spec when simulators run in sampler processes;
        a backend whose environments are costly (LIBERO: seconds and gigabytes each)
        answers here instead of being started once just to be asked.
        """
        return None

    @abstractmethod
    def reset(
        self, env_ids: np.ndarray, task_ids: np.ndarray, init_state_ids: np.ndarray
    ) -> ObsBatch:
        """Start new episodes in ``env_ids`` from the given (task, initial state) pairs."""

    @abstractmethod
    def step(self, env_ids: np.ndarray, actions: np.ndarray) -> StepBatch:
        """Apply float32 ``actions[len(env_ids), action_dim]`` in [-1, 1]."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release processes, renderers and files."""


@dataclass
class PolicyOutput:
    """Result of :meth:`Policy.evaluate` on a batch of taken tokens."""

    logprobs: torch.Tensor  # [B, D]
    entropy: torch.Tensor  # [B, D]
    values: torch.Tensor | None = None  # [B], for actor-critic algorithms


class Policy(nn.Module, ABC):
    """A VLA policy: observations and an instruction in, discrete action tokens out.

    Actions are tokens (bins per action dimension, as OpenVLA discretises them); the
    continuous action sent to the simulator is the bin's centre. The inference lane calls
    :meth:`act` under ``torch.no_grad``; the learner calls :meth:`evaluate` with grad.
    """

    Options: ClassVar[type[BackendOptions]] = BackendOptions

    def __init__(self, options: Any, spec: SimulatorSpec) -> None:
        super().__init__()
        self.options = options
        self.spec = spec

    @abstractmethod
    def prepare(self, obs: ObsBatch) -> dict[str, torch.Tensor]:
        """Turn numpy observations into the model's input tensors (tokenise, normalise)."""

    @abstractmethod
    def act(
        self,
        inputs: dict[str, torch.Tensor],
        *,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample (or take the most likely) tokens.

        Returns:
            continuous actions float32 ``[B, D]``, tokens int64 ``[B, D]``, their
            log-probabilities float32 ``[B, D]``.
        """

    @abstractmethod
    def evaluate(self, inputs: dict[str, torch.Tensor], tokens: torch.Tensor) -> PolicyOutput:
        """Log-probabilities and entropy of ``tokens`` under the current weights.

        ``values`` is filled once :meth:`enable_value_head` has been called.
        """

    def enable_value_head(self) -> None:
        """Add a state-value head, for actor-critic algorithms (``Algorithm.needs_values``).

        Called once, before the optimizer is built and before any weights are loaded, so
        every replica and checkpoint of the run has the same parameters. Models without
        one refuse, which turns a PPO run on such a model into a one-line error.

        Raises:
            ConfigError: this model cannot predict values.
        """
        raise ConfigError(
            f"model '{type(self).__name__}' has no value head, which the algorithm needs"
        )

    def save_pretrained(self, directory: Path) -> list[str]:
        """Write files beside the exported weights that tools outside dvla need.

        :func:`dvla.pipeline.export.export_policy` always writes ``model.safetensors``
        and ``dvla-policy.json``; a backend wrapping a library model adds that library's
        own format here (a transformers backend: ``save_pretrained`` of the model and
        its processor), so the export loads there as well as in dvla.

        Returns:
            The names of the files or directories written (relative to ``directory``).
        """
        return []


class OptimizerFactory(ABC):
    """Builds a torch optimizer for the learner's parameters."""

    Options: ClassVar[type[BackendOptions]] = BackendOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    @abstractmethod
    def build(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """A fresh optimizer over ``params``."""


class Algorithm(ABC):
    """Turns groups of trajectories into one optimizer step (or several epochs of them)."""

    Options: ClassVar[type[BackendOptions]] = BackendOptions
    #: Actor-critic algorithms set this: the policy gets a value head before training.
    needs_values: ClassVar[bool] = False
    #: The run's training memory pool, set by the coordinator: pass it to
    #: :func:`dvla.backends.algorithms.batching.flatten` to build each batch in reused
    #: buffers (valid until the next update's flatten). None: new arrays every update.
    train_pool: BufferPool | None = None

    def __init__(self, options: Any, policy: Policy, optimizer: torch.optim.Optimizer) -> None:
        self.options = options
        self.policy = policy
        self.optimizer = optimizer

    @property
    def group_size(self) -> int:
        """Rollouts per (task, initial state) the sampler must produce together."""
        return 1

    @abstractmethod
    def update(
        self,
        groups: list[TrajectoryGroup],
        learner_version: int,
        max_staleness: int,
        importance_correction: bool,
    ) -> dict[str, float]:
        """One learner iteration on ``groups``; returns scalar metrics (``loss`` at least).

        The trajectories' arrays are views of the rollout pool's ring slots, which are
        reused once this returns: an algorithm that keeps data beyond one update (a
        replay buffer) must copy it.

        Args:
            groups: the trajectory groups, each already within ``max_staleness``.
            learner_version: the version of the weights being updated, to measure staleness.
            max_staleness: the configured bound, for reporting.
            importance_correction: reweight stale samples by truncated importance ratios.
        """
