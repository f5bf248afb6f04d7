from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from dvla.backends.algorithms.grpo import GRPO, GRPOOptions
from dvla.config import InferConfig, PipelineConfig
from dvla.data import ActionBatch, Trajectory, TrajectoryGroup
from dvla.errors import LaneError, SimulatorError
from dvla.pipeline.infer import InferLane
from dvla.pipeline.lane import Lane
from dvla.pipeline.learn import LearnLane
from dvla.pipeline.sample import EnvShard, EpisodeSource, GroupAssembler, SampleLane
from dvla.pipeline.stats import Accounting
from dvla.pipeline.sync import SyncLane
from dvla.pipeline.weights import LocalWeightBus, ReplicaSet, snapshot
from dvla.testing.fakes import (
    FakePolicy,
    FakePolicyOptions,
    FakeSimulator,
    FakeSimulatorOptions,
    fake_spec,
    make_group,
    make_obs,
    make_trajectory,
)


def policy(**options: Any) -> FakePolicy:
    return FakePolicy(FakePolicyOptions(**options), fake_spec())


def sim(num_envs: int = 4, **options: Any) -> FakeSimulator:
    return FakeSimulator(FakeSimulatorOptions(**options), num_envs, 0)


def actions_for(shard: EnvShard, version: int, first: float = 0.0) -> ActionBatch:
    n = len(shard.active_ids)
    d = shard.sim.spec.action_dim
    acts = np.zeros((n, d), np.float32)
    acts[:, 0] = first
    return ActionBatch(
        acts,
        np.full((n, d), 3, np.int64),
        np.full((n, d), -1.5, np.float32),
        version,
    )


# --------------------------------------------------------------------- EpisodeSource


def test_episode_source_hands_out_groups_of_g_identical_episodes() -> None:
    src = EpisodeSource([4, 4, 4], group_size=3, seed=0, limited=False)
    eps = src.take(7) + src.take(5)
    assert len(eps) == 12
    by_group: dict[int, list[tuple[int, int, int]]] = {}
    for ep in eps:
        by_group.setdefault(ep[0], []).append(ep)
    assert sorted(by_group) == [0, 1, 2, 3]
    for gid, members in by_group.items():
        assert len(members) == 3
        assert len(set(members)) == 1, f"group {gid} mixes (task, init) pairs"
        _, task, init = members[0]
        assert 0 <= task < 3 and 0 <= init < 4
    # Handed out in order: a group's episodes are contiguous.
    assert [e[0] for e in eps] == sorted(e[0] for e in eps)


def test_episode_source_respects_each_tasks_init_count() -> None:
    src = EpisodeSource([1, 2], group_size=1, seed=3, limited=False)
    eps = src.take(200)
    assert {(t, i) for _, t, i in eps} <= {(0, 0), (1, 0), (1, 1)}
    assert {t for _, t, _ in eps} == {0, 1}


def test_episode_source_is_seeded() -> None:
    a = EpisodeSource([5, 5], 2, seed=7, limited=False).take(20)
    b = EpisodeSource([5, 5], 2, seed=7, limited=False).take(20)
    c = EpisodeSource([5, 5], 2, seed=8, limited=False).take(20)
    assert a == b
    assert a != c


def test_episode_source_respects_the_sync_budget() -> None:
    src = EpisodeSource([4, 4], group_size=2, seed=0, limited=True)
    assert src.take(5) == []  # nothing allowed yet
    src.allow(1)
    first = src.take(5)
    assert len(first) == 2 and len({e[0] for e in first}) == 1
    assert src.take(5) == []
    src.allow(2)
    got = src.take(3)
    assert len(got) == 3
    got += src.take(3)
    assert len(got) == 4  # exactly two more groups
    assert Counter(e[0] for e in got) == {1: 2, 2: 2}
    assert src.take(1) == []


# --------------------------------------------------------------------- GroupAssembler


def test_group_assembler_emits_only_complete_groups() -> None:
    asm = GroupAssembler(group_size=3)
    a = [make_trajectory(1.0, group_id=0, seq=i) for i in range(3)]
    b = [make_trajectory(0.0, group_id=1, seq=10 + i) for i in range(3)]
    assert asm.add(a[0]) is None
    assert asm.add(b[0]) is None
    assert asm.add(a[1]) is None
    assert asm.pending() == 3
    group = asm.add(a[2])
    assert group is not None
    assert group.group_id == 0
    assert [t.seq for t in group.trajectories] == [0, 1, 2]
    assert asm.pending() == 1
    assert asm.add(b[1]) is None
    done = asm.add(b[2])
    assert done is not None and done.group_id == 1
    assert asm.pending() == 0


