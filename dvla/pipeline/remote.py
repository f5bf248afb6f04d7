"""The sample lane run in sampler processes, seen from the coordinator.

The coordinator serves the data plane; each sampler process connects, asks the infer lane
for actions and ships finished groups, which land in the same trajectory queue the
in-process sample lane feeds. A sampler process that exits while the run goes on fails
the run with its exit code and the end of its log (restarting simulator processes is the
worker daemon's job).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dvla import logs
from dvla.config import PipelineFile
from dvla.data import ActionBatch, ObsBatch, TrajectoryGroup
from dvla.errors import LaneError
from dvla.pipeline.stats import Accounting, LaneStats
from dvla.transport.auth import Secret
from dvla.transport.channel import DataPlaneServer

log = logs.get(__name__)


def _split(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def run_secret(cfg: PipelineFile) -> Secret:
    """The configured secret, else the environment's, else a fresh one for this run."""
    dp = cfg.data_plane
    configured = dp.secret.get_secret_value() if dp.secret is not None else None
    if configured is not None or os.environ.get(dp.secret_env):
        return Secret.resolve(configured, dp.secret_env)
    return Secret.generate()


def assignment(
    cfg: PipelineFile,
    url: str,
    index: int,
    shard_envs: list[int],
    first_shard: int,
    group_size: int,
    weights: str | None = None,
) -> dict[str, Any]:
    """The JSON document a sampler process reads on stdin.

    ``weights`` is the weight publisher's address when the sampler runs its own
    inference replica.
    """
    return {
        "config": cfg.model_dump(mode="json"),
        "group_size": group_size,
        "url": url,
        "index": index,
        "shard_envs": shard_envs,
        "first_shard": first_shard,
        "weights": weights,
    }


class RemoteSampleLane:
    """Sampler processes plus the data-plane server they talk to."""

    name = "sample"

    def __init__(
        self,
        cfg: PipelineFile,
        group_size: int,
        accounting: Accounting,
        log_dir: Path,
        secret: Secret | None = None,
        weights: str | None = None,
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
        self.procs: list[asyncio.subprocess.Process] = []
        self._busy: dict[str, float] = {}

    def _log_path(self, k: int) -> Path:
        return self.log_dir / f"sampler{k}.log"

    async def _spawn(self, url: str) -> None:
        p = self.cfg.pipeline
        shards = _split(p.num_envs, p.shards)
        per_proc = _split(p.shards, p.sample_processes)
        env = {**os.environ, self.cfg.data_plane.secret_env: self.secret.value.decode()}
        first = 0
        for k, count in enumerate(per_proc):
            doc = assignment(
                self.cfg,
                url,
                k,
                shards[first : first + count],
                first,
                self.group_size,
                self.weights,
            )
            first += count
            with open(self._log_path(k), "wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "dvla.pipeline.sampler_process",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=err,
                    env=env,
                )
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(doc).encode())
            await asyncio.wait_for(proc.stdin.drain(), 10)
            proc.stdin.close()
            self.procs.append(proc)

    async def _on_group(
        self,
        group: TrajectoryGroup,
        producer: str,
        stats: dict[str, Any],
        emit: Callable[[TrajectoryGroup], Awaitable[None]],
    ) -> None:
        busy = stats.get("busy_s")
        if isinstance(busy, float | int):
            self._busy[producer] = float(busy)
            self.stats.busy_s = sum(self._busy.values())
        self._merge_remote(producer, stats)
        for traj in group.trajectories:
            self.accounting.record_episode(traj.success, traj.length)
        try:
            await emit(group)
        except asyncio.CancelledError:
            # The server is stopping while this group waited for queue room.
            self.accounting.discarded += len(group.trajectories)
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

    def _tail(self, k: int) -> str:
        try:
            lines = self._log_path(k).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][-300:] if lines else ""

    async def run(
        self,
        request: Callable[[ObsBatch], Awaitable[ActionBatch]],
        emit: Callable[[TrajectoryGroup], Awaitable[None]],
        stop: asyncio.Event,
    ) -> None:
        """Serve the sampler processes until ``stop``; then tell them to finish."""

        async def on_group(group: TrajectoryGroup, producer: str, stats: dict[str, Any]) -> None:
            await self._on_group(group, producer, stats, emit)

        self.server = DataPlaneServer(self.cfg.data_plane, self.secret, request, on_group)
        url = await self.server.start()
        log.info("data plane listening", url=url, processes=self.cfg.pipeline.sample_processes)
        try:
            await self._spawn(url)
            while not stop.is_set():
                for k, proc in enumerate(self.procs):
                    if proc.returncode is not None:
                        raise LaneError(
                            f"sampler process {k} exited with code {proc.returncode}: "
                            f"{self._tail(k) or 'no output'} (log: {self._log_path(k)})"
                        )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
        finally:
            await self.server.close()
            await self._reap(10.0)

    async def _reap(self, timeout: float) -> None:
        """Wait for the processes to leave after CLOSE; kill any that do not."""
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("sampler process did not exit; killing it", pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    def in_progress(self) -> int:
        """Remote episodes are counted once delivered, so none are in flight here."""
        return 0

    def close(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
