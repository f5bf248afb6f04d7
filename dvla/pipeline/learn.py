"""The learn lane: staleness gate, group batching and the algorithm's update.

Every trajectory group is checked against the learner's version when it arrives: older
than ``max_staleness`` versions and it is dropped (and counted); otherwise it waits for
the iteration's batch, where the algorithm may importance-correct it. After each update
the learner publishes a snapshot of its weights to the weight bus for the sync lane.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import numpy as np

from dvla.backends.algorithms.correction import staleness_metrics
from dvla.backends.base import Algorithm, Policy
from dvla.config import PipelineConfig
from dvla.data import TrajectoryGroup
from dvla.errors import TrainingError
from dvla.pipeline.gate import StalenessGate
from dvla.pipeline.lane import Lane
from dvla.pipeline.memory import MemoryPools
from dvla.pipeline.stats import Accounting
from dvla.pipeline.weights import StateDict, WeightBus, snapshot

IterationHook = Callable[[int, dict[str, float]], None]


class LearnLane(Lane):
    """Consumes trajectory groups and steps the optimizer."""

    def __init__(
        self,
        algorithm: Algorithm,
        policy: Policy,
        bus: WeightBus,
        accounting: Accounting,
        cfg: PipelineConfig,
        on_iteration: IterationHook,
        gate: StalenessGate | None = None,
        memory: MemoryPools | None = None,
    ) -> None:
        super().__init__("learn", cfg.lane_timeout_s)
        self.memory = memory
        self.algorithm = algorithm
        self.policy = policy
        self.bus = bus
        self.accounting = accounting
        self.cfg = cfg
        self.on_iteration = on_iteration
        self.version = 0
        self.iteration = 0
        self.pending: list[TrajectoryGroup] = []
        self.staleness_seen: dict[int, int] = {}
        self.gate = gate
        #: Staleness of the groups in the latest update, and groups dropped since the one
        #: before it: the per-iteration distribution the metrics report.
        self.batch_staleness: dict[int, int] = {}
        self.dropped_since_update = 0

    def admit(self, group: TrajectoryGroup) -> bool:
        """Accept ``group`` for the next batch unless it is too stale; count either way."""
        staleness = self.version - group.version
        if staleness > self.cfg.max_staleness:
            self.accounting.dropped_stale += len(group.trajectories)
            self.dropped_since_update += 1
            if self.gate is not None:
                self.gate.finish(1)
            group.release()
            return False
        self.staleness_seen[staleness] = self.staleness_seen.get(staleness, 0) + 1
        self.pending.append(group)
        return True

    @property
    def batch_ready(self) -> bool:
        return len(self.pending) >= self.cfg.groups_per_iteration

    def _update(self, groups: list[TrajectoryGroup]) -> tuple[dict[str, float], StateDict]:
        device = self.memory.training() if self.memory else contextlib.nullcontext()
        try:
            with device:
                metrics = self.algorithm.update(
                    groups, self.version, self.cfg.max_staleness, self.cfg.importance_correction
                )
        finally:
            # Trained on or failed, the batch is done with: its trajectory slots go back
            # to the rollout ring. Released here, in the learn thread, so an await that
            # timed out or was cancelled never frees slots the update is still reading.
            for g in groups:
                g.release()
        state = snapshot(self.policy)
        # A finite loss can still step the weights to inf/NaN (e.g. a huge learning rate);
        # catch it here, before inference samples from a broken policy.
        broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
        if broken:
            raise TrainingError(
                f"weights became NaN or infinite in update {self.iteration + 1} "
                f"(policy version {self.version}, e.g. '{broken[0]}'); "
                "lower the learning rate or check rewards and observations"
            )
        return metrics, state

    async def train(self) -> dict[str, float]:
        """One update on the pending groups; publishes new weights."""
        groups, self.pending = self.pending, []
        count = sum(len(g.trajectories) for g in groups)
        lags: dict[int, int] = {}
        for g in groups:
            lag = self.version - g.version
            lags[lag] = lags.get(lag, 0) + 1
        # Read before the update, which releases the groups' trajectories (see _update).
        step_versions = np.concatenate([t.versions for g in groups for t in g.trajectories])
        try:
            metrics, state = await self.blocking(self._update, groups)
        except BaseException:
            self.accounting.discarded += count
            raise
        finally:
            if self.gate is not None:
                self.gate.finish(len(groups))
        self.accounting.consumed += count
        self.batch_staleness = dict(sorted(lags.items()))
        # Per step, over the whole batch and for every algorithm (an algorithm may train
        # on a subset, e.g. GRPO skips groups without signal).
        metrics.update(staleness_metrics(self.version, step_versions))
        metrics["groups_dropped_stale"] = float(self.dropped_since_update)
        self.dropped_since_update = 0
        self.iteration += 1
        if metrics.get("updated", 1.0):
            self.version += 1
            self.bus.publish(self.version, state)
        metrics["version"] = float(self.version)
        self.on_iteration(self.iteration, metrics)
        return metrics

    async def run(self, queue: asyncio.Queue[TrajectoryGroup], stop: asyncio.Event) -> None:
        """Async mode: train whenever a batch is ready, until stopped."""
        while not stop.is_set():
            try:
                group = await asyncio.wait_for(queue.get(), 0.25)
            except TimeoutError:
                continue
            if self.admit(group) and self.batch_ready:
                await self.train()
