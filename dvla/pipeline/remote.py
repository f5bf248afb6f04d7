"""The sample lane run in sampler processes on workers, seen from the coordinator.

The coordinator serves one data-plane port. Workers register on it (see
:mod:`dvla.cluster`) and start the sampler processes placed on them; each sampler process
connects to the same port, asks the infer lane for actions (or runs its own replica) and
ships finished groups, which land in the same trajectory queue the in-process sample lane
feeds. ``dvla run`` starts its workers inside this process (``cluster.local_workers``), so
a single-machine run and a cluster run take the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dvla import logs
from dvla.cluster.protocol import Resources
from dvla.cluster.server import ClusterServer
from dvla.cluster.worker import Worker
from dvla.config import DataPlaneConfig, PipelineFile
from dvla.data import ActionBatch, ObsBatch, TrajectoryGroup
from dvla.errors import ConfigError, LaneError
from dvla.pipeline.stats import Accounting, LaneStats
from dvla.transport.auth import Secret
from dvla.transport.channel import DataPlaneServer

log = logs.get(__name__)


def run_secret(cfg: PipelineFile) -> Secret:
    """The configured secret, else the environment's, else a fresh one for this run."""
    dp = cfg.data_plane
    configured = dp.secret.get_secret_value() if dp.secret is not None else None
    if configured is not None or os.environ.get(dp.secret_env):
        return Secret.resolve(configured, dp.secret_env)
    return Secret.generate()


def listen_config(cfg: PipelineFile) -> DataPlaneConfig:
    """The data-plane settings of the coordinator's one port (``cluster.listen`` wins)."""
    listen = cfg.cluster.listen
    if not listen:
        return cfg.data_plane
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"cluster.listen {listen!r}: expected HOST:PORT")
    return cfg.data_plane.model_copy(update={"host": host.strip("[]"), "port": int(port)})


