"""The dvla-gymnasium plugin: the adapter's mapping, its errors, and a run through dvla.

Needs the plugin installed (``pip install -e plugins/dvla-gymnasium``): the entry point
is what dvla finds it by, and what ``dvla plugins`` lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from dvla import registry
from dvla.cli import main
from dvla.config import BackendSection
from dvla.errors import ConfigError, SimulatorError
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from dvla_gymnasium import ENV_ID, ColorReachEnv
from dvla_gymnasium.simulator import GymnasiumOptions, GymnasiumSimulator, action_map

PLUGIN = Path(__file__).resolve().parents[1]
CONFIG = PLUGIN / "configs" / "color_reach.yaml"
SPACES_ID = "dvla_gymnasium_test/Spaces-v0"


class SpacesEnv(gym.Env[Any, Any]):
    """An environment with whatever spaces a test gives it, to reach the adapter's checks."""

    def __init__(
        self, observation_space: spaces.Space[Any], action_space: spaces.Space[Any]
    ) -> None:
        self.observation_space = observation_space
        self.action_space = action_space

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        return self.observation_space.sample(), 0.0, False, False, {}


@pytest.fixture(scope="module", autouse=True)
def spaces_env() -> Iterator[None]:
    gym.register(id=SPACES_ID, entry_point=f"{__name__}:SpacesEnv")  # no time limit on purpose
    yield
    del gym.registry[SPACES_ID]


def options(**kw: Any) -> GymnasiumOptions:
    base: dict[str, Any] = {"env_id": ENV_ID, "instruction": "reach the red square"}
    return GymnasiumOptions.model_validate(base | kw)


def make(num_envs: int = 2, seed: int = 0, **kw: Any) -> GymnasiumSimulator:
    return GymnasiumSimulator(options(**kw), num_envs, seed)


def unwrapped(sim: GymnasiumSimulator, i: int) -> ColorReachEnv:
    env = sim.envs[i].unwrapped
    assert isinstance(env, ColorReachEnv)
    return env


def cursor(sim: GymnasiumSimulator, i: int) -> np.ndarray:
    return unwrapped(sim, i).cursor.copy()


IMAGE = spaces.Box(0, 255, (8, 8, 3), np.uint8)


# --------------------------------------------------------------------------- mapping
def test_spec_shapes_and_ranges() -> None:
    sim = make(
        3,
        env_kwargs={"size": 24, "num_targets": 2},
        instruction=None,
        instructions=["reach the red square", "reach the blue square"],
        reset_options=[{"target": 0}, {"target": 1}],
        camera="front",
    )
    try:
        spec = sim.spec
        assert spec.cameras == {"front": (24, 24)}
        assert (spec.action_dim, spec.proprio_dim) == (2, 0)
        assert spec.max_episode_steps == 20  # the registered TimeLimit
        assert [t.instruction for t in spec.tasks] == [
            "reach the red square",
            "reach the blue square",
        ]
        assert GymnasiumSimulator.describe(sim.o) == spec
        ids = np.array([0, 1, 2])
        obs = sim.reset(ids, np.array([0, 1, 1]), np.array([0, 0, 3]))
        img = obs.images["front"]
        assert img.shape == (3, 24, 24, 3) and img.dtype == np.uint8
        assert obs.proprio.shape == (3, 0) and obs.proprio.dtype == np.float32
        assert obs.instructions == [
            "reach the red square",
            "reach the blue square",
            "reach the blue square",
        ]
        # The per-task reset options reached the environments.
        targets = [unwrapped(sim, i).target for i in range(3)]
        assert targets == [0, 1, 1]
        step = sim.step(ids[1:], np.zeros((2, 2), np.float32))
        assert step.obs.images["front"].shape == (2, 24, 24, 3)
        assert step.reward.dtype == np.float32 and step.reward.shape == (2,)
        assert step.done.dtype == bool and step.success.dtype == bool
        assert not step.done.any()
        with pytest.raises(ValueError, match="shape"):
            sim.step(ids, np.zeros((3, 7), np.float32))
        with pytest.raises(ValueError, match="task ids"):
            sim.reset(ids[:1], np.array([2]), np.array([0]))
        with pytest.raises(ValueError, match="init state ids"):
            sim.reset(ids[:1], np.array([0]), np.array([50]))
    finally:
        sim.close()


