"""A fast, deterministic pick-the-named-block scene for testing the whole pipeline.

Several coloured blocks lie on a table; the instruction names one of them. The arm's
end effector moves in the table plane by the first two action dimensions, the last
dimension closes the gripper, and an episode succeeds when the gripper closes within
``success_radius`` of the named block. The scene is the same for every task, so only the
instruction tells a policy which block counts: a policy that ignores language cannot
beat 1/num_objects of the achievable rate.

Action layout (7-DoF, as LIBERO's): ``[dx, dy, dz, droll, dpitch, dyaw, gripper]`` in
[-1, 1]. ``dz`` and the rotations are accepted and ignored (the toy table is planar);
``gripper > 0`` means closed. Everything is vectorised in numpy over environments, so a
step of 64 environments costs well under a millisecond and large array operations
release the GIL.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from dvla.backends.base import Simulator, SimulatorSpec, TaskSpec
from dvla.config import BackendOptions
from dvla.data import ObsBatch, StepBatch

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (160, 60, 200),
    "cyan": (40, 210, 210),
}
_BACKGROUND = 60
_GRIPPER_OPEN = (255, 255, 255)
_GRIPPER_CLOSED = (150, 150, 150)


class ToyOptions(BackendOptions):
    """Options of the ``toy`` simulator."""

    image_size: int = Field(32, ge=8, le=256, description="Side of the square camera image.")
    num_objects: int = Field(
        3, ge=2, le=len(COLORS), description="Blocks on the table; one task per block."
    )
    max_steps: int = Field(8, ge=1, description="Episode length limit.")
    num_init_states: int = Field(
        50, ge=1, description="Fixed initial layouts per task (like LIBERO's init states)."
    )
    move_scale: float = Field(
        0.25, gt=0, le=1, description="Table fraction moved per step at full action."
    )
    success_radius: float = Field(
        0.2, gt=0, description="Gripper-to-block distance that counts as reached."
    )
    block_size: float = Field(0.16, gt=0, le=0.5, description="Block side, table fraction.")
    antialias: int = Field(
        1,
        ge=1,
        le=8,
        description="Supersampling factor: render at this multiple of image_size and average "
        "down (smoother edges, costlier steps; the render-quality knob real simulators have).",
    )
    layout_seed: int = Field(
        1234,
        description="Seeds the fixed initial layouts (not the run seed: layouts are "
        "part of the benchmark, as LIBERO's init states are).",
    )


class ToySimulator(Simulator):
    """The ``toy`` simulator backend."""

    Options = ToyOptions

    def __init__(self, options: Any, num_envs: int, seed: int) -> None:
        super().__init__(options, num_envs, seed)
        o: ToyOptions = options
        self.o = o
        k = o.num_objects
        self._colors = np.array([COLORS[c] for c in list(COLORS)[:k]], dtype=np.uint8)
        self._spec = self.describe(o)
        self._tasks = self._spec.tasks
        self._layouts = self._make_layouts()
        n = num_envs
        self.obj_pos = np.zeros((n, k, 2), np.float32)
        self.grip = np.zeros((n, 2), np.float32)
        self.closed = np.zeros(n, bool)
        self.target = np.zeros(n, np.int64)
        self.t = np.zeros(n, np.int64)
        self.task = np.zeros(n, np.int64)
        self.active = np.zeros(n, bool)
        hi = o.image_size * o.antialias
        centers = (np.arange(hi, dtype=np.float32) + 0.5) / hi
        self._cx = centers[None, None, :]  # columns -> x
        self._cy = centers[None, :, None]  # rows -> y

    @classmethod
    def describe(cls, options: Any) -> SimulatorSpec:
        """The spec from the options alone, so models are checked before any env starts."""
        o: ToyOptions = options
        tasks = tuple(
            TaskSpec(instruction=f"pick up the {name} block", num_init_states=o.num_init_states)
            for name in list(COLORS)[: o.num_objects]
        )
        return SimulatorSpec(
            cameras={"agentview": (o.image_size, o.image_size)},
            proprio_dim=3,
            action_dim=7,
            max_episode_steps=o.max_steps,
            tasks=tasks,
        )

    @property
    def spec(self) -> SimulatorSpec:
        return self._spec

    def _make_layouts(self) -> np.ndarray:
        """Fixed layouts ``[init_states, num_objects + 1, 2]`` (blocks, then gripper).

        Layouts are shared by all tasks and the gripper starts away from every block, so
        nothing but the instruction tells which block counts.
        """
        o = self.o
        k = o.num_objects
        rng = np.random.default_rng(o.layout_seed)
        out = np.zeros((o.num_init_states, k + 1, 2), np.float32)
        min_sep = max(o.block_size * 1.6, 0.15)
        for i in range(o.num_init_states):
            while True:
                pts = rng.uniform(0.1, 0.9, size=(k + 1, 2))
                d = np.linalg.norm(pts[:k, None] - pts[None, :k], axis=-1)
                far = np.linalg.norm(pts[:k] - pts[k], axis=-1).min() > 2 * o.success_radius
                if (d + np.eye(k) * 9).min() > min_sep and far:
                    break
            out[i] = pts
        return out

    def reset(
        self, env_ids: np.ndarray, task_ids: np.ndarray, init_state_ids: np.ndarray
    ) -> ObsBatch:
        env_ids = np.asarray(env_ids, np.int64)
        task_ids = np.asarray(task_ids, np.int64)
        init_state_ids = np.asarray(init_state_ids, np.int64)
        k = self.o.num_objects
        if ((task_ids < 0) | (task_ids >= k)).any():
            raise ValueError(f"task ids must be in [0, {k}), got {task_ids.tolist()}")
        if ((init_state_ids < 0) | (init_state_ids >= self.o.num_init_states)).any():
            raise ValueError(
                f"init state ids must be in [0, {self.o.num_init_states}), "
                f"got {init_state_ids.tolist()}"
            )
        layout = self._layouts[init_state_ids]
        self.obj_pos[env_ids] = layout[:, :k]
        self.grip[env_ids] = layout[:, k]
        self.closed[env_ids] = False
        self.target[env_ids] = task_ids
        self.task[env_ids] = task_ids
        self.t[env_ids] = 0
        self.active[env_ids] = True
        return self._observe(env_ids)

    def step(self, env_ids: np.ndarray, actions: np.ndarray) -> StepBatch:
        env_ids = np.asarray(env_ids, np.int64)
        a = np.asarray(actions, np.float32)
        if a.shape != (len(env_ids), 7):
            raise ValueError(f"actions must have shape ({len(env_ids)}, 7), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("actions contain NaN or infinity")
        if not self.active[env_ids].all():
            raise ValueError("step() called on an environment whose episode is over; reset it")
        a = np.clip(a, -1.0, 1.0)
        self.grip[env_ids] = np.clip(self.grip[env_ids] + a[:, :2] * self.o.move_scale, 0.0, 1.0)
        closed = a[:, 6] > 0
        self.closed[env_ids] = closed
        self.t[env_ids] += 1
        tgt = self.obj_pos[env_ids, self.target[env_ids]]
        dist = np.linalg.norm(self.grip[env_ids] - tgt, axis=-1)
        success = closed & (dist < self.o.success_radius)
        done = success | (self.t[env_ids] >= self.o.max_steps)
        self.active[env_ids[done]] = False
        return StepBatch(
            obs=self._observe(env_ids),
            reward=success.astype(np.float32),
            done=done,
            success=success,
        )

    def _observe(self, env_ids: np.ndarray) -> ObsBatch:
        s = self.o.image_size * self.o.antialias
        n = len(env_ids)
        img = np.full((n, s, s, 3), _BACKGROUND, np.uint8)
        h = self.o.block_size / 2
        pos = self.obj_pos[env_ids]
        for k in range(self.o.num_objects):
            mask = (np.abs(self._cx - pos[:, k, 0, None, None]) < h) & (
                np.abs(self._cy - pos[:, k, 1, None, None]) < h
            )
            img[mask] = self._colors[k]
        g = self.grip[env_ids]
        dx = np.abs(self._cx - g[:, 0, None, None])
        dy = np.abs(self._cy - g[:, 1, None, None])
        arm = 0.06
        line = 0.6 / self.o.image_size
        cross = ((dx < line) & (dy < arm)) | ((dy < line) & (dx < arm))
        closed = self.closed[env_ids]
        img[cross & closed[:, None, None]] = _GRIPPER_CLOSED
        img[cross & ~closed[:, None, None]] = _GRIPPER_OPEN
        if self.o.antialias > 1:
            f, out = self.o.antialias, self.o.image_size
            img = (
                img.reshape(n, out, f, out, f, 3)
                .mean(axis=(2, 4), dtype=np.float32)
                .round()
                .astype(np.uint8)
            )
        proprio = np.concatenate([g, closed[:, None].astype(np.float32)], axis=1).astype(np.float32)
        instr = [self._tasks[int(t)].instruction for t in self.task[env_ids]]
        return ObsBatch(images={"agentview": img}, proprio=proprio, instructions=instr)
