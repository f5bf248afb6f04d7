"""The libero simulator: real LIBERO environments (marked ``libero``) and its plumbing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from dvla.backends.simulators import libero_render
from dvla.backends.simulators.libero import LiberoOptions, LiberoSimulator
from dvla.backends.simulators.libero_env import _pack, _unpack, to_libero_action
from dvla.data import ActionBatch, StepBatch
from dvla.errors import SimulatorError
from dvla.pipeline.sample import EnvShard, EpisodeSource
from dvla.testing.fakes import FakeSimulator, FakeSimulatorOptions

SMALL = {"task_ids": [0, 1], "resolution": 64, "render_quality": "fast", "settle_steps": 1}


@pytest.fixture(scope="module")
def sim() -> Iterator[LiberoSimulator]:
    """Two real libero_spatial environments, shared by the tests of this module."""
    pytest.importorskip("libero")
    s = LiberoSimulator(LiberoOptions(**SMALL, max_steps=4), 2, 0)  # type: ignore[arg-type]
    try:
        yield s
    finally:
        s.close()


def _zeros(n: int) -> ActionBatch:
    return ActionBatch(
        np.zeros((n, 7), np.float32), np.zeros((n, 7), np.int64), np.zeros((n, 7), np.float32), 0
    )


@pytest.mark.libero
def test_reset_and_step_a_real_task(sim: LiberoSimulator) -> None:
    spec = sim.spec
    assert spec.cameras == {"agentview": (64, 64), "wrist": (64, 64)}
    assert spec.action_dim == 7 and spec.proprio_dim == 9 and len(spec.tasks) == 2
    assert spec.tasks[0].num_init_states == 50
    assert "black bowl" in spec.tasks[0].instruction
    obs = sim.reset(np.array([0, 1]), np.array([0, 1]), np.array([0, 5]))
    assert obs.instructions == [spec.tasks[0].instruction, spec.tasks[1].instruction]
    for cam in ("agentview", "wrist"):
        img = obs.images[cam]
        assert img.shape == (2, 64, 64, 3) and img.dtype == np.uint8
        assert img.std() > 10  # a rendered scene, not a blank frame
    # Two tasks have different scenes, so their first frames differ.
    assert np.abs(obs.images["agentview"][0].astype(int) - obs.images["agentview"][1]).mean() > 1
    step = sim.step(np.array([0, 1]), np.zeros((2, 7), np.float32))
    assert step.obs.proprio.shape == (2, 9) and np.isfinite(step.obs.proprio).all()
    assert not step.done.any() and not step.success.any()
    assert step.broken is not None and not step.broken.any()


@pytest.mark.libero
def test_a_scripted_episode_ends_at_max_steps(sim: LiberoSimulator) -> None:
    source = EpisodeSource([t.num_init_states for t in sim.spec.tasks], 2, 0, limited=True)
    source.allow(1)
    shard = EnvShard("s", sim, "libero", source)
    shard.refill()
    finished = []
    while shard.has_active:
        done, _ = shard.advance(_zeros(len(shard.active_ids)))
        finished += done
    assert [t.length for t in finished] == [4, 4]
    assert not any(t.success for t in finished) and all(t.rewards.sum() == 0 for t in finished)
    assert finished[0].group_id == finished[1].group_id  # one task and state per group
    assert finished[0].init_state_id == finished[1].init_state_id


@pytest.mark.libero
def test_a_killed_environment_process_is_replaced_and_its_episode_rerun(
    sim: LiberoSimulator,
) -> None:
    source = EpisodeSource([t.num_init_states for t in sim.spec.tasks], 2, 1, limited=True)
    source.allow(1)
    shard = EnvShard("k", sim, "libero", source)
    shard.refill()
    before = sim.restarts
    shard.advance(_zeros(2))
    sim.kill_env(1)
    finished = []
    while shard.has_active:
        done, _ = shard.advance(_zeros(len(shard.active_ids)))
        finished += done
    assert sim.restarts == before + 1 and shard.broken == 1
    # The broken episode ran again from its start: full length, same group.
    assert sorted(t.length for t in finished) == [4, 4]
    assert len({t.group_id for t in finished}) == 1


@pytest.mark.libero
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_success_predicate_is_libero_s_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step reports success exactly when LIBERO's check_success says so.

    Runs the environment in this process (as its own process would) to watch the call.
    """
    from dvla.backends.simulators.libero_env import _Child

    for key, value in libero_render.gl_env(libero_render.choose_backend()).items():
        monkeypatch.setenv(key, value)
    child = _Child(
        {
            "suite": "libero_spatial",
            "cameras": ["agentview"],
            "resolution": 32,
            "render_quality": "fast",
            "action_repeat": 1,
            "settle_steps": 0,
            "seed": 0,
        }
    )
    try:
        child.reset(0, 0)
        real = child.env.check_success
        calls: list[bool] = []

        def spy() -> bool:
            calls.append(bool(real()))  # the real predicate, on the real scene
            return len(calls) >= 2

        child.env.check_success = spy
        first = child.step(np.zeros(7, np.float32))
        second = child.step(np.zeros(7, np.float32))
        assert calls == [False, False]  # at its start the task is not done
        assert first["success"] is False and first["reward"] == 0.0
        assert second["success"] is True and second["reward"] == 1.0
    finally:
        if child.env is not None:
            child.env.close()