def test_group_assembler_copies_task_and_init_of_the_group() -> None:
    asm = GroupAssembler(group_size=1)
    g = asm.add(make_trajectory(0.0, group_id=5, task_id=1, init_state_id=3))
    assert g is not None
    assert (g.group_id, g.task_id, g.init_state_id) == (5, 1, 3)


# --------------------------------------------------------------------- EnvShard


def run_shard(shard: EnvShard, first: float = 0.0) -> tuple[list[Trajectory], int, int]:
    shard.refill()
    trajs: list[Trajectory] = []
    steps = 0
    version = 0
    while shard.has_active:
        finished, n = shard.advance(actions_for(shard, version, first))
        trajs += finished
        steps += n
        version += 1
    return trajs, steps, version


def test_env_shard_records_versions_per_step_and_lengths_sum_to_steps() -> None:
    src = EpisodeSource([4, 4], group_size=2, seed=0, limited=True)
    src.allow(3)  # 6 episodes on 4 envs: two start late
    shard = EnvShard("s0", sim(num_envs=4, episode_length=3), "fake", src)
    trajs, steps, calls = run_shard(shard)
    assert len(trajs) == 6
    assert sum(t.length for t in trajs) == steps == 18
    assert calls == 6  # the late episodes start when the first ones end
    for t in trajs:
        assert t.length == 3
        assert t.producer == "s0"
        # one version per step, increasing by one per shard step
        assert t.versions.tolist() == list(range(t.versions[0], t.versions[0] + 3))
        assert t.tokens.shape == (3, 2) and (t.tokens == 3).all()
        assert (t.logprobs == -1.5).all()
        assert t.images["cam"].shape == (3, 8, 8, 3)
        # the observations are those the actions were taken on: t / length at each step
        assert t.proprio[:, 0].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])
        assert t.instruction == f"fake task {t.task_id}"
    assert sorted(t.version for t in trajs) == [0, 0, 0, 0, 3, 3]
    assert sorted(t.seq for t in trajs) == [1, 2, 3, 4, 5, 6]
    assert Counter(t.group_id for t in trajs) == {0: 2, 1: 2, 2: 2}


def test_env_shard_rewards_follow_the_fake_rule() -> None:
    src = EpisodeSource([2], group_size=2, seed=0, limited=True)
    src.allow(1)
    shard = EnvShard("s", sim(num_envs=2, episode_length=2), "fake", src)
    trajs, _, _ = run_shard(shard, first=0.9)
    assert [t.success for t in trajs] == [True, True]
    assert [t.rewards.tolist() for t in trajs] == [[0.0, 1.0], [0.0, 1.0]]
    src.allow(1)
    trajs, _, _ = run_shard(shard, first=0.1)
    assert [t.ret for t in trajs] == [0.0, 0.0]


def test_env_shard_wraps_simulator_failures() -> None:
    src = EpisodeSource([2], group_size=1, seed=0, limited=False)
    shard = EnvShard("s", sim(num_envs=2, fail_on_step=2), "my-sim", src)
    shard.refill()
    shard.advance(actions_for(shard, 0))
    with pytest.raises(SimulatorError) as info:
        shard.advance(actions_for(shard, 0))
    msg = str(info.value)
    assert msg.startswith("simulator 'my-sim' raised RuntimeError in step:")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_sample_lane_sync_rollout_emits_exactly_the_requested_groups() -> None:
    async def main() -> tuple[list[TrajectoryGroup], Accounting, InferLane]:
        src = EpisodeSource([3, 3], group_size=2, seed=0, limited=True)
        shards = [
            EnvShard(f"s{i}", sim(num_envs=2, episode_length=3), "fake", src) for i in range(2)
        ]
        acc = Accounting()
        lane = SampleLane(shards, 2, acc, timeout_s=10)
        infer = InferLane(ReplicaSet(policy()), InferConfig(), 10, seed=0)
        try:
            groups = await lane.rollout(3, infer.forward)
        finally:
            lane.close()
            infer.close()
        return groups, acc, infer

    groups, acc, infer = asyncio.run(main())
    assert len(groups) == 3
    assert all(len(g.trajectories) == 2 for g in groups)
    assert acc.produced == 6 and acc.env_steps == 18
    assert infer.batches == 6  # 4 envs then the last group's 2 envs, 3 steps each


# --------------------------------------------------------------------- InferLane


