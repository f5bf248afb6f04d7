"""Tiny, deterministic backends and data builders for tests.

Nothing here learns anything useful; everything is small enough that a test runs in
milliseconds and simple enough that a test can predict each number by hand:

* :class:`FakeSimulator` is a :class:`~dvla.backends.base.Simulator` whose episodes last
  exactly ``episode_length`` steps and succeed when the first action dimension of the
  last step exceeds ``success_threshold``. It can be told to raise at a given step.
* :class:`FakePolicy` is a :class:`~dvla.backends.base.Policy` made of one linear layer
  over proprioception, so it has parameters, gradients and log-probabilities; it can be
  told to emit NaN logits.
* :func:`make_trajectory` and :func:`make_group` build trajectories and groups with
  chosen returns, lengths and policy versions, shaped for the two fakes above.

Plugin authors can use the fakes to test one backend of their own against the rest of
dvla, e.g. a new algorithm on :class:`FakePolicy` and groups from :func:`make_group`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from dvla.backends.base import Simulator, SimulatorSpec, TaskSpec
from dvla.backends.models.tokens import ActionTokenizer, TokenPolicy
from dvla.config import BackendOptions
from dvla.data import ObsBatch, StepBatch, Trajectory, TrajectoryGroup

#: The single camera of :class:`FakeSimulator`.
CAMERA = "cam"
#: Proprioception of :class:`FakeSimulator`: ``[t / episode_length, task, init state]``.
PROPRIO_DIM = 3


class FakeSimulatorOptions(BackendOptions):
    """Options of :class:`FakeSimulator`."""

    image_size: int = Field(8, ge=1, le=64, description="Side of the square camera image.")
    episode_length: int = Field(3, ge=1, description="Every episode lasts exactly this long.")
    num_tasks: int = Field(2, ge=1, description="Tasks offered (instructions 'fake task K').")
    num_init_states: int = Field(4, ge=1, description="Initial states per task.")
    action_dim: int = Field(2, ge=1, description="Size of an action.")
    success_threshold: float = Field(
        0.5, description="An episode succeeds when action[0] of its last step exceeds this."
    )
    fail_on_step: int | None = Field(
        None,
        ge=1,
        description="Raise RuntimeError in the step() call with this 1-based count "
        "(counted over all environments of the instance); None never fails.",
    )


class FakeSimulator(Simulator):
    """A vectorised simulator with a fixed episode length and a one-line reward rule.

    Observations are deterministic functions of (task, initial state, step): the image is
    filled with one colour derived from them and proprioception is
    ``[t / episode_length, task, init_state]``. The reward is 1 on the last step of an
    episode when its ``action[0] > success_threshold`` and 0 otherwise, so a test that
    controls the actions controls the returns.

    Attributes:
        step_calls: number of ``step()`` calls so far.
        reset_calls: number of ``reset()`` calls so far.
        closed: whether ``close()`` was called.

    """

    Options = FakeSimulatorOptions

    def __init__(self, options: Any, num_envs: int, seed: int) -> None:
        super().__init__(options, num_envs, seed)
        o: FakeSimulatorOptions = options
        self.o = o
        tasks = tuple(
            TaskSpec(instruction=f"fake task {k}", num_init_states=o.num_init_states)
            for k in range(o.num_tasks)
        )
        self._spec = SimulatorSpec(
            cameras={CAMERA: (o.image_size, o.image_size)},
            proprio_dim=PROPRIO_DIM,
            action_dim=o.action_dim,
            max_episode_steps=o.episode_length,
            tasks=tasks,
        )
        self.t = np.zeros(num_envs, np.int64)
        self.task = np.zeros(num_envs, np.int64)
        self.init_state = np.zeros(num_envs, np.int64)
        self.active = np.zeros(num_envs, bool)
        self.step_calls = 0
        self.reset_calls = 0
        self.closed = False

    @property
    def spec(self) -> SimulatorSpec:
        return self._spec

    def reset(
        self, env_ids: np.ndarray, task_ids: np.ndarray, init_state_ids: np.ndarray
    ) -> ObsBatch:
        ids = np.asarray(env_ids, np.int64)
        tasks = np.asarray(task_ids, np.int64)
        inits = np.asarray(init_state_ids, np.int64)
        if ((tasks < 0) | (tasks >= self.o.num_tasks)).any():
            raise ValueError(f"task ids must be in [0, {self.o.num_tasks}), got {tasks.tolist()}")
        if ((inits < 0) | (inits >= self.o.num_init_states)).any():
            raise ValueError(
                f"init state ids must be in [0, {self.o.num_init_states}), got {inits.tolist()}"
            )
        self.reset_calls += 1
        self.task[ids] = tasks
        self.init_state[ids] = inits
        self.t[ids] = 0
        self.active[ids] = True
        return self._observe(ids)

    def step(self, env_ids: np.ndarray, actions: np.ndarray) -> StepBatch:
        ids = np.asarray(env_ids, np.int64)
        a = np.asarray(actions, np.float32)
        self.step_calls += 1
        if self.o.fail_on_step is not None and self.step_calls == self.o.fail_on_step:
            raise RuntimeError(f"fake simulator failure at step {self.step_calls}")
        if a.shape != (len(ids), self.o.action_dim):
            raise ValueError(
                f"actions must have shape ({len(ids)}, {self.o.action_dim}), got {a.shape}"
            )
        if not self.active[ids].all():
            raise ValueError("step() called on an environment whose episode is over; reset it")
        self.t[ids] += 1
        done = self.t[ids] >= self.o.episode_length
        success = done & (a[:, 0] > self.o.success_threshold)
        self.active[ids[done]] = False
        return StepBatch(
            obs=self._observe(ids),
            reward=success.astype(np.float32),
            done=done,
            success=success,
        )

    def _observe(self, ids: np.ndarray) -> ObsBatch:
        s = self.o.image_size
        t, task, init = self.t[ids], self.task[ids], self.init_state[ids]
        img = np.empty((len(ids), s, s, 3), np.uint8)
        img[..., 0] = ((40 * task + 7) % 256)[:, None, None]
        img[..., 1] = ((30 * init + 11) % 256)[:, None, None]
        img[..., 2] = ((20 * t + 13) % 256)[:, None, None]
        proprio = np.stack(
            [t / self.o.episode_length, task.astype(np.float64), init.astype(np.float64)], axis=1
        ).astype(np.float32)
        instructions = [self._spec.tasks[int(k)].instruction for k in task]
        return ObsBatch(images={CAMERA: img}, proprio=proprio, instructions=instructions)

    def close(self) -> None:
        """Mark the simulator closed (tests check that runs close their simulators)."""
        self.closed = True


def fake_spec(**options: Any) -> SimulatorSpec:
    """Return the spec of a :class:`FakeSimulator` built with ``options``.

    Args:
        **options: fields of :class:`FakeSimulatorOptions`.

    Returns:
        The simulator spec, e.g. to build a :class:`FakePolicy` without a simulator.

    """
    return FakeSimulator(FakeSimulatorOptions(**options), 1, 0).spec


class FakePolicyOptions(BackendOptions):
    """Options of :class:`FakePolicy`."""

    action_bins: int = Field(8, ge=2, description="Tokens per action dimension.")
    init_scale: float = Field(0.1, ge=0, description="Std of the initial weights.")
    init_seed: int = Field(0, description="Seeds the initial weights (not torch's global RNG).")
    nan_logits: bool = Field(
        False,
        description="Emit NaN logits, to test divergence handling: log-probabilities and "
        "the learner's loss become NaN while sampled tokens stay valid (uniform).",
    )


class FakePolicy(TokenPolicy):
    """A linear map from proprioception to per-dimension token logits.

    Inputs are ``{"proprio": float32 [B, P]}``; logits have shape
    ``[B, action_dim, action_bins]`` and tokens decode to bin centres in [-1, 1] as the
    real models' do.
    """

    Options = FakePolicyOptions

    def __init__(self, options: Any, spec: SimulatorSpec) -> None:
        super().__init__(options, spec)
        o: FakePolicyOptions = options
        self.o = o
        self.action_dim = spec.action_dim
        self.feature_dim = spec.proprio_dim
        self.actions = ActionTokenizer(o.action_bins)
        self.linear = nn.Linear(spec.proprio_dim, spec.action_dim * o.action_bins)
        gen = torch.Generator().manual_seed(o.init_seed)
        with torch.no_grad():
            self.linear.weight.copy_(
                torch.randn(self.linear.weight.shape, generator=gen) * o.init_scale
            )
            self.linear.bias.copy_(
                torch.randn(self.linear.bias.shape, generator=gen) * o.init_scale
            )

    def prepare(self, obs: ObsBatch) -> dict[str, torch.Tensor]:
        proprio = np.ascontiguousarray(obs.proprio, dtype=np.float32)
        return {"proprio": torch.from_numpy(proprio)}

    def forward_heads(
        self, inputs: dict[str, torch.Tensor], tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token logits ``[B, action_dim, action_bins]`` and the proprioception as features.

        Args:
            inputs: the output of :meth:`prepare`.
            tokens: unused (the dimensions are independent).

        Returns:
            The logits (all NaN when the ``nan_logits`` option is set) and the features.
        """
        x = inputs["proprio"]
        out: torch.Tensor = self.linear(x).view(x.shape[0], self.action_dim, self.o.action_bins)
        if self.o.nan_logits:
            out = out + float("nan")
        return out, x