def test_dict_observations_give_image_and_proprio() -> None:
    sim = make(2, env_kwargs={"dict_obs": True}, proprio_key="cursor")
    try:
        assert sim.spec.proprio_dim == 2 and sim.layout.image_key == "image"
        obs = sim.reset(np.arange(2), np.zeros(2, np.int64), np.array([4, 5]))
        np.testing.assert_array_equal(obs.proprio, np.stack([cursor(sim, 0), cursor(sim, 1)]))
        assert obs.images["agentview"].shape == (2, 32, 32, 3)
    finally:
        sim.close()


def test_init_state_is_a_reset_seed_independent_of_run_seed_and_shard() -> None:
    a, b = make(2, seed=0, reset_seed=7), make(3, seed=99, reset_seed=7)
    try:
        oa = a.reset(np.array([0, 1]), np.array([0, 0]), np.array([3, 4]))
        ob = b.reset(np.array([2]), np.array([0]), np.array([3]))
        # Same (task, init state): identical start, whichever simulator and env slot.
        np.testing.assert_array_equal(oa.images["agentview"][0], ob.images["agentview"][0])
        np.testing.assert_array_equal(cursor(a, 0), cursor(b, 2))
        assert not np.array_equal(oa.images["agentview"][0], oa.images["agentview"][1])
        # The documented seed: reset_seed + task * num_init_states + init state.
        env = gym.make(ENV_ID)
        ref, _ = env.reset(seed=7 + 0 * 50 + 4)
        env.close()
        np.testing.assert_array_equal(ref, oa.images["agentview"][1])
        # The same actions from the same start give the same episode.
        act = np.array([[0.5, -0.25]], np.float32)
        sa, sb = a.step(np.array([0]), act), b.step(np.array([2]), act)
        np.testing.assert_array_equal(sa.obs.images["agentview"], sb.obs.images["agentview"])
    finally:
        a.close()
        b.close()


def test_box_actions_scale_onto_the_bounds() -> None:
    m = action_map(spaces.Box(np.array([0.0, -2.0]), np.array([1.0, 2.0]), dtype=np.float64))
    assert m.dim == 2
    np.testing.assert_allclose(m.convert(np.array([-1, -1], np.float32)), [0.0, -2.0])
    np.testing.assert_allclose(m.convert(np.array([1, 1], np.float32)), [1.0, 2.0])
    np.testing.assert_allclose(m.convert(np.array([0, 0.5], np.float32)), [0.5, 1.0])
    out = m.convert(np.array([3, -3], np.float32))  # clipped, never outside the space
    np.testing.assert_allclose(out, [1.0, -2.0])
    assert out.dtype == np.float64
    m2 = action_map(spaces.Box(-1, 1, (2, 2), np.float32))
    assert m2.dim == 4 and m2.convert(np.zeros(4, np.float32)).shape == (2, 2)
    # Through the adapter: a full right action moves the cursor one step_size right.
    sim = make(1)
    try:
        sim.reset(np.array([0]), np.array([0]), np.array([1]))
        before = cursor(sim, 0)
        sim.step(np.array([0]), np.array([[0.5, 0.0]], np.float32))
        moved = cursor(sim, 0) - before
        assert moved[1] == 0.0
        assert moved[0] == pytest.approx(min(0.1, 1.0 - before[0]), abs=1e-6)
    finally:
        sim.close()


