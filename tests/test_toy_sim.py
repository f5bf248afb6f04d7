from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dvla.backends.simulators.toy import COLORS, ToyOptions, ToySimulator
from dvla.data import StepBatch


def make(num_envs: int = 2, seed: int = 0, **options: Any) -> ToySimulator:
    return ToySimulator(ToyOptions(**options), num_envs, seed)


def ids(*xs: int) -> np.ndarray:
    return np.array(xs, np.int64)


def move_action(sim: ToySimulator, env: int, goal: np.ndarray, close: bool) -> np.ndarray:
    """One action moving env's gripper as far towards ``goal`` as a step allows."""
    a = np.zeros(7, np.float32)
    a[:2] = np.clip((goal - sim.grip[env]) / sim.o.move_scale, -1.0, 1.0)
    a[6] = 1.0 if close else -1.0
    return a


def drive_and_grasp(sim: ToySimulator, env: int, block: int) -> StepBatch:
    """Move to ``block`` with the gripper open, then close it; the last step's result."""
    goal = sim.obj_pos[env, block].copy()
    for _ in range(sim.o.max_steps - 1):
        if np.linalg.norm(sim.grip[env] - goal) < 1e-6:
            break
        step = sim.step(ids(env), move_action(sim, env, goal, close=False)[None])
        assert not step.done[0], "episode ended before the gripper arrived"
    assert np.linalg.norm(sim.grip[env] - goal) < 1e-5
    return sim.step(ids(env), move_action(sim, env, goal, close=True)[None])


# --------------------------------------------------------------------- determinism


def test_same_task_and_init_give_the_same_observation_across_instances() -> None:
    a = make(num_envs=3, seed=0)
    b = make(num_envs=2, seed=99)  # the run seed must not change the layouts
    oa = a.reset(ids(0, 1, 2), ids(0, 1, 2), ids(5, 6, 7))
    ob = b.reset(ids(1, 0), ids(2, 1), ids(7, 6))
    np.testing.assert_array_equal(oa.images["agentview"][2], ob.images["agentview"][0])
    np.testing.assert_array_equal(oa.images["agentview"][1], ob.images["agentview"][1])
    np.testing.assert_array_equal(oa.proprio[[2, 1]], ob.proprio)
    assert [oa.instructions[2], oa.instructions[1]] == ob.instructions
    np.testing.assert_array_equal(a.obj_pos[2], b.obj_pos[1])
    np.testing.assert_array_equal(a.grip[2], b.grip[1])


def test_layouts_are_stable_across_resets_and_steps() -> None:
    sim = make(num_envs=1)
    first = sim.reset(ids(0), ids(1), ids(3)).images["agentview"].copy()
    sim.step(ids(0), np.full((1, 7), 0.5, np.float32))
    again = sim.reset(ids(0), ids(1), ids(3)).images["agentview"]
    np.testing.assert_array_equal(first, again)


def test_steps_are_deterministic() -> None:
    a, b = make(num_envs=1, seed=1), make(num_envs=1, seed=2)
    a.reset(ids(0), ids(0), ids(0))
    b.reset(ids(0), ids(0), ids(0))
    rng = np.random.default_rng(0)
    for _ in range(5):
        act = rng.uniform(-1, 1, size=(1, 7)).astype(np.float32)
        sa, sb = a.step(ids(0), act), b.step(ids(0), act)
        np.testing.assert_array_equal(sa.obs.images["agentview"], sb.obs.images["agentview"])
        np.testing.assert_array_equal(sa.obs.proprio, sb.obs.proprio)
        assert sa.done.tolist() == sb.done.tolist()


def test_layout_seed_changes_layouts() -> None:
    a, b = make(num_envs=1), make(num_envs=1, layout_seed=4321)
    a.reset(ids(0), ids(0), ids(0))
    b.reset(ids(0), ids(0), ids(0))
    assert not np.allclose(a.obj_pos[0], b.obj_pos[0])