def test_infer_lane_batches_concurrent_requests_into_one_forward() -> None:
    async def main() -> tuple[InferLane, list[ActionBatch]]:
        infer = InferLane(
            ReplicaSet(policy()), InferConfig(max_batch=64, max_wait_ms=200), 10, seed=0
        )
        stop = asyncio.Event()
        server = asyncio.create_task(infer.run(stop))
        try:
            answers = await asyncio.gather(
                infer.request(make_obs(3, seed=1)), infer.request(make_obs(2, seed=2))
            )
        finally:
            stop.set()
            await server
            infer.close()
        return infer, list(answers)

    infer, (a, b) = asyncio.run(main())
    assert infer.batches == 1
    assert infer.max_batch_seen == 5
    assert infer.observations == 5
    assert infer.mean_batch() == 5.0
    assert a.actions.shape == (3, 2) and b.actions.shape == (2, 2)
    assert a.version == b.version == 0
    assert infer.stats.calls == 1


def test_infer_lane_splits_at_max_batch() -> None:
    async def main() -> InferLane:
        infer = InferLane(
            ReplicaSet(policy()), InferConfig(max_batch=4, max_wait_ms=200), 10, seed=0
        )
        stop = asyncio.Event()
        server = asyncio.create_task(infer.run(stop))
        try:
            await asyncio.gather(*(infer.request(make_obs(2, seed=i)) for i in range(3)))
        finally:
            stop.set()
            await server
            infer.close()
        return infer

    infer = asyncio.run(main())
    assert infer.batches == 2
    assert infer.max_batch_seen == 4
    assert infer.observations == 6


def test_infer_lane_answers_match_an_unbatched_greedy_forward() -> None:
    pol = policy(init_scale=1.0)
    obs_a, obs_b = make_obs(3, seed=1), make_obs(2, seed=2)
    with torch.no_grad():
        ref_a = pol.act(pol.prepare(obs_a), deterministic=True)[0]
        ref_b = pol.act(pol.prepare(obs_b), deterministic=True)[0]

    async def main() -> list[ActionBatch]:
        infer = InferLane(ReplicaSet(pol), InferConfig(max_wait_ms=200), 10, seed=0)
        # Greedy actions make the answers checkable row by row.
        rep = infer.replicas.active
        orig = rep.policy.act

        def greedy(inputs: dict[str, torch.Tensor], **_: Any) -> Any:
            return orig(inputs, deterministic=True)

        rep.policy.act = greedy  # type: ignore[method-assign]
        stop = asyncio.Event()
        server = asyncio.create_task(infer.run(stop))
        try:
            return list(await asyncio.gather(infer.request(obs_a), infer.request(obs_b)))
        finally:
            stop.set()
            await server
            infer.close()

    a, b = asyncio.run(main())
    np.testing.assert_array_equal(a.actions, ref_a)
    np.testing.assert_array_equal(b.actions, ref_b)


def test_infer_lane_failure_reaches_every_requester() -> None:
    async def main() -> list[BaseException | ActionBatch]:
        bad = ReplicaSet(policy())
        bad.active.policy.prepare = None  # type: ignore[assignment, method-assign]
        infer = InferLane(bad, InferConfig(max_wait_ms=100), 10, seed=0)
        stop = asyncio.Event()
        server = asyncio.create_task(infer.run(stop))
        results = await asyncio.gather(
            infer.request(make_obs(1)), infer.request(make_obs(1)), return_exceptions=True
        )
        with pytest.raises(TypeError):
            await server
        infer.close()
        return list(results)

    results = asyncio.run(main())
    assert all(isinstance(r, TypeError) for r in results)


# --------------------------------------------------------------------- LearnLane


def learn_lane(
    max_staleness: int = 1, groups_per_iteration: int = 2
) -> tuple[LearnLane, Accounting, LocalWeightBus, list[tuple[int, dict[str, float]]]]:
    pol = policy()
    algo = GRPO(GRPOOptions(group_size=4), pol, torch.optim.SGD(pol.parameters(), lr=0.1))
    acc = Accounting()
    bus = LocalWeightBus()
    cfg = PipelineConfig(max_staleness=max_staleness, groups_per_iteration=groups_per_iteration)
    seen: list[tuple[int, dict[str, float]]] = []
    lane = LearnLane(algo, pol, bus, acc, cfg, lambda i, m: seen.append((i, m)))
    return lane, acc, bus, seen


