"""The sync lane: applies the newest published weights to the inference replicas.

It runs beside the other lanes and loads weights into the standby replica, so inference
keeps serving from the active one during the copy; a version is applied whole or not at
all, and versions published faster than they can be applied are skipped, not queued.
"""

from __future__ import annotations

import asyncio
import time

from dvla.pipeline.lane import Lane
from dvla.pipeline.weights import ReplicaSet, WeightBus


class SyncLane(Lane):
    """Distributes weights from the learner to inference."""

    def __init__(self, bus: WeightBus, replicas: ReplicaSet, timeout_s: float) -> None:
        super().__init__("sync", timeout_s)
        self.bus = bus
        self.replicas = replicas
        self.applied = replicas.active.version
        self.syncs = 0
        #: Seconds the latest applied version took from the lane picking it up to the
        #: replica serving it (waiting for the lane thread included): what a weight sync
        #: costs inference in this process. None until the first one.
        self.last_load_s: float | None = None

    async def apply_newer(self, wait_s: float) -> bool:
        """Apply the newest version if one newer than the applied one arrives within ``wait_s``."""
        got = await self.bus.wait_newer(self.applied, wait_s)
        if got is None:
            return False
        version, state = got
        t0 = time.perf_counter()
        await self.blocking(self.replicas.load, version, state)
        self.last_load_s = time.perf_counter() - t0
        self.applied = version
        self.syncs += 1
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Async mode: apply versions as they are published, until stopped."""
        while not stop.is_set():
            await self.apply_newer(0.25)
