"""The ``gymnasium`` simulator backend: ``num_envs`` Gymnasium environments as one batch.

dvla talks to simulators in batches of environments addressed by index, with actions in
``[-1, 1]^D``, (task, initial state) pairs chosen by the sampler and a language
instruction per task. Gymnasium environments are single, take actions in their own
space, are seeded at reset and know nothing of language. The adapter bridges the two:

* **Tasks** are the configured ``instruction`` (one task) or ``instructions`` (several);
  ``reset_options`` can give each task its own ``env.reset(options=...)`` so tasks differ
  in the environment too, not only in what the policy reads.
* **Initial states** are reset seeds: task ``k``'s state ``i`` is
  ``env.reset(seed=reset_seed + k * num_init_states + i)``. The seed depends on nothing
  else (not the run seed, not the shard), so every rollout of a GRPO group starts from
  the same state wherever it runs, and a user can reproduce it with ``gymnasium.make``.
* **Observations**: a ``Box`` ``H x W x 3`` uint8 observation space is the camera image;
  in a ``Dict`` space ``image_key`` names it (or the only such entry is used), and
  ``proprio_key`` an optional vector entry that becomes proprioception.
* **Actions** in ``[-1, 1]`` are mapped affinely onto a bounded float ``Box`` (``D`` its
  size), binned into ``n`` equal intervals for ``Discrete(n)`` (``D = 1``) and per
  dimension for a one-dimensional ``MultiDiscrete`` (``D`` its length).
* **Outcome**: the reward is the environment's; success is ``info["is_success"]`` where
  the environment reports it, else "terminated with a positive reward"; an episode is
  done when it terminates or is truncated (and, with ``end_on_success``, on success).

Spaces are checked, with one-line :class:`~dvla.errors.ConfigError` messages, before the
model is built: the env id (and ``env_module``) when the options are validated, the
spaces in :meth:`GymnasiumSimulator.describe` on one throw-away environment.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from dvla import logs
from dvla.backends.base import Simulator, SimulatorSpec, TaskSpec
from dvla.config import BackendOptions
from dvla.data import ObsBatch, StepBatch
from dvla.errors import ConfigError, SimulatorError
from gymnasium import spaces
from numpy.typing import NDArray
from pydantic import Field, model_validator

log = logs.get(__name__)

#: Registered ids named in the unknown-id error when none is close to the one given.
_EXAMPLE_IDS = 5


class GymnasiumOptions(BackendOptions):
    """Options of the ``gymnasium`` simulator."""

    env_id: str = Field(
        description="Gymnasium id passed to gymnasium.make, e.g. dvla_gymnasium/ColorReach-v0."
    )
    env_module: str | None = Field(
        None,
        description="Module imported before env_id is looked up, for third-party packages "
        "that register their environments on import.",
    )
    env_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of gymnasium.make."
    )
    instruction: str | None = Field(
        None, min_length=1, description="The language instruction of the single task."
    )
    instructions: list[str] | None = Field(
        None,
        min_length=1,
        description="Several tasks, one instruction each (instead of instruction).",
    )
    reset_options: list[dict[str, Any]] | None = Field(
        None,
        description="Per task, the options passed to env.reset (one entry per instruction), "
        "so tasks can differ in the environment and not only in the instruction.",
    )
    image_key: str | None = Field(
        None,
        description="Entry of a Dict observation space holding the H x W x 3 uint8 image; "
        "default the only such entry.",
    )
    proprio_key: str | None = Field(
        None,
        description="Entry of a Dict observation space used as proprioception (flattened to "
        "float32); default none.",
    )
    camera: str = Field(
        "agentview", min_length=1, description="Camera name the image is given under."
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Episode length limit (gymnasium.make's max_episode_steps); default the "
        "environment's registered time limit.",
    )
    num_init_states: int = Field(
        50, ge=1, description="Initial states per task, i.e. distinct reset seeds."
    )
    reset_seed: int = Field(
        0,
        ge=0,
        description="Task k's initial state i is reset with seed "
        "reset_seed + k * num_init_states + i.",
    )
    end_on_success: bool = Field(
        True,
        description="End an episode on its first successful step, as LIBERO does, even if "
        "the environment would go on.",
    )

    @model_validator(mode="after")
    def _check(self) -> GymnasiumOptions:
        if (self.instruction is None) == (self.instructions is None):
            raise ValueError(
                "set exactly one of instruction (one task) or instructions (several tasks)"
            )
        if self.reset_options is not None and len(self.reset_options) != len(self.tasks):
            raise ValueError(
                f"reset_options: {len(self.reset_options)} entries for {len(self.tasks)} "
                "tasks; give one per instruction"
            )
        if self.image_key is not None and self.image_key == self.proprio_key:
            raise ValueError("image_key and proprio_key name the same entry")
        check_env_id(self.env_id, self.env_module)
        return self

    @property
    def tasks(self) -> list[str]:
        """The instruction of each task, in task-id order."""
        if self.instructions is not None:
            return list(self.instructions)
        assert self.instruction is not None
        return [self.instruction]


def check_env_id(env_id: str, env_module: str | None) -> None:
    """Import ``env_module`` and check that ``env_id`` is registered, without making it.

    Raises:
        ValueError: the module does not import or the id is unknown (the options model
            turns it into one line naming ``simulator``).
    """
    if env_module is not None:
        try:
            importlib.import_module(env_module)
        except Exception as err:
            raise ValueError(
                f"env_module: cannot import {env_module!r}: {type(err).__name__}: {err}"
            ) from None
    if env_id in gym.registry:
        return
    known = list(gym.registry)
    close = difflib.get_close_matches(env_id, known, n=3, cutoff=0.6)
    hint = (
        f"did you mean {', '.join(close)}?"
        if close
        else f"registered ids include {', '.join(known[:_EXAMPLE_IDS])}"
    )
    raise ValueError(
        f"env_id: no Gymnasium environment {env_id!r} is registered ({hint}); if a package "
        "registers it on import, set env_module to that package"
    )


@dataclass(frozen=True)
class ActionMap:
    """How a dvla action in ``[-1, 1]^dim`` becomes an action of one Gymnasium space."""

    dim: int
    convert: Callable[[NDArray[np.float32]], Any]


def action_map(space: spaces.Space[Any]) -> ActionMap:
    """The mapping for ``space``.

    Bounded float boxes are scaled affinely so that -1 and 1 reach the bounds; discrete
    spaces are binned so that each choice gets an equal share of ``[-1, 1]``, which is
    what a policy with binned action tokens can express without knowing ``n``.

    Raises:
        ConfigError: the space is of another kind, or a Box is unbounded or integer.
    """
    if isinstance(space, spaces.Box):
        if not np.issubdtype(space.dtype, np.floating):
            raise ConfigError(
                f"simulator: action space {space} has integer dtype; only float Box, Discrete "
                "and MultiDiscrete action spaces are supported"
            )
        if not (space.is_bounded("both") and np.isfinite(space.low).all()):
            raise ConfigError(
                f"simulator: action space {space} is unbounded; wrap the environment in "
                "gymnasium.wrappers.RescaleAction or give it finite bounds"
            )
        low = space.low.astype(np.float64).reshape(-1)
        high = space.high.astype(np.float64).reshape(-1)
        shape, dtype = space.shape, space.dtype

        def box(a: NDArray[np.float32]) -> Any:
            t = (np.clip(a.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0
            return np.clip(low + t * (high - low), low, high).reshape(shape).astype(dtype)

        return ActionMap(int(low.size), box)
    if isinstance(space, spaces.Discrete):
        n, start = int(space.n), int(space.start)
        return ActionMap(1, lambda a: start + int(_bins(a[:1], np.array([n]))[0]))
    if isinstance(space, spaces.MultiDiscrete) and space.nvec.ndim == 1:
        nvec, mstart = space.nvec.astype(np.int64), space.start.astype(np.int64)
        return ActionMap(len(nvec), lambda a: (mstart + _bins(a, nvec)).astype(space.dtype))
    raise ConfigError(
        f"simulator: action space {space} is not supported; use a float Box, Discrete or "
        "one-dimensional MultiDiscrete action space (or wrap the environment to one)"
    )


def _bins(a: NDArray[np.float32], n: NDArray[np.int64]) -> NDArray[np.int64]:
    """Which of ``n`` equal intervals of ``[-1, 1]`` each value falls into."""
    t = (np.clip(a.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0
    return np.minimum(np.floor(t * n).astype(np.int64), n - 1)


def _is_image(space: spaces.Space[Any]) -> bool:
    return (
        isinstance(space, spaces.Box)
        and space.dtype == np.uint8
        and len(space.shape) == 3
        and space.shape[2] == 3
    )


@dataclass(frozen=True)
class Layout:
    """Where the image and proprioception are in an observation, and the action mapping."""

    image_key: str | None  # None: the observation is the image
    proprio_key: str | None
    image_shape: tuple[int, int]
    proprio_dim: int
    action: ActionMap
    max_steps: int


def inspect(env: gym.Env[Any, Any], o: GymnasiumOptions) -> Layout:
    """Check ``env``'s spaces against the options; what the adapter needs to read them.

    Raises:
        ConfigError: no usable image, a bad ``image_key`` / ``proprio_key``, an
            unsupported action space, or no episode limit.
    """
    space = env.observation_space
    image_key: str | None = None
    proprio_dim = 0
    if isinstance(space, spaces.Dict):
        images = [k for k, s in space.spaces.items() if _is_image(s)]
        if o.image_key is not None:
            if o.image_key not in space.spaces or not _is_image(space.spaces[o.image_key]):
                raise ConfigError(
                    f"simulator.image_key: {o.image_key!r} is not an H x W x 3 uint8 image "
                    f"entry of the observation space (image entries: {images or 'none'})"
                )
            image_key = o.image_key
        elif len(images) == 1:
            image_key = images[0]
        else:
            raise ConfigError(
                f"simulator.image_key: the observation space has {len(images)} H x W x 3 uint8 "
                f"image entries ({', '.join(images) or 'none'} of {', '.join(space.spaces)}); "
                "name one"
            )
        if o.proprio_key is not None:
            sub = space.spaces.get(o.proprio_key)
            if not isinstance(sub, spaces.Box):
                raise ConfigError(
                    f"simulator.proprio_key: {o.proprio_key!r} is not a Box entry of the "
                    f"observation space (entries: {', '.join(space.spaces)})"
                )
            proprio_dim = int(np.prod(sub.shape))
        image = space.spaces[image_key]
    else:
        if o.image_key is not None or o.proprio_key is not None:
            raise ConfigError(
                "simulator: image_key and proprio_key apply to Dict observation spaces; "
                f"{o.env_id} observes {space}"
            )
        if not _is_image(space):
            raise ConfigError(
                f"simulator: {o.env_id} observes {space}, not an H x W x 3 uint8 image (a Box "
                "image or a Dict with one); wrap it (e.g. AddRenderObservation) to observe "
                "pixels"
            )
        image = space
    max_steps = o.max_steps or (env.spec.max_episode_steps if env.spec is not None else None)
    if max_steps is None:
        raise ConfigError(f"simulator.max_steps: {o.env_id} registers no time limit; set max_steps")
    h, w, _ = image.shape or (0, 0, 0)
    return Layout(
        image_key=image_key,
        proprio_key=o.proprio_key,
        image_shape=(int(h), int(w)),
        proprio_dim=proprio_dim,
        action=action_map(env.action_space),
        max_steps=int(max_steps),
    )


def make_env(o: GymnasiumOptions) -> gym.Env[Any, Any]:
    """``gymnasium.make`` with the configured kwargs and episode limit.

    Raises:
        SimulatorError: the environment raised while being made (bad ``env_kwargs``, a
            missing dependency), as one line.
    """
    try:
        return gym.make(o.env_id, max_episode_steps=o.max_steps, **o.env_kwargs)
    except Exception as err:
        msg = " ".join(str(err).split())
        raise SimulatorError(
            f"simulator 'gymnasium': gymnasium.make({o.env_id!r}) failed: "
            f"{type(err).__name__}: {msg}"
        ) from err


def spec_of(o: GymnasiumOptions, layout: Layout) -> SimulatorSpec:
    """The dvla spec of environments with ``layout`` under options ``o``."""
    return SimulatorSpec(
        cameras={o.camera: layout.image_shape},
        proprio_dim=layout.proprio_dim,
        action_dim=layout.action.dim,
        max_episode_steps=layout.max_steps,
        tasks=tuple(TaskSpec(t, o.num_init_states) for t in o.tasks),
    )


class GymnasiumSimulator(Simulator):
    """The ``gymnasium`` simulator backend; see the module docstring for the mapping.

    Environments are stepped one after another in the calling thread: dvla already runs
    simulators off the event loop and in as many shards (or sampler processes) as the
    pipeline asks for, which is where parallelism over costly environments comes from.
    """

    Options = GymnasiumOptions

    def __init__(self, options: Any, num_envs: int, seed: int) -> None:
        super().__init__(options, num_envs, seed)
        o: GymnasiumOptions = options
        self.o = o
        self.envs: list[gym.Env[Any, Any]] = []
        try:
            for _ in range(num_envs):
                self.envs.append(make_env(o))
            self.layout = inspect(self.envs[0], o)
        except BaseException:
            self.close()
            raise
        self._spec = spec_of(o, self.layout)
        self._tasks = o.tasks
        self.task = np.zeros(num_envs, np.int64)
        self.active = np.zeros(num_envs, bool)
        log.info("gymnasium environments made", env_id=o.env_id, num_envs=num_envs)

    @classmethod
    def describe(cls, options: Any) -> SimulatorSpec:
        """The spec, read from one environment made and closed here.

        Gymnasium spaces are only known once an environment exists; making one before the
        shards start means a wrong image key or action space is reported before the model
        is built and before ``num_envs`` environments are made.
        """
        env = make_env(options)
        try:
            return spec_of(options, inspect(env, options))
        finally:
            env.close()

    @property
    def spec(self) -> SimulatorSpec:
        return self._spec

    def reset_seed(self, task_id: int, init_state_id: int) -> int:
        """The ``env.reset`` seed of (task, initial state); see the module docstring."""
        return self.o.reset_seed + task_id * self.o.num_init_states + init_state_id

    def reset(
        self, env_ids: np.ndarray, task_ids: np.ndarray, init_state_ids: np.ndarray
    ) -> ObsBatch:
        env_ids = np.asarray(env_ids, np.int64)
        task_ids = np.asarray(task_ids, np.int64)
        init_state_ids = np.asarray(init_state_ids, np.int64)
        k, m = len(self._tasks), self.o.num_init_states
        if ((task_ids < 0) | (task_ids >= k)).any():
            raise ValueError(f"task ids must be in [0, {k}), got {task_ids.tolist()}")
        if ((init_state_ids < 0) | (init_state_ids >= m)).any():
            raise ValueError(f"init state ids must be in [0, {m}), got {init_state_ids.tolist()}")
        obs = []
        for i, task, init in zip(env_ids, task_ids, init_state_ids, strict=True):
            opts = self.o.reset_options[int(task)] if self.o.reset_options is not None else None
            ob, _ = self.envs[int(i)].reset(
                seed=self.reset_seed(int(task), int(init)), options=opts
            )
            obs.append(ob)
        self.task[env_ids] = task_ids
        self.active[env_ids] = True
        return self._batch(env_ids, obs)

    def step(self, env_ids: np.ndarray, actions: np.ndarray) -> StepBatch:
        env_ids = np.asarray(env_ids, np.int64)
        a = np.asarray(actions, np.float32)
        d = self.layout.action.dim
        if a.shape != (len(env_ids), d):
            raise ValueError(f"actions must have shape ({len(env_ids)}, {d}), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("actions contain NaN or infinity")
        if not self.active[env_ids].all():
            raise ValueError("step() called on an environment whose episode is over; reset it")
        n = len(env_ids)
        reward = np.zeros(n, np.float32)
        done = np.zeros(n, bool)
        success = np.zeros(n, bool)
        obs = []
        for j, i in enumerate(env_ids):
            ob, r, terminated, truncated, info = self.envs[int(i)].step(
                self.layout.action.convert(a[j])
            )
            obs.append(ob)
            reward[j] = float(r)
            ok = bool(info["is_success"]) if "is_success" in info else terminated and reward[j] > 0
            success[j] = ok
            done[j] = terminated or truncated or (ok and self.o.end_on_success)
        self.active[env_ids[done]] = False
        return StepBatch(obs=self._batch(env_ids, obs), reward=reward, done=done, success=success)

    def _batch(self, env_ids: NDArray[np.int64], obs: list[Any]) -> ObsBatch:
        lay = self.layout
        h, w = lay.image_shape
        n = len(obs)
        # Copied into fresh arrays: environments may reuse their observation buffers.
        images = np.empty((n, h, w, 3), np.uint8)
        proprio = np.empty((n, lay.proprio_dim), np.float32)
        for j, ob in enumerate(obs):
            images[j] = ob if lay.image_key is None else ob[lay.image_key]
            if lay.proprio_key is not None:
                proprio[j] = np.asarray(ob[lay.proprio_key], np.float32).reshape(-1)
        instr = [self._tasks[int(t)] for t in self.task[env_ids]]
        return ObsBatch(images={self.o.camera: images}, proprio=proprio, instructions=instr)

    def close(self) -> None:
        """Close every environment made so far; safe to call twice."""
        envs, self.envs = self.envs, []
        for env in envs:
            env.close()