class RemoteSampleLane:
    """Sampler processes on workers, plus the data-plane server they and the workers use."""

    name = "sample"

    def __init__(
        self,
        cfg: PipelineFile,
        group_size: int,
        accounting: Accounting,
        log_dir: Path,
        secret: Secret | None = None,
        weights: str | None = None,
        generation: int = 0,
    ) -> None:
        self.cfg = cfg
        self.weights = weights
        self.group_size = group_size
        self.accounting = accounting
        self.log_dir = log_dir
        self.stats = LaneStats("sample")
        self.secret = secret or run_secret(cfg)
        # With inference in the samplers, their infer and sync lanes report here.
        self.infer_stats = LaneStats("infer")
        self.sync_stats = LaneStats("sync")
        self.infer_batches = 0
        self.infer_observations = 0
        self.weights_versions: dict[str, int] = {}
        self._remote: dict[str, dict[str, float]] = {}
        self.server: DataPlaneServer | None = None
        self.cluster = ClusterServer(cfg, group_size, accounting, weights, generation)
        self.cluster.on_producer_gone = self._producer_gone
        self.local_workers: list[Worker] = []
        self._busy: dict[str, float] = {}
        self._broken: dict[str, int] = {}
        # Restored from a checkpoint: what producers of earlier runs reported.
        self._broken_base = accounting.episodes_broken

    def _producer_gone(self, producer: str) -> None:
        self.weights_versions.pop(producer, None)

    async def _on_group(
        self,
        group: TrajectoryGroup,
        producer: str,
        stats: dict[str, Any],
        emit: Callable[[TrajectoryGroup], Awaitable[None]],
    ) -> None:
        n = len(group.trajectories)
        if self.cluster.is_fenced(producer):
            self.cluster.record_fenced_delivery(producer, n)
            return
        busy = stats.get("busy_s")
        if isinstance(busy, float | int):
            self._busy[producer] = float(busy)
            self.stats.busy_s = sum(self._busy.values())
        broken = stats.get("episodes_broken")
        if isinstance(broken, int) and not isinstance(broken, bool):
            self._broken[producer] = broken
            self.accounting.episodes_broken = self._broken_base + sum(self._broken.values())
        self._merge_remote(producer, stats)
        self.cluster.record_delivery(producer, n)
        for traj in group.trajectories:
            self.accounting.record_episode(traj.success, traj.length, traj.ret)
        try:
            await emit(group)
        except asyncio.CancelledError:
            # The server is stopping while this group waited for queue room.
            self.accounting.discarded += n
            raise

    def _merge_remote(self, producer: str, stats: dict[str, Any]) -> None:
        """Sum the counters of samplers that run their own infer and sync lanes."""
        keys = ("infer_busy_s", "sync_busy_s", "infer_batches", "infer_observations")
        mine = {k: float(v) for k, v in stats.items() if k in keys and isinstance(v, int | float)}
        if not mine:
            return
        self._remote[producer] = mine
        total = {k: sum(r.get(k, 0.0) for r in self._remote.values()) for k in keys}
        self.infer_stats.busy_s = total["infer_busy_s"]
        self.sync_stats.busy_s = total["sync_busy_s"]
        self.infer_batches = int(total["infer_batches"])
        self.infer_observations = int(total["infer_observations"])
        version = stats.get("weights_version")
        if isinstance(version, int):
            self.weights_versions[producer] = version

    def _local_worker(self, k: int, url: str) -> Worker:
        """A worker inside this process, registering over the same port as remote ones."""
        place = self.cfg.cluster.placement
        res = Resources.detect()
        # Locally the user asked for these processes on this machine: CPU may be
        # oversubscribed (a warning says so); memory and GPUs stay what they are.
        need = math.ceil(self.cfg.pipeline.sample_processes * place.cpus_per_process)
        if need > res.cpus:
            log.warning(
                "sampler processes oversubscribe this host's cores",
                cores=res.cpus,
                processes=self.cfg.pipeline.sample_processes,
            )
            res = Resources(need, res.memory_gb, res.gpus)
        return Worker(
            url,
            self.secret,
            name=f"local{k}",
            resources=res,
            log_dir=self.log_dir,
            data_plane=self.cfg.data_plane,
            give_up_s=self.cfg.cluster.dead_after_s,
        )

    async def run(
        self,
        request: Callable[[ObsBatch], Awaitable[ActionBatch]],
        emit: Callable[[TrajectoryGroup], Awaitable[None]],
        stop: asyncio.Event,
    ) -> None:
        """Serve workers and sampler processes until ``stop``; then tell them to finish."""

        async def on_group(group: TrajectoryGroup, producer: str, stats: dict[str, Any]) -> None:
            await self._on_group(group, producer, stats, emit)

        self.server = DataPlaneServer(
            listen_config(self.cfg), self.secret, request, on_group, on_control=self.cluster.handle
        )
        url = await self.server.start()
        self.cluster.url = url
        self.cluster.sampler_connections = self.server.connections
        self.server.refuse_peer = self.cluster.refuse_peer
        log.info("coordinator listening", url=url, slots=self.cfg.pipeline.sample_processes)
        local_stop = asyncio.Event()
        self.local_workers = [
            self._local_worker(k, url) for k in range(self.cfg.cluster.local_workers)
        ]
        workers = [asyncio.create_task(w.run(local_stop)) for w in self.local_workers]
        try:
            while not stop.is_set():
                await self.cluster.tick()
                for w, task in zip(self.local_workers, workers, strict=True):
                    if task.done() and not task.cancelled():
                        err = task.exception()
                        if err is not None:
                            raise LaneError(
                                f"local worker {w.name} failed: {type(err).__name__}: {err}"
                            ) from err
                        if task.result() != 0:
                            raise LaneError(f"local worker {w.name} failed: {w.exit_reason}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.1)
        finally:
            await self.cluster.stop_workers("run finished", 2.0)
            await self.server.close()
            local_stop.set()
            if workers:
                await asyncio.wait(workers, timeout=15.0)
            for w in self.local_workers:
                w.supervisor.kill_all()

    def in_progress(self) -> int:
        """Remote episodes are counted once delivered, so none are in flight here."""
        return 0

    def close(self) -> None:
        for w in self.local_workers:
            w.supervisor.kill_all()