def test_spec_and_instructions() -> None:
    sim = make(num_objects=4, max_steps=9, image_size=24, num_init_states=7)
    spec = sim.spec
    assert spec.cameras == {"agentview": (24, 24)}
    assert spec.action_dim == 7
    assert spec.proprio_dim == 3
    assert spec.max_episode_steps == 9
    assert [t.instruction for t in spec.tasks] == [
        f"pick up the {c} block" for c in list(COLORS)[:4]
    ]
    assert all(t.num_init_states == 7 for t in spec.tasks)
    obs = sim.reset(ids(0, 1), ids(3, 0), ids(0, 6))
    assert obs.instructions == ["pick up the yellow block", "pick up the red block"]
    assert obs.proprio.dtype == np.float32
    assert obs.proprio[:, 2].tolist() == [0.0, 0.0]  # gripper open after reset


# --------------------------------------------------------------------- success


@pytest.mark.parametrize("task", [0, 1, 2])
def test_grasping_the_named_block_succeeds(task: int) -> None:
    sim = make(num_envs=1)
    sim.reset(ids(0), ids(task), ids(4))
    step = drive_and_grasp(sim, 0, task)
    assert step.success.tolist() == [True]
    assert step.done.tolist() == [True]
    assert step.reward.tolist() == [1.0]


@pytest.mark.parametrize("task", [0, 1, 2])
def test_grasping_another_block_fails(task: int) -> None:
    sim = make(num_envs=1)
    sim.reset(ids(0), ids(task), ids(4))
    other = (task + 1) % 3
    step = drive_and_grasp(sim, 0, other)
    assert step.success.tolist() == [False]
    assert step.reward.tolist() == [0.0]


def test_the_instruction_decides_success_for_identical_scenes_and_actions() -> None:
    sim = make(num_envs=2)
    sim.reset(ids(0, 1), ids(0, 1), ids(2, 2))
    # Make env 1's scene identical to env 0's: only the instruction differs.
    sim.obj_pos[1] = sim.obj_pos[0]
    sim.grip[1] = sim.grip[0]
    goal = sim.obj_pos[0, 0].copy()
    for _ in range(sim.o.max_steps - 1):
        if np.linalg.norm(sim.grip[0] - goal) < 1e-6:
            break
        a = move_action(sim, 0, goal, close=False)
        step = sim.step(ids(0, 1), np.stack([a, a]))
    a = move_action(sim, 0, goal, close=True)
    step = sim.step(ids(0, 1), np.stack([a, a]))
    assert step.obs.instructions == ["pick up the red block", "pick up the green block"]
    np.testing.assert_array_equal(sim.grip[0], sim.grip[1])
    assert step.success.tolist() == [True, False]
    assert step.done.tolist() == [True, False]


def test_closing_far_from_the_block_fails() -> None:
    sim = make(num_envs=1)
    sim.reset(ids(0), ids(0), ids(0))
    # The start is always > 3 success radii from the named block.
    assert np.linalg.norm(sim.grip[0] - sim.obj_pos[0, 0]) > 3 * sim.o.success_radius
    close = np.zeros((1, 7), np.float32)
    close[0, 6] = 1.0
    step = sim.step(ids(0), close)
    assert step.success.tolist() == [False]
    assert step.obs.proprio[0, 2] == 1.0  # gripper reported closed


# --------------------------------------------------------------------- episode end


def test_episode_ends_at_max_steps() -> None:
    sim = make(num_envs=2, max_steps=5)
    sim.reset(ids(0, 1), ids(0, 1), ids(0, 0))
    idle = np.zeros((2, 7), np.float32)
    idle[:, 6] = -1.0
    for t in range(1, 6):
        step = sim.step(ids(0, 1), idle)
        assert step.done.tolist() == [t == 5, t == 5]
        assert step.success.tolist() == [False, False]
    with pytest.raises(ValueError, match="episode is over"):
        sim.step(ids(0), idle[:1])
    sim.reset(ids(0), ids(0), ids(0))  # a reset makes it steppable again
    assert sim.step(ids(0), idle[:1]).done.tolist() == [False]


