"""Busy-time and accounting counters the coordinator reports.

Busy time is the wall time a lane spends inside its blocking work (a simulator step, a
forward, a backward, a weight load), measured around the call in the lane's own thread;
busy share is that divided by the run's wall time. Accounting follows every trajectory
from production to its fate, so nothing can vanish or be counted twice unnoticed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class LaneStats:
    """Counters of one lane."""

    name: str
    busy_s: float = 0.0
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, seconds: float) -> None:
        with self._lock:
            self.busy_s += seconds
            self.calls += 1


@dataclass
class Accounting:
    """Where every trajectory went.

    ``produced == consumed + dropped_stale + discarded + discarded_dead_worker +
    in_flight`` holds at every instant, where ``in_flight`` counts trajectories waiting in
    queues or in groups not yet complete (see :meth:`in_flight`). A trajectory is produced
    when the coordinator receives it. ``episodes_lost`` counts episodes sampler processes
    started but never delivered because the process crashed or its worker died (exact for
    a crash, as of the worker's last heartbeat for a dead worker).

    ``window`` and ``returns`` are the most recent episodes' successes and returns (the
    sum of an episode's rewards); ``returns`` keeps as many episodes as ``window``, so
    the rolling success rate and the rolling mean return describe the same episodes.
    """

    produced: int = 0
    consumed: int = 0
    dropped_stale: int = 0
    discarded: int = 0
    discarded_dead_worker: int = 0
    episodes_lost: int = 0
    #: Episodes voided because their simulator process broke, and run again from start.
    episodes_broken: int = 0
    env_steps: int = 0
    episodes_success: int = 0
    window: deque[bool] = field(default_factory=lambda: deque(maxlen=256))
    returns: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    def __post_init__(self) -> None:
        if self.returns.maxlen != self.window.maxlen:
            self.returns = deque(self.returns, maxlen=self.window.maxlen)

    def in_flight(self) -> int:
        return (
            self.produced
            - self.consumed
            - self.dropped_stale
            - self.discarded
            - self.discarded_dead_worker
        )

    def record_episode(self, success: bool, steps: int, ret: float | None = None) -> None:
        """Count one finished episode; ``ret`` (its return) feeds :meth:`return_mean`."""
        self.produced += 1
        self.env_steps += steps
        self.episodes_success += int(success)
        self.window.append(success)
        if ret is not None:
            self.returns.append(ret)

    def success_rate(self) -> float:
        return sum(self.window) / len(self.window) if self.window else 0.0

    def return_mean(self) -> float:
        """Mean return of the most recent episodes (0.0 before the first)."""
        return sum(self.returns) / len(self.returns) if self.returns else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "produced": self.produced,
            "consumed": self.consumed,
            "dropped_stale": self.dropped_stale,
            "discarded": self.discarded,
            "discarded_dead_worker": self.discarded_dead_worker,
            "episodes_lost": self.episodes_lost,
            "episodes_broken": self.episodes_broken,
            "in_flight": self.in_flight(),
            "env_steps": self.env_steps,
            "success_rate": round(self.success_rate(), 4),
            "return_mean": round(self.return_mean(), 4),
        }


class Stopwatch:
    """Context manager adding the elapsed wall time of a block to a :class:`LaneStats`."""

    def __init__(self, stats: LaneStats) -> None:
        self.stats = stats
        self._t0 = 0.0

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stats.add(time.perf_counter() - self._t0)
