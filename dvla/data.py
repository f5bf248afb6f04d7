"""The records that travel on the data plane between lanes.

They hold plain numpy arrays and strings only, so the data plane (in-process queues now,
msgpack-framed channels later) can carry them without pickle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ObsBatch:
    """Observations of several environments at one step.

    Attributes:
        images: camera name -> uint8 array ``[B, H, W, 3]``.
        proprio: float32 ``[B, P]`` robot state.
        instructions: one language instruction per environment.
    """

    images: dict[str, np.ndarray]
    proprio: np.ndarray
    instructions: list[str]

    def __len__(self) -> int:
        return len(self.instructions)

    def select(self, idx: np.ndarray) -> ObsBatch:
        """The rows at ``idx`` (a copy)."""
        return ObsBatch(
            images={k: v[idx] for k, v in self.images.items()},
            proprio=self.proprio[idx],
            instructions=[self.instructions[int(i)] for i in idx],
        )

    @staticmethod
    def concat(parts: list[ObsBatch]) -> ObsBatch:
        """Stack batches from several requesters into one forward."""
        if len(parts) == 1:
            return parts[0]
        return ObsBatch(
            images={k: np.concatenate([p.images[k] for p in parts]) for k in parts[0].images},
            proprio=np.concatenate([p.proprio for p in parts]),
            instructions=[s for p in parts for s in p.instructions],
        )


@dataclass
class StepBatch:
    """What a vectorised simulator returns for the environments it stepped."""

    obs: ObsBatch
    reward: np.ndarray  # float32 [B]
    done: np.ndarray  # bool [B]: episode over (success or time limit)
    success: np.ndarray  # bool [B]
    #: bool [B] or None: the environment's process died or hung; its episode is void
    #: (the simulator has already replaced the process; the lane restarts the episode).
    broken: np.ndarray | None = None


@dataclass
class ActionBatch:
    """The policy's answer to an :class:`ObsBatch`.

    Attributes:
        actions: float32 ``[B, D]`` continuous actions in [-1, 1].
        tokens: int64 ``[B, D]`` the discrete action tokens (bins) they came from.
        logprobs: float32 ``[B, D]`` behaviour log-probabilities of those tokens.
        version: policy version that produced them.
    """

    actions: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray
    version: int

    def slice(self, start: int, stop: int) -> ActionBatch:
        """Rows ``start:stop``, for handing a batched answer back to each requester."""
        return ActionBatch(
            self.actions[start:stop],
            self.tokens[start:stop],
            self.logprobs[start:stop],
            self.version,
        )


@dataclass
class Trajectory:
    """One finished episode.

    Attributes:
        producer: id of the sample shard that produced it.
        seq: per-producer sequence number (for exactly-once delivery across processes).
        group_id: rollouts sharing (task, initial state) share a group id.
        task_id: simulator task index.
        init_state_id: initial-state index within the task.
        instruction: the language instruction of the episode.
        images: camera -> uint8 ``[T, H, W, 3]`` observations the actions were taken on.
        proprio: float32 ``[T, P]``.
        tokens: int64 ``[T, D]`` action tokens taken.
        logprobs: float32 ``[T, D]`` behaviour log-probabilities.
        versions: int64 ``[T]`` policy version of each action.
        rewards: float32 ``[T]``.
        success: whether the episode reached the task's goal.

    A trajectory a sample lane built from its rollout pool holds views of a ring slot;
    whoever is done with it last (the learner after its update, or whoever drops or
    discards it) calls :meth:`release` so the slot is reused. The hook is not a field of
    the record: it never travels, and equality and repr ignore it.
    """

    producer: str
    seq: int
    group_id: int
    task_id: int
    init_state_id: int
    instruction: str
    images: dict[str, np.ndarray]
    proprio: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    rewards: np.ndarray
    success: bool
    _release: Callable[[], None] | None = field(default=None, init=False, repr=False, compare=False)

    def attach_release(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once when the trajectory is released (a pooled trajectory's slot)."""
        self._release = fn

    def release(self) -> None:
        """Return the trajectory's memory to its pool; its arrays must not be read after.

        Idempotent, and a no-op for trajectories that were never pooled (decoded from the
        data plane, built by tests).
        """
        fn, self._release = self._release, None
        if fn is not None:
            fn()

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def version(self) -> int:
        """The oldest policy version that acted in this episode: staleness is judged by it."""
        return int(self.versions.min())

    @property
    def ret(self) -> float:
        return float(self.rewards.sum())


@dataclass
class TrajectoryGroup:
    """G rollouts from one (task, initial state): the unit GRPO normalises over."""

    group_id: int
    task_id: int
    init_state_id: int
    trajectories: list[Trajectory] = field(default_factory=list)

    @property
    def version(self) -> int:
        return min(t.version for t in self.trajectories)

    def release(self) -> None:
        """Release every trajectory of the group (see :meth:`Trajectory.release`)."""
        for t in self.trajectories:
            t.release()

    @property
    def env_steps(self) -> int:
        return sum(t.length for t in self.trajectories)