def make_obs(
    n: int,
    *,
    image_size: int = 8,
    proprio_dim: int = PROPRIO_DIM,
    instruction: str = "fake task 0",
    seed: int = 0,
) -> ObsBatch:
    """Build an observation batch shaped like :class:`FakeSimulator`'s.

    Args:
        n: batch size.
        image_size: side of the camera image.
        proprio_dim: size of the proprioception vector.
        instruction: the instruction of every row.
        seed: seeds the random proprioception.

    Returns:
        ``n`` observations with zero images and random proprioception in [0, 1).

    """
    rng = np.random.default_rng(seed)
    return ObsBatch(
        images={CAMERA: np.zeros((n, image_size, image_size, 3), np.uint8)},
        proprio=rng.random((n, proprio_dim)).astype(np.float32),
        instructions=[instruction] * n,
    )


def make_trajectory(
    ret: float,
    *,
    length: int = 3,
    version: int = 0,
    group_id: int = 0,
    task_id: int = 0,
    init_state_id: int = 0,
    seq: int = 0,
    producer: str = "fake",
    spec: SimulatorSpec | None = None,
    action_bins: int = 8,
    logprobs: np.ndarray | None = None,
) -> Trajectory:
    """Build a finished episode whose rewards sum to ``ret``.

    The whole return is paid on the last step. Tokens and proprioception are
    deterministic functions of ``(group_id, seq)``, so two trajectories of one group
    differ while every call with the same arguments gives the same trajectory.

    Args:
        ret: the episode return; ``success`` is ``ret > 0``.
        length: number of steps (at least 1).
        version: policy version of every step.
        group_id: group the trajectory belongs to.
        task_id: task index.
        init_state_id: initial-state index.
        seq: per-producer sequence number.
        producer: id of the producing shard.
        spec: shapes to follow; default :func:`fake_spec` with default options.
        action_bins: token range ``[0, action_bins)``; match the policy's option.
        logprobs: behaviour log-probabilities ``[length, action_dim]``; default the
            uniform policy's ``-log(action_bins)``.

    Returns:
        The trajectory.

    Raises:
        ValueError: ``length`` is below 1 or ``logprobs`` has the wrong shape.

    """
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    spec = spec if spec is not None else fake_spec()
    d = spec.action_dim
    rng = np.random.default_rng([group_id, seq])
    if logprobs is None:
        lp = np.full((length, d), -math.log(action_bins), np.float32)
    else:
        lp = np.asarray(logprobs, np.float32)
        if lp.shape != (length, d):
            raise ValueError(f"logprobs must have shape ({length}, {d}), got {lp.shape}")
    rewards = np.zeros(length, np.float32)
    rewards[-1] = ret
    return Trajectory(
        producer=producer,
        seq=seq,
        group_id=group_id,
        task_id=task_id,
        init_state_id=init_state_id,
        instruction=spec.tasks[task_id % len(spec.tasks)].instruction,
        images={cam: np.zeros((length, h, w, 3), np.uint8) for cam, (h, w) in spec.cameras.items()},
        proprio=rng.random((length, spec.proprio_dim)).astype(np.float32),
        tokens=rng.integers(0, action_bins, size=(length, d)).astype(np.int64),
        logprobs=lp,
        versions=np.full(length, version, np.int64),
        rewards=rewards,
        success=ret > 0,
    )