def test_learn_lane_drops_groups_older_than_max_staleness() -> None:
    lane, acc, _, _ = learn_lane(max_staleness=1)
    lane.version = 5
    assert lane.admit(make_group([1, 0, 0, 0], version=5, group_id=0))
    assert lane.admit(make_group([1, 0, 0, 0], version=4, group_id=1))  # staleness 1: ok
    assert not lane.admit(make_group([1, 0, 0, 0], version=3, group_id=2))  # 2 > 1
    # one stale step is enough: a group is as old as its oldest action
    assert not lane.admit(make_group([1, 0, 0, 0], version=[5, 5, 5, 3], group_id=3))
    assert acc.dropped_stale == 8  # trajectories, not groups
    assert [g.group_id for g in lane.pending] == [0, 1]
    assert lane.staleness_seen == {0: 1, 1: 1}


def test_learn_lane_max_staleness_zero_is_on_policy() -> None:
    lane, acc, _, _ = learn_lane(max_staleness=0)
    lane.version = 1
    assert not lane.admit(make_group([1, 0], version=0))
    assert lane.admit(make_group([1, 0], version=1))
    assert acc.dropped_stale == 2


def test_learn_lane_train_publishes_a_new_version() -> None:
    lane, acc, bus, seen = learn_lane(groups_per_iteration=2)
    lane.admit(make_group([1, 0, 0, 0], group_id=0))
    assert not lane.batch_ready
    lane.admit(make_group([0, 1, 1, 1], group_id=1))
    assert lane.batch_ready
    metrics = asyncio.run(lane.train())
    assert metrics["updated"] == 1.0
    assert metrics["version"] == 1.0
    assert lane.version == 1 and lane.iteration == 1
    assert bus.version == 1
    assert acc.consumed == 8
    assert lane.pending == []
    assert seen == [(1, metrics)]


def test_learn_lane_does_not_bump_the_version_without_an_update() -> None:
    lane, acc, bus, seen = learn_lane(groups_per_iteration=1)
    lane.admit(make_group([1, 1, 1, 1]))
    metrics = asyncio.run(lane.train())
    assert metrics["updated"] == 0.0
    assert lane.version == 0 and lane.iteration == 1
    assert bus.version == -1  # nothing published
    assert acc.consumed == 4
    assert len(seen) == 1


# --------------------------------------------------------------------- SyncLane


def active_bias(replicas: ReplicaSet) -> torch.Tensor:
    pol = replicas.active.policy
    assert isinstance(pol, FakePolicy)
    return pol.linear.bias


def test_sync_lane_applies_a_newer_version_and_ignores_older() -> None:
    learner = policy()
    replicas = ReplicaSet(learner)

    async def main() -> None:
        bus = LocalWeightBus()
        sync = SyncLane(bus, replicas, timeout_s=10)
        assert sync.applied == 0
        assert not await sync.apply_newer(0.01)  # nothing published
        with torch.no_grad():
            learner.linear.bias.fill_(0.25)
        bus.publish(2, snapshot(learner))
        assert await sync.apply_newer(0.5)
        assert sync.applied == 2 and sync.syncs == 1
        assert replicas.active.version == 2
        assert torch.all(active_bias(replicas) == 0.25)
        # no newer version: nothing happens
        assert not await sync.apply_newer(0.01)
        assert sync.syncs == 1
        sync.close()

    asyncio.run(main())
    # An older version is never applied over a newer one.
    with torch.no_grad():
        learner.linear.bias.fill_(-1.0)
    replicas.load(1, snapshot(learner))
    assert replicas.active.version == 2
    assert torch.all(active_bias(replicas) == 0.25)
    replicas.load(2, snapshot(learner))  # same version: ignored too
    assert torch.all(active_bias(replicas) == 0.25)


def test_sync_lane_skips_versions_published_faster_than_applied() -> None:
    learner = policy()
    replicas = ReplicaSet(learner)

    async def main() -> SyncLane:
        bus = LocalWeightBus()
        sync = SyncLane(bus, replicas, timeout_s=10)
        for v in (1, 2, 3):
            with torch.no_grad():
                learner.linear.bias.fill_(float(v))
            bus.publish(v, snapshot(learner))
        assert await sync.apply_newer(0.5)
        sync.close()
        return sync

    sync = asyncio.run(main())
    assert sync.applied == 3 and sync.syncs == 1
    assert torch.all(active_bias(replicas) == 3.0)


def test_sync_lane_wakes_up_on_publish() -> None:
    learner = policy()
    replicas = ReplicaSet(learner)

    async def main() -> bool:
        bus = LocalWeightBus()
        sync = SyncLane(bus, replicas, timeout_s=10)
        waiter = asyncio.create_task(sync.apply_newer(5.0))
        await asyncio.sleep(0.01)
        bus.publish(1, snapshot(learner))
        got = await asyncio.wait_for(waiter, 2.0)
        sync.close()
        return got

    assert asyncio.run(main())
    assert replicas.active.version == 1


