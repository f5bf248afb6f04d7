"""What every lane shares: a dedicated worker thread, busy accounting and timeouts.

Blocking work never runs on the event loop. Each lane owns a small thread pool, so its
blocking calls run in order while different lanes run at the same time; torch and large
numpy operations release the GIL, which is what lets the lanes overlap in one process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dvla.errors import LaneError
from dvla.pipeline.stats import LaneStats

T = TypeVar("T")


class Lane:
    """Base of the four lanes."""

    def __init__(self, name: str, timeout_s: float, threads: int = 1) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.stats = LaneStats(name)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"dvla-{name}")

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in this lane's thread, count it as busy, bound it in time."""
        loop = asyncio.get_running_loop()

        def timed() -> T:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.stats.add(time.perf_counter() - t0)

        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, timed), self.timeout_s)
        except TimeoutError:
            raise LaneError(
                f"{self.name} lane: a step took longer than {self.timeout_s:g} s "
                "(pipeline.lane_timeout_s); the work is hung or far too slow"
            ) from None

    def close(self) -> None:
        """Let running work finish in the background; queue nothing more."""
        self._pool.shutdown(wait=False, cancel_futures=True)