def test_discrete_actions_bin_the_first_dimension() -> None:
    m = action_map(spaces.Discrete(5))
    assert m.dim == 1
    values = [-1, -0.65, -0.55, -0.1, 0.1, 0.35, 0.45, 0.99, 1]  # five equal bins of [-1, 1]
    assert [m.convert(np.array([v], np.float32)) for v in values] == [0, 0, 1, 2, 2, 3, 3, 4, 4]
    shifted = action_map(spaces.Discrete(3, start=-1))
    assert [shifted.convert(np.array([v], np.float32)) for v in (-1, 0, 1)] == [-1, 0, 1]
    md = action_map(spaces.MultiDiscrete([2, 3]))
    assert md.dim == 2
    np.testing.assert_array_equal(md.convert(np.array([-1.0, 1.0], np.float32)), [0, 2])
    # Through the adapter: Discrete(5) moves are stay, right, left, down, up.
    sim = make(1, env_kwargs={"discrete": True})
    try:
        assert sim.spec.action_dim == 1
        sim.reset(np.array([0]), np.array([0]), np.array([2]))
        before = cursor(sim, 0)
        sim.step(np.array([0]), np.array([[-0.1]], np.float32))  # bin 2: left
        assert cursor(sim, 0)[0] == pytest.approx(max(0.0, before[0] - 0.2), abs=1e-6)
    finally:
        sim.close()


def test_success_ends_the_episode_and_time_limit_truncates() -> None:
    sim = make(2, max_steps=30)
    try:
        sim.reset(np.array([0, 1]), np.array([0, 0]), np.array([0, 1]))
        env = unwrapped(sim, 0)
        for _ in range(30):
            # Head for the target: the largest move the Box allows, clipped to it.
            delta = (env.targets[env.target] - env.cursor) / env.step_size
            act = np.clip(delta, -1, 1).astype(np.float32)[None]
            step = sim.step(np.array([0]), act)
            if step.done[0]:
                break
        assert step.done[0] and step.success[0] and step.reward[0] == 1.0
        with pytest.raises(ValueError, match="episode is over"):
            sim.step(np.array([0]), np.zeros((1, 2), np.float32))
        # Standing still never succeeds: the time limit ends the episode.
        dones = [sim.step(np.array([1]), np.zeros((1, 2), np.float32)) for _ in range(30)]
        assert [bool(s.done[0]) for s in dones] == [False] * 29 + [True]
        assert not dones[-1].success[0] and dones[-1].reward[0] == 0.0
    finally:
        sim.close()


