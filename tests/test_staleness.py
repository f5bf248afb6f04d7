"""Bounded staleness: the learner's drop, the samplers' gate, and what a run reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dvla.config import load_config
from dvla.data import TrajectoryGroup
from dvla.pipeline.coordinator import Coordinator
from dvla.pipeline.gate import StalenessGate
from dvla.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def test_gate_caps_open_groups_at_a_batch_per_allowed_version() -> None:
    versions = {"learner": 0, "acting": 0}
    gate = StalenessGate(3, 1, lambda: versions["learner"], lambda: versions["acting"])
    assert [gate.try_start() for _ in range(7)] == [True] * 6 + [False]
    assert gate.status() == {"open_groups": 6, "capacity": 6, "held": 1}
    gate.finish(2)
    assert gate.would_allow() and gate.try_start() and gate.try_start()
    assert not gate.try_start()


def test_gate_waits_for_the_acting_policy_to_catch_up() -> None:
    versions = {"learner": 3, "acting": 1}
    gate = StalenessGate(4, 1, lambda: versions["learner"], lambda: versions["acting"])
    assert not gate.try_start()  # acting lags by 2 > max_staleness 1
    versions["acting"] = 2
    assert gate.try_start()
    gate.finish(5)  # more than open: never negative
    assert gate.open_groups == 0


def _coordinator(tmp_path: Path, *sets: tuple[str, Any]) -> Coordinator:
    overrides = {
        "run.max_iterations": 25,
        "run.target_success": None,
        "run.eval_episodes": 0,
        "run.max_wall_seconds": 120,
        "pipeline.num_envs": 32,
        "pipeline.groups_per_iteration": 2,
        "pipeline.queue_groups": 4,
        "checkpoint.final": False,
        "cluster.http": False,
        **dict(sets),
    }
    cfg = load_config(ROOT / "configs" / "toy.yaml", overrides)
    return Coordinator(cfg, RunDir(tmp_path / "run"))


def _run(co: Coordinator) -> Any:
    try:
        return co.run()
    finally:
        co.rundir.close()


def _spy(co: Coordinator) -> list[tuple[int, list[np.ndarray]]]:
    """Record, for every update, the learner version and each step's acting version."""
    seen: list[tuple[int, list[np.ndarray]]] = []
    update = co.algorithm.update

    def spy(groups: list[TrajectoryGroup], learner_version: int, *a: Any) -> dict[str, float]:
        # Copies: a trajectory's arrays are ring slots, reused once the update released them.
        seen.append((learner_version, [t.versions.copy() for g in groups for t in g.trajectories]))
        return update(groups, learner_version, *a)

    co.algorithm.update = spy  # type: ignore[method-assign]
    return seen


def test_max_staleness_zero_produces_and_trains_on_only_on_policy_data(tmp_path: Path) -> None:
    co = _coordinator(tmp_path, ("pipeline.max_staleness", 0))
    seen = _spy(co)
    summary = _run(co)
    assert summary.iterations == 25 and len(seen) == 25
    for version, step_versions in seen:
        # Every action of every trajectory the learner used came from its own weights.
        assert all((v == version).all() for v in step_versions)
    acc = summary.accounting
    # The gate kept samplers from producing anything the learner had to drop.
    assert acc["dropped_stale"] == 0
    assert acc["produced"] == acc["consumed"] + acc["discarded"]
    assert summary.staleness == {"0": 50}
    assert summary.staleness_gate["held"] > 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["staleness_hist"] == {"0": 2} and r["on_policy_share"] == 1.0 for r in rows)
    assert all(r["ess"] == pytest.approx(1.0) for r in rows if r["updated"])


def test_without_the_gate_data_beyond_the_bound_is_dropped_never_used(tmp_path: Path) -> None:
    co = _coordinator(tmp_path, ("pipeline.max_staleness", 0), ("pipeline.staleness_gate", False))
    seen = _spy(co)
    summary = _run(co)
    assert summary.accounting["dropped_stale"] > 0  # produced stale, and dropped
    for version, step_versions in seen:
        assert all((v == version).all() for v in step_versions)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["groups_dropped_stale"] for r in rows) > 0


def test_a_bound_of_two_is_never_exceeded_and_is_reported(tmp_path: Path) -> None:
    co = _coordinator(
        tmp_path,
        ("pipeline.max_staleness", 2),
        ("pipeline.groups_per_iteration", 1),
        ("pipeline.staleness_gate", False),
    )
    seen = _spy(co)
    summary = _run(co)
    lags = [version - int(v.min()) for version, vs in seen for v in vs]
    assert max(lags) <= 2
    assert set(summary.staleness) <= {"0", "1", "2"}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert sum(r["staleness_hist"].values()) == 1
        assert r["staleness_max"] <= 2
        if r["updated"]:
            assert 0.0 < r["ess"] <= 1.0 + 1e-9


def test_inference_batching_is_bounded_and_reported(tmp_path: Path) -> None:
    co = _coordinator(
        tmp_path,
        ("run.max_iterations", 5),
        ("pipeline.shards", 4),
        ("pipeline.infer.max_batch", 16),
        ("pipeline.infer.max_wait_ms", 5),
    )
    summary = _run(co)
    rep = summary.infer
    assert rep["where"] == "coordinator" and rep["max_batch"] == 16
    assert 1 <= rep["max_batch_seen"] <= 16
    assert sum(rep["batch_size_hist"].values()) == rep["forwards"] > 0
    assert rep["mean_batch"] == pytest.approx(rep["observations"] / rep["forwards"], abs=1e-3)
    # Four shards of eight environments: batching joins requests beyond one shard's eight.
    assert rep["max_batch_seen"] > 8


def test_a_request_larger_than_max_batch_is_split_across_forwards() -> None:
    import asyncio

    from dvla.config import InferConfig
    from dvla.pipeline.infer import InferLane
    from dvla.pipeline.weights import ReplicaSet
    from dvla.testing.fakes import FakePolicy, FakePolicyOptions, fake_spec, make_obs

    lane = InferLane(
        ReplicaSet(FakePolicy(FakePolicyOptions(), fake_spec()), 0),
        InferConfig(max_batch=4, max_wait_ms=1),
        timeout_s=10,
        seed=0,
    )

    async def go() -> list[int]:
        stop = asyncio.Event()
        task = asyncio.create_task(lane.run(stop))
        answers = await asyncio.gather(lane.request(make_obs(10)), lane.request(make_obs(3)))
        stop.set()
        await asyncio.wait_for(task, 5)
        return [len(a.actions) for a in answers]

    try:
        assert asyncio.run(go()) == [10, 3]
    finally:
        lane.close()
    assert lane.max_batch_seen <= 4 and lane.observations == 13
