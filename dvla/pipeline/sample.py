"""The sample lane: simulators stepped in shards, episodes assembled into groups.

Environments are split into shards, each with its own simulator instance and its own
coroutine, so while one shard waits for the inference lane another is stepping: that is
how simulation and inference overlap (the double-buffered sampling of Sample Factory).
Episodes are handed out group by group, G episodes of one (task, initial state), because
GRPO normalises rewards within such a group; a group leaves the lane once its G
trajectories are all finished, whichever shards ran them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from dvla.backends.base import Simulator, SimulatorSpec
from dvla.data import ActionBatch, ObsBatch, StepBatch, Trajectory, TrajectoryGroup
from dvla.errors import DvlaError, SimulatorError
from dvla.pipeline.gate import StalenessGate
from dvla.pipeline.lane import Lane
from dvla.pipeline.memory import BufferPool, TrajectoryRing
from dvla.pipeline.staging import ObsStage
from dvla.pipeline.stats import Accounting

Episode = tuple[int, int, int]  # (group id, task id, initial-state id)


def start_simulator(
    sim_cls: type[Simulator], options: Any, name: str, num_envs: int, seed: int
) -> Simulator:
    """Start a simulator; a backend's own exception becomes one line naming the backend.

    Raises:
        SimulatorError: the backend raised something other than a dvla error.
    """
    try:
        return sim_cls(options, num_envs, seed)
    except DvlaError:
        raise
    except Exception as err:
        raise SimulatorError(
            f"simulator '{name}' failed to start: {type(err).__name__}: {err}"
        ) from err


def probe_spec(sim_cls: type[Simulator], options: Any, name: str, seed: int) -> SimulatorSpec:
    """The simulator's spec: from :meth:`Simulator.describe`, else from one started env.

    For a process that needs the spec but runs no environments of its own (the
    coordinator when simulators live in sampler processes, ``dvla export``).
    """
    spec = sim_cls.describe(options)
    if spec is not None:
        return spec
    probe = start_simulator(sim_cls, options, name, 1, seed)
    try:
        return probe.spec
    finally:
        probe.close()


class EpisodeSource:
    """Hands out episodes, G at a time per (task, initial state); thread-safe.

    With a budget (sync mode) it hands out only the episodes of the groups allowed so far,
    so an iteration runs exactly the groups it trains on.
    """

    def __init__(
        self,
        tasks: list[int],
        group_size: int,
        seed: int,
        limited: bool,
        group_offset: int = 0,
        group_stride: int = 1,
        gate: StalenessGate | None = None,
    ) -> None:
        self._num_init = tasks
        self.gate = gate
        # Sampler processes draw group ids offset, offset + stride, ...: unique run-wide.
        self._offset = group_offset
        self._stride = group_stride
        self._g = group_size
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._queue: deque[Episode] = deque()
        self._next_group = 0
        self._limited = limited
        self._allowed = 0

    def allow(self, groups: int) -> None:
        """Sync mode: permit ``groups`` more groups."""
        with self._lock:
            self._allowed += groups

    def take(self, n: int) -> list[Episode]:
        """Up to ``n`` episodes (fewer only when a budget is exhausted)."""
        out: list[Episode] = []
        with self._lock:
            while len(out) < n:
                if not self._queue:
                    if self._limited:
                        if self._allowed == 0:
                            break
                        self._allowed -= 1
                    if self.gate is not None and not self.gate.try_start():
                        break
                    task = int(self._rng.integers(len(self._num_init)))
                    init = int(self._rng.integers(self._num_init[task]))
                    gid = self._offset + self._next_group * self._stride
                    self._next_group += 1
                    self._queue.extend([(gid, task, init)] * self._g)
                out.append(self._queue.popleft())
        return out


class GroupAssembler:
    """Collects finished trajectories until each group has all G of them."""

    def __init__(self, group_size: int) -> None:
        self._g = group_size
        self._open: dict[int, TrajectoryGroup] = {}

    def add(self, traj: Trajectory) -> TrajectoryGroup | None:
        group = self._open.get(traj.group_id)
        if group is None:
            group = TrajectoryGroup(traj.group_id, traj.task_id, traj.init_state_id)
            self._open[traj.group_id] = group
        group.trajectories.append(traj)
        if len(group.trajectories) == self._g:
            return self._open.pop(traj.group_id)
        return None

    def pending(self) -> int:
        """Trajectories waiting for the rest of their group."""
        return sum(len(g.trajectories) for g in self._open.values())


class EnvShard:
    """One simulator instance and the episode buffers of its environments.

    Per-step data is written into arrays of the rollout pool, preallocated for the whole
    run (one row per environment, one slot per step); the observations of the active
    environments are composed into two alternating staging buffers of the pool; with a
    ``ring``, a finished episode is copied into a ring slot and the trajectory's arrays are
    views of it until it is released. So the steady state allocates no large arrays.
    Without a ring (evaluation, tests) each trajectory gets its own arrays, as it must when
    its consumer keeps it. All methods block and run in the sample lane's threads.
    """

    def __init__(
        self,
        shard_id: str,
        sim: Simulator,
        sim_name: str,
        source: EpisodeSource,
        pool: BufferPool | None = None,
        ring: TrajectoryRing | None = None,
    ) -> None:
        self.id = shard_id
        self.sim = sim
        self.sim_name = sim_name
        self.source = source
        self.pool = pool = pool if pool is not None else BufferPool("rollout")
        self.ring = ring
        spec = sim.spec
        n, t = sim.num_envs, spec.max_episode_steps
        d = spec.action_dim
        if ring is not None and ring.max_steps < t:
            raise ValueError(f"ring slots hold {ring.max_steps} steps; episodes take up to {t}")
        # Never copied to a device as they are (trajectories are), so never pinned.
        self.images = {
            cam: pool.allocate((n, t, h, w, 3), np.uint8, pin=False)
            for cam, (h, w) in spec.cameras.items()
        }
        self.proprio = pool.allocate((n, t, spec.proprio_dim), np.float32, pin=False)
        self.tokens = pool.allocate((n, t, d), np.int64, pin=False)
        self.logprobs = pool.allocate((n, t, d), np.float32, pin=False)
        self.versions = pool.allocate((n, t), np.int64, pin=False)
        self.rewards = pool.allocate((n, t), np.float32, pin=False)
        self._stage = ObsStage(pool, f"shard:{shard_id}", n, buffers=2)
        self.t = np.zeros(n, np.int64)
        self.episode: list[Episode | None] = [None] * n
        self.active_ids = np.zeros(0, np.int64)
        self.obs: ObsBatch | None = None
        self._seq = 0
        self._max_t = t
        #: Episodes voided because the simulator broke under them (each was run again).
        self.broken = 0

    @property
    def has_active(self) -> bool:
        return len(self.active_ids) > 0

    def _call(self, what: str, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except Exception as err:
            raise SimulatorError(
                f"simulator '{self.sim_name}' raised {type(err).__name__} in {what}: {err}"
            ) from err

    def refill(self) -> None:
        """Start episodes in idle environments, as many as the source hands out."""
        idle = [i for i, e in enumerate(self.episode) if e is None]
        eps = self.source.take(len(idle)) if idle else []
        if not eps:
            return
        ids = np.array(idle[: len(eps)], np.int64)
        for i, ep in zip(ids, eps, strict=True):
            self.episode[int(i)] = ep
        self.t[ids] = 0
        tasks = np.array([e[1] for e in eps], np.int64)
        inits = np.array([e[2] for e in eps], np.int64)
        obs = self._call("reset", lambda: self.sim.reset(ids, tasks, inits))
        assert isinstance(obs, ObsBatch)
        self._merge(ids, obs)

    def _merge(self, ids: np.ndarray, obs: ObsBatch) -> None:
        if self.obs is None or not self.has_active:
            self.active_ids, self.obs = ids, obs
        else:
            self.active_ids = np.concatenate([self.active_ids, ids])
            self.obs = self._stage.stack([self.obs, obs])

    def advance(self, act: ActionBatch) -> tuple[list[Trajectory], int]:
        """Apply actions to the active environments; return finished episodes and steps taken."""
        ids, obs = self.active_ids, self.obs
        assert obs is not None and len(ids) == len(act.actions)
        t = self.t[ids]
        for cam, arr in self.images.items():
            arr[ids, t] = obs.images[cam]
        self.proprio[ids, t] = obs.proprio
        self.tokens[ids, t] = act.tokens
        self.logprobs[ids, t] = act.logprobs
        self.versions[ids, t] = act.version
        step = self._call("step", lambda: self.sim.step(ids, act.actions))
        assert isinstance(step, StepBatch)
        self.rewards[ids, t] = step.reward
        self.t[ids] = t + 1
        broken = np.zeros(len(ids), bool) if step.broken is None else np.asarray(step.broken)
        done = (np.asarray(step.done, bool) | (t + 1 >= self._max_t)) & ~broken
        finished = [
            self._finish(int(i), bool(s))
            for i, s in zip(ids[done], step.success[done], strict=True)
        ]
        keep = np.flatnonzero(~done & ~broken)
        self.active_ids = ids[keep]
        if len(keep) == len(ids):
            self.obs = step.obs  # nothing finished: the simulator's batch as it is
        else:
            self.obs = self._stage.compose([(step.obs, keep)]) if len(keep) else None
        if broken.any():
            self._restart(ids[broken])
        self.refill()
        return finished, len(ids)

    def _restart(self, ids: np.ndarray) -> None:
        """Run the episodes of ``ids`` again from their start: same group, task and state.

        Rerunning keeps the group complete (GRPO compares rollouts of one initial state)
        while nothing from the broken run is kept.
        """
        self.broken += len(ids)
        self.t[ids] = 0
        eps = [self.episode[int(i)] for i in ids]
        assert all(e is not None for e in eps)
        tasks = np.array([e[1] for e in eps if e is not None], np.int64)
        inits = np.array([e[2] for e in eps if e is not None], np.int64)
        obs = self._call("reset", lambda: self.sim.reset(ids, tasks, inits))
        assert isinstance(obs, ObsBatch)
        self._merge(ids, obs)

    def _finish(self, i: int, success: bool) -> Trajectory:
        ep = self.episode[i]
        assert ep is not None
        n = int(self.t[i])
        self.episode[i] = None
        self._seq += 1
        slot = self.ring.acquire() if self.ring is not None else None

        def out(src: np.ndarray, dst: np.ndarray | None) -> np.ndarray:
            if dst is None:
                return src[i, :n].copy()
            dst[:n] = src[i, :n]
            return dst[:n]

        traj = Trajectory(
            producer=self.id,
            seq=self._seq,
            group_id=ep[0],
            task_id=ep[1],
            init_state_id=ep[2],
            instruction=self.sim.spec.tasks[ep[1]].instruction,
            images={
                cam: out(arr, slot.images[cam] if slot else None)
                for cam, arr in self.images.items()
            },
            proprio=out(self.proprio, slot.proprio if slot else None),
            tokens=out(self.tokens, slot.tokens if slot else None),
            logprobs=out(self.logprobs, slot.logprobs if slot else None),
            versions=out(self.versions, slot.versions if slot else None),
            rewards=out(self.rewards, slot.rewards if slot else None),
            success=success,
        )
        if slot is not None:
            traj.attach_release(slot.release)
        return traj

    def close(self) -> None:
        self.sim.close()


class SampleLane(Lane):
    """Steps the shards and emits complete trajectory groups."""

    def __init__(
        self,
        shards: list[EnvShard],
        group_size: int,
        accounting: Accounting,
        timeout_s: float,
    ) -> None:
        super().__init__("sample", timeout_s, threads=len(shards))
        self.shards = shards
        self.assembler = GroupAssembler(group_size)
        self.accounting = accounting
        # Sync mode stacks every shard's observations into one forward: rows reused.
        envs = sum(s.sim.num_envs for s in shards)
        self._stage = ObsStage(shards[0].pool, "sample:sync", envs) if shards else None

    def _collect(self, trajs: list[Trajectory]) -> list[TrajectoryGroup]:
        groups = []
        for traj in trajs:
            self.accounting.record_episode(traj.success, traj.length, traj.ret)
            group = self.assembler.add(traj)
            if group is not None:
                groups.append(group)
        return groups

    async def run_shard(
        self,
        shard: EnvShard,
        request: Callable[[ObsBatch], Awaitable[ActionBatch]],
        emit: Callable[[TrajectoryGroup], Awaitable[None]],
        stop: asyncio.Event,
    ) -> None:
        """Async mode: step one shard until stopped; ``emit`` applies backpressure."""
        gate = shard.source.gate
        await self.blocking(shard.refill)
        while not stop.is_set():
            if not shard.has_active:
                if gate is None:
                    break
                # Every environment idle: the staleness gate holds new groups back
                # until the learner catches up.
                await gate.wait_open(stop)
                if not stop.is_set():
                    await self.blocking(shard.refill)
                continue
            assert shard.obs is not None
            act = await request(shard.obs)
            finished, _ = await self.blocking(shard.advance, act)
            self.accounting.episodes_broken = sum(s.broken for s in self.shards)
            for group in self._collect(finished):
                await emit(group)

    async def rollout(
        self,
        n_groups: int,
        forward: Callable[[ObsBatch], Awaitable[ActionBatch]],
    ) -> list[TrajectoryGroup]:
        """Sync mode: run exactly ``n_groups`` groups to completion, one stage at a time."""
        self.shards[0].source.allow(n_groups)
        for shard in self.shards:
            await self.blocking(shard.refill)
        out: list[TrajectoryGroup] = []
        while len(out) < n_groups:
            active = [s for s in self.shards if s.has_active]
            if not active:
                raise SimulatorError("sync rollout ran out of episodes before its groups finished")
            assert self._stage is not None  # there are shards: some are active
            obs = self._stage.stack([s.obs for s in active if s.obs is not None])
            act = await forward(obs)
            start = 0
            for shard in active:
                n = len(shard.active_ids)
                finished, _ = await self.blocking(shard.advance, act.slice(start, start + n))
                self.accounting.episodes_broken = sum(s.broken for s in self.shards)
                start += n
                out.extend(self._collect(finished))
        return out

    def in_progress(self) -> int:
        """Episodes running or finished but waiting for their group."""
        return self.assembler.pending()

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        super().close()