# --------------------------------------------------------------------------- errors
def build(**kw: Any) -> tuple[Any, Any]:
    section = BackendSection.model_validate({"name": "gymnasium", **kw})
    return registry.build_options("simulator", section, "cfg.yaml")


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"env_id": "ColorReach-v9", "instruction": "x"}, "no Gymnasium environment"),
        ({"env_id": "dvla_gymnasium/ColorRech-v0", "instruction": "x"}, "did you mean"),
        ({"env_id": ENV_ID, "instruction": "x", "env_module": "no_such_mod"}, "cannot import"),
        ({"env_id": ENV_ID}, "exactly one of instruction"),
        ({"env_id": ENV_ID, "instruction": "x", "instructions": ["y"]}, "exactly one of"),
        ({"env_id": ENV_ID, "instructions": ["a", "b"], "reset_options": [{}]}, "one per"),
        ({"env_id": ENV_ID, "instruction": "x", "max_steps": 0}, "max_steps"),
        ({"env_id": ENV_ID, "instruction": "x", "bogus": 1}, "bogus: unknown key"),
    ],
)
def test_bad_options_are_one_line_config_errors(kw: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as err:
        build(**kw)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cfg.yaml: simulator")


def test_unknown_id_names_env_module() -> None:
    with pytest.raises(ConfigError) as err:
        build(env_id="my_pkg/Thing-v0", instruction="x")
    assert "set env_module" in str(err.value)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"env_id": "CartPole-v1"}, "not an H x W x 3 uint8 image"),
        ({"image_key": "image"}, "apply to Dict observation spaces"),
        ({"env_kwargs": {"dict_obs": True}, "image_key": "cursor"}, "is not an H x W x 3"),
        ({"env_kwargs": {"dict_obs": True}, "proprio_key": "nope"}, "is not a Box entry"),
        (
            {
                "env_id": SPACES_ID,
                "max_steps": 5,
                "env_kwargs": {
                    "observation_space": spaces.Dict({"a": IMAGE, "b": IMAGE}),
                    "action_space": spaces.Discrete(2),
                },
            },
            "2 H x W x 3 uint8 image entries",
        ),
        (
            {
                "env_id": SPACES_ID,
                "max_steps": 5,
                "env_kwargs": {
                    "observation_space": IMAGE,
                    "action_space": spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3))),
                },
            },
            "is not supported",
        ),
        (
            {
                "env_id": SPACES_ID,
                "max_steps": 5,
                "env_kwargs": {
                    "observation_space": IMAGE,
                    "action_space": spaces.Box(-np.inf, np.inf, (2,), np.float32),
                },
            },
            "unbounded",
        ),
        (
            {
                "env_id": SPACES_ID,
                "env_kwargs": {"observation_space": IMAGE, "action_space": spaces.Discrete(2)},
            },
            "registers no time limit; set max_steps",
        ),
    ],
)
def test_unusable_spaces_are_one_line_config_errors(kw: dict[str, Any], expected: str) -> None:
    o = options(**kw)
    with pytest.raises(ConfigError, match=expected) as err:
        GymnasiumSimulator.describe(o)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=expected):
        GymnasiumSimulator(o, 2, 0)


def test_bad_env_kwargs_are_one_line_simulator_errors() -> None:
    with pytest.raises(SimulatorError, match=r"gymnasium\.make.*num_targets must be in") as err:
        GymnasiumSimulator.describe(options(env_kwargs={"num_targets": 9}))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- gymnasium side
@pytest.mark.parametrize(
    "env_kwargs",
    [{}, {"discrete": True}, {"dict_obs": True, "num_targets": 3, "size": 16}],
    ids=["box", "discrete", "dict"],
)
def test_wrapped_environments_pass_gymnasiums_env_checker(env_kwargs: dict[str, Any]) -> None:
    sim = make(1, env_kwargs=env_kwargs)
    try:
        env = sim.envs[0]
        assert env.spec is not None and env.spec.id == ENV_ID
        # pytest turns any checker warning into an error (filterwarnings = error).
        check_env(env.unwrapped)
    finally:
        sim.close()


# --------------------------------------------------------------------------- dvla side
def test_dvla_plugins_lists_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    sims = lines[lines.index("dvla.simulators:") + 1 :]
    row = next(line.split() for line in sims if line.split()[0] == "gymnasium")
    assert row[1] == "dvla-gymnasium"
    assert row[3] == "(dvla_gymnasium.simulator:GymnasiumSimulator)"


def test_color_reach_config_runs_through_dvla(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tiny = [
        "--set", "run.max_iterations=2",
        "--set", "run.target_success=null",
        "--set", "run.eval_episodes=4",
        "--set", "run.max_wall_seconds=120",
        "--set", "pipeline.num_envs=8",
        "--set", "pipeline.groups_per_iteration=1",
        "--set", "algorithm.group_size=4",
    ]  # fmt: skip
    assert main(["run", str(CONFIG), "--run-dir", str(run_dir), *tiny]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = summary["accounting"]
    assert summary["iterations"] == 2
    assert acc["consumed"] > 0 and summary["env_steps"] > 0
    assert acc["produced"] == acc["consumed"] + acc["dropped_stale"] + acc["discarded"]
    per_task = summary["eval"]["per_task"]
    assert summary["eval"]["episodes"] == 4
    assert {t["instruction"] for t in per_task.values()} == {
        "reach the red square",
        "reach the blue square",
    }