def test_envs_step_independently() -> None:
    sim = make(num_envs=3, max_steps=2)
    sim.reset(ids(0, 1, 2), ids(0, 0, 0), ids(0, 0, 0))
    idle = np.zeros((1, 7), np.float32)
    sim.step(ids(1), idle)
    assert sim.step(ids(1), idle).done.tolist() == [True]
    assert sim.step(ids(0, 2), np.zeros((2, 7), np.float32)).done.tolist() == [False, False]


# --------------------------------------------------------------------- validation


@pytest.mark.parametrize("shape", [(1, 6), (2, 7), (7,), (1, 8)])
def test_invalid_action_shape_raises(shape: tuple[int, ...]) -> None:
    sim = make(num_envs=2)
    sim.reset(ids(0, 1), ids(0, 0), ids(0, 0))
    with pytest.raises(ValueError, match="actions must have shape"):
        sim.step(ids(0), np.zeros(shape, np.float32))


def test_non_finite_action_raises() -> None:
    sim = make(num_envs=1)
    sim.reset(ids(0), ids(0), ids(0))
    bad = np.zeros((1, 7), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sim.step(ids(0), bad)


def test_invalid_task_or_init_raises() -> None:
    sim = make(num_envs=1, num_init_states=5)
    with pytest.raises(ValueError, match="task ids"):
        sim.reset(ids(0), ids(3), ids(0))
    with pytest.raises(ValueError, match="init state ids"):
        sim.reset(ids(0), ids(0), ids(5))


def test_out_of_range_actions_are_clipped() -> None:
    sim = make(num_envs=2)
    sim.reset(ids(0, 1), ids(0, 0), ids(1, 1))
    big = np.zeros((1, 7), np.float32)
    big[0, :2] = 50.0
    one = big.copy()
    one[0, :2] = 1.0
    sim.step(ids(0), big)
    sim.step(ids(1), one)
    np.testing.assert_array_equal(sim.grip[0], sim.grip[1])


# --------------------------------------------------------------------- rendering


def test_rendering_shows_every_block_in_its_colour_where_it_lies() -> None:
    sim = make(num_envs=1, image_size=32, num_objects=3)
    img = sim.reset(ids(0), ids(0), ids(0)).images["agentview"][0]
    s = sim.o.image_size
    assert img.shape == (s, s, 3) and img.dtype == np.uint8
    for k, name in enumerate(list(COLORS)[:3]):
        mask = (img == np.array(COLORS[name], np.uint8)).all(-1)
        assert mask.sum() >= 4, f"{name} block not drawn"
        rows, cols = np.nonzero(mask)
        x, y = sim.obj_pos[0, k]
        # The drawn pixels lie around the block's position (x -> columns, y -> rows).
        assert abs((cols.mean() + 0.5) / s - x) < sim.o.block_size
        assert abs((rows.mean() + 0.5) / s - y) < sim.o.block_size
    unused = list(COLORS)[3]
    assert not (img == np.array(COLORS[unused], np.uint8)).all(-1).any()


def test_rendering_shows_the_gripper_state() -> None:
    sim = make(num_envs=1)
    img = sim.reset(ids(0), ids(0), ids(0)).images["agentview"][0]
    assert (img == 255).all(-1).any()  # open gripper: white cross
    close = np.zeros((1, 7), np.float32)
    close[0, 6] = 1.0
    img = sim.step(ids(0), close).obs.images["agentview"][0]
    assert not (img == 255).all(-1).any()
    assert (img == 150).all(-1).any()  # closed gripper: grey cross


def test_the_image_follows_the_gripper() -> None:
    sim = make(num_envs=1)
    before = sim.reset(ids(0), ids(0), ids(0)).images["agentview"][0]
    move = np.zeros((1, 7), np.float32)
    move[0, 0] = 1.0 if sim.grip[0, 0] < 0.5 else -1.0
    after = sim.step(ids(0), move).obs.images["agentview"][0]
    assert not np.array_equal(before, after)