def test_replica_set_swaps_and_keeps_replicas_frozen() -> None:
    learner = policy()
    replicas = ReplicaSet(learner)
    first = replicas.active
    replicas.load(1, snapshot(learner))
    assert replicas.active is not first
    assert all(not p.requires_grad for p in replicas.active.policy.parameters())
    assert not replicas.active.policy.training
    # the learner's own parameters are untouched by the copies
    assert all(p.requires_grad for p in learner.parameters())


def test_snapshot_is_detached_from_the_learner() -> None:
    learner = policy()
    state = snapshot(learner)
    with torch.no_grad():
        learner.linear.bias.add_(1.0)
    assert not torch.equal(state["linear.bias"], learner.linear.bias)


# --------------------------------------------------------------------- LocalWeightBus


def test_local_weight_bus_rejects_non_increasing_versions() -> None:
    bus = LocalWeightBus()
    state = snapshot(policy())
    assert bus.version == -1
    bus.publish(0, state)
    bus.publish(3, state)
    assert bus.version == 3
    with pytest.raises(ValueError, match="only go up: 3 after 3"):
        bus.publish(3, state)
    with pytest.raises(ValueError, match="only go up: 2 after 3"):
        bus.publish(2, state)
    assert bus.version == 3


def test_local_weight_bus_wait_newer_times_out() -> None:
    async def main() -> object:
        bus = LocalWeightBus()
        bus.publish(1, {})
        return await bus.wait_newer(1, 0.01)

    assert asyncio.run(main()) is None


# --------------------------------------------------------------------- Lane


def test_lane_timeout_is_a_one_line_lane_error() -> None:
    import threading

    release = threading.Event()

    async def main() -> None:
        lane = Lane("demo", timeout_s=0.05)
        try:
            await lane.blocking(release.wait, 5.0)
        finally:
            release.set()
            lane.close()

    with pytest.raises(LaneError, match=r"^demo lane: a step took longer than 0.05 s"):
        asyncio.run(main())


def test_lane_counts_busy_time() -> None:
    async def main() -> Lane:
        lane = Lane("demo", timeout_s=5)
        assert await lane.blocking(sum, [1, 2, 3]) == 6
        await lane.blocking(lambda: None)
        lane.close()
        return lane

    lane = asyncio.run(main())
    assert lane.stats.calls == 2
    assert lane.stats.busy_s >= 0.0


def test_infer_lane_answers_requests_queued_before_stop() -> None:
    import time

    async def main() -> ActionBatch:
        infer = InferLane(ReplicaSet(policy()), InferConfig(max_wait_ms=0), 1.5, seed=0)
        rep = infer.replicas.active
        orig = rep.policy.act

        def slow(inputs: dict[str, torch.Tensor], **kw: Any) -> Any:
            time.sleep(0.4)
            return orig(inputs, **kw)

        rep.policy.act = slow  # type: ignore[method-assign]
        stop = asyncio.Event()
        server = asyncio.create_task(infer.run(stop))
        first = asyncio.create_task(infer.request(make_obs(1)))
        await asyncio.sleep(0.05)  # the first request is being served
        second = asyncio.create_task(infer.request(make_obs(1)))
        await asyncio.sleep(0)  # the second is queued
        stop.set()  # e.g. the learner reached max_iterations
        try:
            await server
            await first
            return await second  # a shard awaiting this never checks `stop`
        finally:
            infer.close()

    assert asyncio.run(main()).actions.shape == (1, 2)


def test_learn_lane_refuses_to_publish_non_finite_weights() -> None:
    from dvla.errors import TrainingError

    lane, acc, bus, seen = learn_lane(groups_per_iteration=1)
    group = make_group([1, 0, 0, 0], version=0)

    def poison(*args: Any) -> dict[str, float]:
        with torch.no_grad():
            next(lane.policy.parameters()).fill_(float("nan"))
        return {"loss": 0.0}

    lane.algorithm.update = poison  # type: ignore[method-assign]
    assert lane.admit(group)
    with pytest.raises(TrainingError, match="weights became NaN or infinite"):
        asyncio.run(lane.train())
    assert bus.version == -1 and not seen  # nothing published, no iteration recorded
    assert acc.discarded == 4 and acc.consumed == 0  # the batch is accounted for