# ------------------------------------------------------------------ no LIBERO needed
def test_policy_actions_map_onto_libero_s_controller() -> None:
    out = to_libero_action(np.array([0.5, -2.0, 0.1, 0, 0, 0.3, 0.2], np.float32))
    assert out.tolist() == [0.5, -1.0, pytest.approx(0.1), 0, 0, pytest.approx(0.3), 1.0]
    assert to_libero_action(np.zeros(7))[6] == -1.0  # zero opens the gripper


def test_env_messages_round_trip_without_pickle() -> None:
    msg = {"images": {"agentview": np.arange(12, dtype=np.uint8).reshape(2, 2, 3)}, "r": 1.0}
    body = _pack(msg)[4:]
    back = _unpack(body)
    assert np.array_equal(back["images"]["agentview"], msg["images"]["agentview"])
    with pytest.raises(TypeError):
        _pack({"x": object()})


def test_no_working_renderer_names_the_system_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.setattr(libero_render, "_works", lambda backend: "cannot open display")
    libero_render.choose_backend.cache_clear()
    try:
        with pytest.raises(SimulatorError) as err:
            libero_render.choose_backend()
    finally:
        libero_render.choose_backend.cache_clear()
    msg = str(err.value)
    assert "libosmesa6" in msg and "libegl1" in msg and "\n" not in msg


def test_mujoco_gl_overrides_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    libero_render.choose_backend.cache_clear()
    try:
        assert libero_render.choose_backend() == "osmesa"
    finally:
        libero_render.choose_backend.cache_clear()


def test_environments_that_cannot_fit_in_memory_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dvla.backends.simulators.libero as lib

    monkeypatch.setattr(lib, "available_memory_gb", lambda: 7.5)
    with pytest.raises(SimulatorError, match=r"8 environments need about 16 GB .* 7\.5 GB"):
        LiberoSimulator(LiberoOptions(), 8, 0)  # type: ignore[call-arg]


class _BreaksOnce(FakeSimulator):
    """Reports environment 1 broken on its second step, once."""

    def step(self, env_ids: np.ndarray, actions: np.ndarray) -> StepBatch:
        out = super().step(env_ids, actions)
        broken = np.zeros(len(env_ids), bool)
        if self.step_calls == 2 and 1 in env_ids:
            broken[list(env_ids).index(1)] = True
        out.broken = broken
        return out


def test_the_sample_lane_reruns_an_episode_its_simulator_broke() -> None:
    opts: Any = FakeSimulatorOptions(episode_length=3)
    fake = _BreaksOnce(opts, 2, 0)
    source = EpisodeSource([4, 4], 2, 0, limited=True)
    source.allow(1)
    shard = EnvShard("f", fake, "fake", source)
    shard.refill()
    finished = []
    while shard.has_active:
        n = len(shard.active_ids)
        done, _ = shard.advance(
            ActionBatch(
                np.zeros((n, 2), np.float32), np.zeros((n, 2), np.int64),
                np.zeros((n, 2), np.float32), 0,
            )
        )  # fmt: skip
        finished += done
    assert shard.broken == 1 and fake.reset_calls == 2
    assert sorted(t.length for t in finished) == [3, 3]  # the rerun is whole
    assert len({t.group_id for t in finished}) == 1


def test_upstream_libero_gets_its_config_in_a_cache_folder(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.machinery
    import importlib.metadata
    import os

    import yaml

    def missing(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    pkg = tmp_path / "site" / "libero"
    (pkg / "libero").mkdir(parents=True)
    spec = importlib.machinery.ModuleSpec("libero", None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    monkeypatch.delenv("LIBERO_CONFIG_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(libero_render.importlib.metadata, "distribution", missing)
    monkeypatch.setattr(libero_render.importlib.util, "find_spec", lambda name: spec)
    try:
        folder = libero_render.ensure_libero_config()
        set_to = os.environ.get("LIBERO_CONFIG_PATH")
    finally:
        os.environ.pop("LIBERO_CONFIG_PATH", None)  # it was unset (delenv above)
    assert set_to == folder
    assert folder == str(tmp_path / "cache" / "dvla" / "libero")
    paths = yaml.safe_load((tmp_path / "cache" / "dvla" / "libero" / "config.yaml").read_text())
    assert paths["bddl_files"] == str(pkg / "libero" / "bddl_files")
    assert set(paths) == {"benchmark_root", "bddl_files", "init_states", "datasets", "assets"}
    assert not (tmp_path / "home").exists()  # nothing written to the user's home
