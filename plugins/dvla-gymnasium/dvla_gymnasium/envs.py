"""``dvla_gymnasium/ColorReach-v0``: a small Gymnasium environment with image observations.

It exists so the plugin can be tried and tested offline, without pygame, MuJoCo or a
download: a cursor (a white cross) moves on a dark square on which ``num_targets``
coloured squares lie, and the episode succeeds when the cursor reaches the target chosen
at reset (``options={"target": k}``, default 0). Several targets make the instruction
matter: the scene looks the same whichever target counts, as in dvla's toy simulator.

Observations are ``size x size x 3`` uint8 images (or, with ``dict_obs=True``, a
``Dict`` of that image under ``"image"`` and the cursor position under ``"cursor"``, to
show ``image_key`` and ``proprio_key``). Actions are ``Box(-1, 1, (2,))`` moves of the
cursor (or, with ``discrete=True``, ``Discrete(5)``: stay, right, left, down, up). The
reward is 1 on the step that reaches the target, which also terminates the episode, and
``info["is_success"]`` says whether it did; the registered time limit is 20 steps.
"""

from __future__ import annotations

from typing import Any, cast

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from numpy.typing import NDArray

ENV_ID = "dvla_gymnasium/ColorReach-v0"

#: Target colours in order: ``options={"target": k}`` picks the k-th.
COLORS: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40),  # red
    (50, 80, 230),  # blue
    (40, 200, 60),  # green
    (230, 210, 40),  # yellow
)
COLOR_NAMES: tuple[str, ...] = ("red", "blue", "green", "yellow")
#: Cursor moves of the discrete action space, ``(dx, dy)`` in image axes.
MOVES: NDArray[np.float32] = np.array([(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)], dtype=np.float32)
_BACKGROUND = 40
_CURSOR = (255, 255, 255)
_TARGET_SIDE = 0.16

Obs = NDArray[np.uint8] | dict[str, NDArray[Any]]


class ColorReachEnv(gym.Env[Obs, Any]):
    """Move the cursor onto the target square; see the module docstring for the rules."""

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        render_mode: str | None = None,
        size: int = 32,
        num_targets: int = 1,
        discrete: bool = False,
        dict_obs: bool = False,
        step_size: float = 0.2,
        radius: float = 0.12,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if not 8 <= size <= 256:
            raise ValueError(f"size must be in [8, 256], got {size}")
        if not 1 <= num_targets <= len(COLORS):
            raise ValueError(f"num_targets must be in [1, {len(COLORS)}], got {num_targets}")
        if not (0 < step_size <= 1 and 0 < radius < 0.5):
            raise ValueError(
                f"need 0 < step_size <= 1 and 0 < radius < 0.5, got {step_size}, {radius}"
            )
        self.render_mode = render_mode
        self.size = size
        self.num_targets = num_targets
        self.discrete = discrete
        self.dict_obs = dict_obs
        self.step_size = step_size
        self.radius = radius
        image = spaces.Box(0, 255, (size, size, 3), np.uint8)
        if dict_obs:
            cursor = spaces.Box(0.0, 1.0, (2,), np.float32)
            self.observation_space = cast(
                spaces.Space[Obs], spaces.Dict({"image": image, "cursor": cursor})
            )
        else:
            self.observation_space = cast(spaces.Space[Obs], image)
        self.action_space: spaces.Space[Any] = (
            spaces.Discrete(len(MOVES)) if discrete else spaces.Box(-1.0, 1.0, (2,), np.float32)
        )
        self.cursor = np.zeros(2, np.float32)
        self.targets = np.zeros((num_targets, 2), np.float32)
        self.target = 0
        centers = (np.arange(size, dtype=np.float32) + 0.5) / size
        self._cx = centers[None, :]  # columns -> x
        self._cy = centers[:, None]  # rows -> y

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Obs, dict[str, Any]]:
        """Place targets and cursor from ``seed``; ``options["target"]`` picks the goal."""
        super().reset(seed=seed)
        target = (options or {}).get("target", 0)
        if isinstance(target, str):
            if target not in COLOR_NAMES[: self.num_targets]:
                raise ValueError(f"unknown target {target!r}")
            target = COLOR_NAMES.index(target)
        if not (isinstance(target, int) and 0 <= target < self.num_targets):
            raise ValueError(f"options['target'] must be in [0, {self.num_targets}), got {target}")
        self.target = target
        rng = self.np_random
        # Targets apart from each other, cursor away from all of them, so no episode is
        # won at reset and the colours never overlap.
        while True:
            pts = rng.uniform(0.15, 0.85, size=(self.num_targets + 1, 2)).astype(np.float32)
            tg, cur = pts[:-1], pts[-1]
            apart = np.linalg.norm(tg[:, None] - tg[None], axis=-1) + np.eye(len(tg)) * 9
            if apart.min() > 2 * _TARGET_SIDE and np.linalg.norm(tg - cur, axis=-1).min() > (
                2 * self.radius
            ):
                break
        self.targets = tg
        self.cursor = cur.copy()
        return self._obs(), self._info()

    def step(self, action: Any) -> tuple[Obs, float, bool, bool, dict[str, Any]]:
        """Move the cursor; reward 1 and terminate on reaching the target."""
        if self.discrete:
            move = MOVES[int(action)]
        else:
            move = np.clip(np.asarray(action, np.float32).reshape(2), -1.0, 1.0)
        self.cursor = np.clip(self.cursor + move * self.step_size, 0.0, 1.0).astype(np.float32)
        reached = self._distance() < self.radius
        return self._obs(), float(reached), bool(reached), False, self._info()

    def render(self) -> NDArray[np.uint8] | None:
        """The observation image in ``rgb_array`` mode, nothing otherwise."""
        return self._image() if self.render_mode == "rgb_array" else None

    def _distance(self) -> float:
        return float(np.linalg.norm(self.cursor - self.targets[self.target]))

    def _info(self) -> dict[str, Any]:
        distance = self._distance()
        return {"is_success": distance < self.radius, "distance": distance}

    def _image(self) -> NDArray[np.uint8]:
        img = np.full((self.size, self.size, 3), _BACKGROUND, np.uint8)
        h = _TARGET_SIDE / 2
        for k, (x, y) in enumerate(self.targets):
            mask = (np.abs(self._cx - x) < h) & (np.abs(self._cy - y) < h)
            img[mask] = COLORS[k]
        dx, dy = np.abs(self._cx - self.cursor[0]), np.abs(self._cy - self.cursor[1])
        arm, line = 0.06, 0.6 / self.size
        img[((dx < line) & (dy < arm)) | ((dy < line) & (dx < arm))] = _CURSOR
        return img

    def _obs(self) -> Obs:
        # Fresh arrays every call: callers may keep observations across steps.
        if self.dict_obs:
            return {"image": self._image(), "cursor": self.cursor.copy()}
        return self._image()


def register() -> None:
    """Register ``ColorReach-v0`` with Gymnasium once (importing the package does this)."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point=f"{__name__}:ColorReachEnv", max_episode_steps=20)
