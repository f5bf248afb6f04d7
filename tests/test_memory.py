"""Rollout and training memory pools: reuse, overflow, high-water marks, steady state."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dvla.backends.algorithms.batching import flatten
from dvla.backends.algorithms.grpo import GRPO, GRPOOptions
from dvla.config import MemoryConfig, PipelineConfig, load_config
from dvla.data import ActionBatch, ObsBatch, Trajectory, TrajectoryGroup
from dvla.pipeline import memory
from dvla.pipeline.coordinator import Coordinator
from dvla.pipeline.learn import LearnLane
from dvla.pipeline.memory import (
    BufferPool,
    MemoryPools,
    TrajectoryRing,
    ring_slots,
    sampler_ring_slots,
)
from dvla.pipeline.sample import EnvShard, EpisodeSource
from dvla.pipeline.staging import ObsStage
from dvla.pipeline.stats import Accounting
from dvla.pipeline.weights import LocalWeightBus
from dvla.rundir import RunDir
from dvla.testing import (
    FakePolicy,
    FakePolicyOptions,
    FakeSimulator,
    FakeSimulatorOptions,
    fake_spec,
    make_group,
    make_obs,
    make_trajectory,
)
from dvla.testing.aio import run
from dvla.testing.transports import SECRET, make
from dvla.transport.channel import DataPlaneClient, DataPlaneServer

ROOT = Path(__file__).resolve().parents[1]


def ring(slots: int, pool: BufferPool | None = None) -> TrajectoryRing:
    return TrajectoryRing.for_spec(pool or BufferPool("rollout"), fake_spec(), slots)


def pooled(traj: Trajectory, r: TrajectoryRing) -> Trajectory:
    """``traj`` as if a shard had built it in a slot of ``r``."""
    traj.attach_release(r.acquire().release)
    return traj


# --------------------------------------------------------------------- pools and rings


def test_ring_slots_are_reused_without_new_buffers() -> None:
    pool = BufferPool("rollout")
    r = ring(2, pool)
    buffers, allocations = pool.buffers, pool.allocations
    seen = set()
    for _ in range(100):
        a, b = r.acquire(), r.acquire()
        seen |= {id(a), id(b)}
        assert a.index >= 0 and b.index >= 0 and a is not b
        a.release()
        b.release()
    assert len(seen) == 2  # the same two slot objects, over and over
    assert (pool.buffers, pool.allocations) == (buffers, allocations)
    assert r.overflow == 0 and r.in_use == 0 and pool.in_use_bytes == 0
    # Last released, first reused: the memory touched stays near the high-water mark.
    a = r.acquire()
    a.release()
    assert r.acquire() is a


def test_full_ring_falls_back_to_fresh_arrays_and_counts_overflow() -> None:
    pool = BufferPool("rollout")
    r = ring(1, pool)
    first = r.acquire()
    extra = r.acquire()  # never blocks
    assert extra.index == -1 and extra is not first
    assert r.overflow == 1 and pool.overflow == 1 and pool.overflow_bytes == r.slot_bytes
    assert pool.buffers == len(r._shapes)  # the fresh arrays are not pool buffers
    extra.images["cam"][:] = 7
    extra.release()
    first.release()
    # The overflow slot is not kept: the ring hands out its own slot again.
    assert r.acquire() is first
    assert r.report() == {"slots": 1, "slots_in_use": 1, "slots_high_water": 2, "slot_overflow": 1}


def test_high_water_mark_tracks_the_most_in_use() -> None:
    pool = BufferPool("rollout")
    r = ring(4, pool)
    held = [r.acquire() for _ in range(3)]
    for s in held:
        s.release()
    r.acquire().release()
    assert pool.in_use_bytes == 0
    assert pool.high_water_bytes == 3 * r.slot_bytes and r.high_water == 3
    # Grow-only buffers count the rows of their latest request as in use.
    view = pool.grow("k", 10, (4,), np.float32)
    assert view.shape == (10, 4) and pool.in_use_bytes == 160
    pool.grow("k", 2, (4,), np.float32)
    assert pool.in_use_bytes == 32 and pool.high_water_bytes == 3 * r.slot_bytes
    report = pool.report()
    assert report["in_use_bytes"] == 32 and report["overflow"] == 0


def test_grow_only_buffers_are_reused_and_grow_geometrically() -> None:
    pool = BufferPool("train")
    a = pool.grow("x", 8, (3,), np.int64)
    b = pool.grow("x", 5, (3,), np.int64)
    assert np.shares_memory(a, b) and pool.allocations == 1
    c = pool.grow("x", 9, (3,), np.int64)
    assert pool.allocations == 2 and pool.buffers == 1
    assert pool.grow("x", 12, (3,), np.int64).base is c.base  # grew to 1.5 x 8 = 12 rows
    assert pool.reserved_bytes == 12 * 3 * 8


def test_trajectory_release_is_idempotent_and_a_no_op_when_unpooled() -> None:
    r = ring(2)
    traj = pooled(make_trajectory(1.0), r)
    assert r.in_use == 1
    traj.release()
    traj.release()
    assert r.in_use == 0 and len(r._free) == 2
    plain = make_trajectory(1.0)
    plain.release()  # decoded from the wire or built by a test: nothing to give back
    # The hook is not part of the record: not compared, not shown, not a constructor field.
    hook = next(f for f in dataclasses.fields(Trajectory) if f.name == "_release")
    assert not (hook.compare or hook.repr or hook.init)
    assert "release" not in repr(pooled(make_trajectory(1.0), r))


def test_pinning_is_off_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "cuda_available", lambda: False)
    for setting in ("auto", "on", "off"):
        pools = MemoryPools(MemoryConfig(pinned=setting))
        report = pools.report()
        assert set(report) == {"rollout", "train"}  # no CUDA pools either
        assert not report["rollout"]["pinned"] and not report["train"]["pinned"]
        arr = pools.train.grow("x", 4, (2,), np.float32)
        assert report["train"]["pinned_bytes"] == 0 and arr.base is not None
        with pools.inference(), pools.training():
            pass  # no-ops on CPU


# --------------------------------------------------------------------- staging


def test_obs_stage_composes_like_concat_and_select() -> None:
    pool = BufferPool("rollout")
    stage = ObsStage(pool, "s", capacity=8, buffers=2)
    a, b = make_obs(3), make_obs(2)
    a.proprio[:] = np.arange(3)[:, None]
    b.proprio[:] = 10 + np.arange(2)[:, None]
    both = stage.compose([(a, None), (b, None)])
    want = ObsBatch.concat([a, b])
    assert np.array_equal(both.proprio, want.proprio) and both.instructions == want.instructions
    assert all(np.array_equal(both.images[k], want.images[k]) for k in want.images)
    # Composing from the previous result reads one buffer and writes the other.
    picked = stage.compose([(both, np.array([4, 0])), (a, None)])
    assert picked.proprio[:, 0].tolist() == [11, 0, 0, 1, 2]
    assert not np.shares_memory(picked.proprio, both.proprio)
    allocations = pool.allocations
    for _ in range(50):
        stage.compose([(a, None), (b, np.array([1]))])
    assert pool.allocations == allocations


def test_flatten_into_the_train_pool_equals_concatenation() -> None:
    pool = BufferPool("train")
    pool.min_rows = 64
    groups = [make_group([1.0, 0.0, 2.0], length=[3, 1, 5], group_id=g) for g in range(3)]
    for size in (3, 1, 2, 3):
        trajs = [t for g in groups[:size] for t in g.trajectories]
        want, got = flatten(trajs), flatten(trajs, pool)
        for name in ("tokens", "logprobs", "versions", "traj_index"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), name
            assert getattr(got, name).dtype == getattr(want, name).dtype
        assert np.array_equal(got.obs.proprio, want.obs.proprio)
        assert got.obs.instructions == want.obs.instructions
        assert all(np.array_equal(got.obs.images[c], want.obs.images[c]) for c in want.obs.images)
    # One buffer per camera and per array, sized once (min_rows): never regrown.
    assert pool.allocations == pool.buffers == len(groups[0].trajectories[0].images) + 5


# --------------------------------------------------------------------- lanes


def sim(num_envs: int, **options: Any) -> FakeSimulator:
    return FakeSimulator(FakeSimulatorOptions(**options), num_envs, 0)


def same(a: Trajectory, b: Trajectory) -> bool:
    for f in dataclasses.fields(Trajectory):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not f.compare:
            continue
        if isinstance(x, dict):
            if x.keys() != y.keys() or not all(np.array_equal(x[k], y[k]) for k in x):
                return False
        elif isinstance(x, np.ndarray):
            if x.dtype != y.dtype or not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


def drive(shard: EnvShard) -> list[Trajectory]:
    out: list[Trajectory] = []
    shard.refill()
    version = 0
    while shard.has_active:
        n, d = len(shard.active_ids), shard.sim.spec.action_dim
        act = ActionBatch(
            np.full((n, d), 0.9 if version % 2 else 0.1, np.float32),
            np.full((n, d), version % 5, np.int64),
            np.full((n, d), -1.0, np.float32),
            version,
        )
        finished, _ = shard.advance(act)
        out += finished
        version += 1
    return out


def test_env_shard_with_a_ring_builds_the_same_trajectories_as_views() -> None:
    def source() -> EpisodeSource:
        src = EpisodeSource([3, 3], group_size=2, seed=0, limited=True)
        src.allow(6)
        return src

    plain = drive(EnvShard("s", sim(3, episode_length=4), "fake", source()))
    pool = BufferPool("rollout")
    env = sim(3, episode_length=4)
    r = TrajectoryRing.for_spec(pool, env.spec, 12)
    shard = EnvShard("s", env, "fake", source(), pool, r)
    allocations = pool.allocations
    pooled_trajs = drive(shard)
    assert len(pooled_trajs) == len(plain) == 12
    assert all(same(a, b) for a, b in zip(pooled_trajs, plain, strict=True))
    assert all(np.shares_memory(t.tokens, r._slots[0].tokens.base) for t in pooled_trajs)
    assert r.in_use == 12 and r.overflow == 0 and pool.allocations == allocations
    for t in pooled_trajs:
        t.release()
    assert r.in_use == 0


def learn_lane(max_staleness: int = 1) -> tuple[LearnLane, Accounting]:
    pol = FakePolicy(FakePolicyOptions(), fake_spec())
    algo = GRPO(GRPOOptions(group_size=2), pol, torch.optim.SGD(pol.parameters(), lr=0.1))
    algo.train_pool = BufferPool("train")
    cfg = PipelineConfig(max_staleness=max_staleness, groups_per_iteration=2)
    acc = Accounting()
    lane = LearnLane(algo, pol, LocalWeightBus(), acc, cfg, lambda i, m: None)
    return lane, acc


def pooled_group(r: TrajectoryRing, group_id: int, version: int = 0) -> TrajectoryGroup:
    group = make_group([1.0, 0.0], version=version, group_id=group_id)
    for t in group.trajectories:
        pooled(t, r)
    return group


def test_learner_releases_consumed_and_dropped_groups() -> None:
    r = ring(8)
    lane, acc = learn_lane(max_staleness=1)
    lane.version = 3
    assert not lane.admit(pooled_group(r, 0, version=1))  # stale: released at once
    assert r.in_use == 0 and acc.dropped_stale == 2
    assert lane.admit(pooled_group(r, 1, version=3))
    assert lane.admit(pooled_group(r, 2, version=3))
    assert r.in_use == 4
    metrics = run(lane.train())
    assert metrics["updated"] == 1.0 and acc.consumed == 4
    assert r.in_use == 0 and r.high_water == 4


def test_learner_releases_a_batch_whose_update_failed() -> None:
    r = ring(8)
    lane, acc = learn_lane()

    def boom(*_: Any) -> dict[str, float]:
        raise RuntimeError("update failed")

    lane.algorithm.update = boom  # type: ignore[method-assign]
    lane.admit(pooled_group(r, 0))
    lane.admit(pooled_group(r, 1))
    with pytest.raises(RuntimeError):
        run(lane.train())
    assert acc.discarded == 4 and r.in_use == 0


def test_sampler_slots_are_released_when_the_chunk_is_acknowledged(tmp_path: Path) -> None:
    async def main() -> None:
        block = asyncio.Event()
        received: list[int] = []

        async def on_group(group: TrajectoryGroup, producer: str, stats: Any) -> None:
            await asyncio.wait_for(block.wait(), 30)
            received.append(group.group_id)

        async def on_obs(obs: ObsBatch) -> ActionBatch:
            raise AssertionError("no requests here")

        t = make("memory", tmp_path)
        cfg = t.config()
        server = DataPlaneServer(cfg, SECRET, on_obs, on_group)
        url = await server.start(memory_name=f"mem{id(block)}")
        client = DataPlaneClient(url, cfg, SECRET, "p1")
        await client.start()
        r = ring(4)
        for gid in range(2):
            group = pooled_group(r, gid)
            await client.send_group(group, timeout=5, on_acked=group.release)
        await asyncio.sleep(0.1)
        assert r.in_use == 4  # the chunks still refer to the slots until acknowledged
        block.set()
        assert await client.flush(10)
        assert received == [0, 1] and r.in_use == 0
        await client.close()
        await server.close()

    run(main())


# --------------------------------------------------------------------- sizing, pipeline


def test_default_ring_sizes_follow_the_documented_formula() -> None:
    p = PipelineConfig(
        num_envs=64, queue_groups=8, groups_per_iteration=8, max_staleness=4, staleness_gate=False
    )
    assert ring_slots(p, 8, 64) == (8 + 2 * 8) * 8 + 2 * 64
    gated = p.model_copy(update={"staleness_gate": True, "max_staleness": 1})
    assert ring_slots(gated, 8, 64) == 8 * 8 * 2  # the gate's open-group bound is lower
    assert ring_slots(p.model_copy(update={"mode": "sync"}), 8, 64) == 8 * 8
    assert sampler_ring_slots(p, 32, 8, 32, 2) == (32 + 2 * 2) * 8 + 2 * 32
    fixed = p.model_copy(update={"memory": MemoryConfig(trajectory_slots=5)})
    assert ring_slots(fixed, 8, 64) == sampler_ring_slots(fixed, 32, 8, 32, 2) == 5


def test_toy_pipeline_allocates_no_pool_buffers_in_the_steady_state(tmp_path: Path) -> None:
    overrides = {
        "run.max_iterations": 30,
        "run.target_success": None,
        "run.eval_episodes": 0,
        "run.max_wall_seconds": 240,
        "cluster.http": False,
        "checkpoint.final": False,
    }
    cfg = load_config(ROOT / "configs" / "toy.yaml", overrides)
    coord = Coordinator(cfg, RunDir(tmp_path / "run"))
    snapshots: dict[int, dict[str, Any]] = {}
    slot_objects: dict[int, int] = {}
    hook = coord.learn.on_iteration

    def record(iteration: int, metrics: dict[str, float]) -> None:
        snapshots[iteration] = coord.memory_report()
        slot_objects[iteration] = sum(len(r._slots) for r in coord.memory.rings)
        hook(iteration, metrics)

    coord.learn.on_iteration = record
    try:
        summary = coord.run()
    finally:
        coord.rundir.close()
    assert summary.iterations == 30
    early, late = snapshots[5], snapshots[30]
    for pool in ("rollout", "train"):
        for key in ("buffers", "allocations", "bytes"):
            assert early[pool][key] == late[pool][key], (pool, key)
        assert late[pool]["overflow"] == 0
        assert 0 < late[pool]["high_water_bytes"] <= late[pool]["bytes"]
    assert slot_objects[5] == slot_objects[30] == late["rollout"]["slots"]
    assert late["rollout"]["slot_overflow"] == 0
    assert late["rollout"]["slots_high_water"] <= late["rollout"]["slots"]
    assert not late["rollout"]["pinned"] or torch.cuda.is_available()


# --------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_pools_keep_inference_apart_from_training_peaks() -> None:
    pools = MemoryPools(MemoryConfig())
    mib = 1 << 20
    with pools.inference():
        keep = torch.empty(32 * mib, dtype=torch.uint8, device="cuda")
        cached = torch.empty(64 * mib, dtype=torch.uint8, device="cuda")
    del cached  # freed, but stays cached in the inference pool
    inference = pools.report()["cuda_inference"]["bytes"]
    assert inference >= 96 * mib
    with pools.training():
        peak = torch.empty(512 * mib, dtype=torch.uint8, device="cuda")
        (peak.float().sum()).item()  # a real kernel, and its temporaries
    report = pools.report()
    assert report["cuda_training"]["bytes"] >= 512 * mib
    assert report["cuda_training"]["high_water_bytes"] >= 512 * mib
    assert report["cuda_inference"]["bytes"] == inference  # the peak went elsewhere
    del peak
    torch.cuda.synchronize()
    assert pools.report()["cuda_inference"]["bytes"] == inference
    # The inference pool's cached block is still there for inference to reuse.
    with pools.inference():
        again = torch.empty(64 * mib, dtype=torch.uint8, device="cuda")
    assert pools.report()["cuda_inference"]["bytes"] == inference
    del again, keep


@pytest.mark.gpu
def test_staging_and_batch_buffers_are_pinned_on_cuda() -> None:
    pools = MemoryPools(MemoryConfig())
    arr = pools.train.grow("x", 16, (8,), np.float32)
    assert torch.from_numpy(arr).is_pinned()
    assert pools.report()["train"]["pinned"] and pools.train.pinned_bytes >= arr.nbytes
    r = pools.ring(fake_spec(), 2)  # trajectory slots are not pinned under "auto"
    assert not torch.from_numpy(r.acquire().tokens).is_pinned()