def make_group(
    returns: Sequence[float],
    version: int | Sequence[int] = 0,
    length: int | Sequence[int] = 3,
    *,
    group_id: int = 0,
    task_id: int = 0,
    init_state_id: int = 0,
    spec: SimulatorSpec | None = None,
    action_bins: int = 8,
) -> TrajectoryGroup:
    """Build a group with one trajectory per entry of ``returns``.

    Args:
        returns: the return of each trajectory.
        version: policy version of every trajectory, or one per trajectory.
        length: length of every trajectory, or one per trajectory.
        group_id: the group's id (and each trajectory's).
        task_id: task index of the group.
        init_state_id: initial-state index of the group.
        spec: shapes to follow; default :func:`fake_spec` with default options.
        action_bins: token range; match the policy's option.

    Returns:
        The group, trajectories numbered ``seq = 0, 1, ...``.

    Raises:
        ValueError: a per-trajectory ``version`` or ``length`` has the wrong size.

    """
    n = len(returns)
    versions = [version] * n if isinstance(version, int) else list(version)
    lengths = [length] * n if isinstance(length, int) else list(length)
    if len(versions) != n or len(lengths) != n:
        raise ValueError(
            f"need one version and one length per return ({n}), "
            f"got {len(versions)} and {len(lengths)}"
        )
    group = TrajectoryGroup(group_id, task_id, init_state_id)
    for i, (ret, v, ln) in enumerate(zip(returns, versions, lengths, strict=True)):
        group.trajectories.append(
            make_trajectory(
                float(ret),
                length=ln,
                version=v,
                group_id=group_id,
                task_id=task_id,
                init_state_id=init_state_id,
                seq=i,
                spec=spec,
                action_bins=action_bins,
            )
        )
    return group
