"""What the coordinator reports: lane shares, batching, memory, weight sync, live status.

The coordinator builds and runs the lanes; these read-only views of them feed
``summary.json``, ``metrics.jsonl``, TensorBoard, ``GET /status`` (and so ``/metrics``
and the dashboard). They live apart so the coordinator's module stays about running.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from dvla.config import PipelineFile
from dvla.data import TrajectoryGroup
from dvla.pipeline.remote import RemoteSampleLane

if TYPE_CHECKING:
    from dvla.control.publisher import WeightPublisher
    from dvla.pipeline.checkpointing import Checkpointer
    from dvla.pipeline.gate import StalenessGate
    from dvla.pipeline.infer import InferLane
    from dvla.pipeline.lane import Lane
    from dvla.pipeline.learn import LearnLane
    from dvla.pipeline.memory import MemoryPools
    from dvla.pipeline.sample import SampleLane
    from dvla.pipeline.stats import Accounting
    from dvla.pipeline.sync import SyncLane


class Reports:
    """Reporting methods of :class:`~dvla.pipeline.coordinator.Coordinator`."""

    cfg: PipelineFile
    state: str
    stop_reason: str
    resumed: dict[str, Any] | None
    accounting: Accounting
    sample: SampleLane | RemoteSampleLane
    infer: InferLane
    learn: LearnLane
    sync: SyncLane
    gate: StalenessGate | None
    memory: MemoryPools
    publisher: WeightPublisher | None
    checkpoints: Checkpointer
    _lanes: list[Lane | RemoteSampleLane]
    _queue: asyncio.Queue[TrajectoryGroup] | None
    _t0: float
    _base: tuple[int, int]

    def lane_shares(self, wall: float | None = None) -> dict[str, dict[str, float]]:
        """Busy seconds and busy share of wall time, per lane.

        With inference in the sampler processes, their infer and sync lanes are what
        counts (summed over processes), not the coordinator's idle ones.
        """
        wall = max(wall if wall is not None else time.perf_counter() - self._t0, 1e-9)
        stats = {lane.name: lane.stats for lane in self._lanes}
        if self.publisher is not None and isinstance(self.sample, RemoteSampleLane):
            stats["infer"], stats["sync"] = self.sample.infer_stats, self.sample.sync_stats
        return {
            name: {"busy_s": round(st.busy_s, 4), "share": round(st.busy_s / wall, 4)}
            for name, st in stats.items()
        }

    def infer_mean_batch(self) -> float:
        """Observations per policy forward, wherever inference runs."""
        if self.publisher is not None and isinstance(self.sample, RemoteSampleLane):
            s = self.sample
            return s.infer_observations / s.infer_batches if s.infer_batches else 0.0
        return self.infer.mean_batch()

    def infer_report(self) -> dict[str, Any]:
        """Achieved batching of policy forwards, wherever inference runs."""
        if self.publisher is not None and isinstance(self.sample, RemoteSampleLane):
            s = self.sample
            return {
                "forwards": s.infer_batches,
                "observations": s.infer_observations,
                "mean_batch": round(self.infer_mean_batch(), 3),
                "max_batch": self.cfg.pipeline.infer.max_batch,
                "max_wait_ms": self.cfg.pipeline.infer.max_wait_ms,
                "where": "samplers",
            }
        return {**self.infer.report(), "where": "coordinator"}

    def memory_report(self) -> dict[str, dict[str, Any]]:
        """Each memory pool's size, use, high-water mark and overflow (see memory.py)."""
        return self.memory.report()

    def weight_sync(self) -> dict[str, Any]:
        """Weight-plane figures for the summary: rounds, their times, failures."""
        pub = self.publisher
        if pub is None:
            return {}
        reports = list(pub.reports)
        secs = sorted(r.seconds for r in reports)
        out: dict[str, Any] = {
            "backend": reports[-1].backend if reports else "",
            "rounds": len(reports),
            "failed_rounds": sum(not r.ok for r in reports),
            "bytes": reports[-1].bytes if reports else 0,
            "round_s_median": round(secs[len(secs) // 2], 4) if secs else 0.0,
            "round_s_max": round(secs[-1], 4) if secs else 0.0,
            "receivers": pub.members(),
            "dropped": list(pub.dropped),
        }
        if isinstance(self.sample, RemoteSampleLane):
            out["sampler_versions"] = dict(self.sample.weights_versions)
        return out

    def queue_depths(self) -> dict[str, int]:
        """Trajectory groups waiting for the learner and requests waiting for a forward.

        A full trajectory queue means the learner is the bottleneck; a growing request
        queue, inference. Empty in sync mode, where nothing waits in a queue.
        """
        if self._queue is None:
            return {}
        return {"trajectory_groups": self._queue.qsize(), "infer_requests": self.infer.queued()}

    def latest_weight_sync_s(self) -> float | None:
        """Seconds the newest version took to reach inference; None before the first.

        With replicas in sampler processes that is the weight plane's latest round;
        otherwise the sync lane's latest load into the standby replica.
        """
        if self.publisher is not None:
            reports = self.publisher.reports
            return round(reports[-1].seconds, 6) if reports else None
        last = self.sync.last_load_s
        return None if last is None else round(last, 6)

    def status(self) -> dict[str, Any]:
        """The live picture GET /status serves (and /metrics is rendered from)."""
        wall = max(time.perf_counter() - self._t0, 1e-9)
        acc = self.accounting
        out: dict[str, Any] = {
            "name": self.cfg.name,
            "state": self.state,
            "stop_reason": self.stop_reason,
            "uptime_s": round(wall, 3),
            "iteration": self.learn.iteration,
            "policy_version": self.learn.version,
            # Rates over this process's life: a resumed run restores the totals only.
            "throughput": {
                "env_steps": acc.env_steps,
                "env_steps_per_s": round((acc.env_steps - self._base[0]) / wall, 2),
                "trajectories_per_s": round((acc.produced - self._base[1]) / wall, 2),
            },
            "success_rate": round(acc.success_rate(), 4),
            "lanes": self.lane_shares(wall),
            "accounting": acc.as_dict(),
            "infer_mean_batch": round(self.infer_mean_batch(), 3),
            "infer": self.infer_report(),
            "queues": self.queue_depths(),
            "memory": self.memory_report(),
            "staleness_gate": self.gate.status() if self.gate else {},
            "policy_versions": {"learner": self.learn.version},
            "checkpoint": self.checkpoints.status(),
            "resumed": self.resumed,
            "workers": [],
            "slots": {"total": 0, "placed": 0, "pending": 0},
        }
        if isinstance(self.sample, RemoteSampleLane):
            out.update(self.sample.cluster.status())
            out["url"] = self.sample.cluster.url
            out["policy_versions"]["samplers"] = dict(self.sample.weights_versions)
        return out
