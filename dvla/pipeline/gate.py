"""Admission control for rollouts: do not start what the learner would have to drop.

The learner drops a group that lags it by more than ``max_staleness`` versions, which
bounds staleness but wastes the simulation that produced it. The gate avoids most of that
waste at the source: a new group may start only while

* fewer than ``groups_per_iteration x (max_staleness + 1)`` groups are open (started and
  not yet consumed, dropped or discarded by the learner), and
* the policy acting for the samplers is at most ``max_staleness`` versions behind the
  learner.

With ``max_staleness: 0`` this makes the asynchronous pipeline produce only on-policy
data: the learner cannot update until every open group (at most one batch) has finished,
and no group starts before the acting replica has the learner's newest weights. With a
larger bound it is the staleness-aware admission of AReaL-style asynchronous RL; the
learner's drop stays the guarantee, since a very long episode can still fall behind.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


def gate_capacity(groups_per_iteration: int, max_staleness: int) -> int:
    """Most rollout groups the gate lets be open at once (memory sizing relies on it too)."""
    return groups_per_iteration * (max_staleness + 1)


class StalenessGate:
    """Counts open rollout groups and says whether another may start; thread-safe."""

    def __init__(
        self,
        groups_per_iteration: int,
        max_staleness: int,
        learner_version: Callable[[], int],
        acting_version: Callable[[], int],
    ) -> None:
        self.capacity = gate_capacity(groups_per_iteration, max_staleness)
        self.max_staleness = max_staleness
        self._learner_version = learner_version
        self._acting_version = acting_version
        self._lock = threading.Lock()
        self.open_groups = 0
        #: Times a group was held back (for the run's report).
        self.held = 0
        self._was_closed = False

    def _allows(self) -> bool:
        if self.open_groups >= self.capacity:
            return False
        return self._acting_version() >= self._learner_version() - self.max_staleness

    def would_allow(self) -> bool:
        """Whether :meth:`try_start` would succeed now (a cheap check for polling)."""
        with self._lock:
            return self._allows()

    def try_start(self) -> bool:
        """Open a group if the gate allows it."""
        with self._lock:
            if not self._allows():
                if not self._was_closed:
                    self.held += 1
                    self._was_closed = True
                return False
            self._was_closed = False
            self.open_groups += 1
            return True

    def finish(self, groups: int = 1) -> None:
        """The learner is done with ``groups`` groups (consumed, dropped or discarded)."""
        with self._lock:
            self.open_groups = max(0, self.open_groups - groups)

    async def wait_open(self, stop: asyncio.Event, poll_s: float = 0.005) -> None:
        """Return once a group could start, or ``stop`` is set.

        Polls: what opens the gate is the learner consuming groups and the sync lane
        swapping weights in, both on this event loop, so a short sleep costs nothing
        while the shard has nothing else to do.
        """
        while not stop.is_set() and not self.would_allow():
            await asyncio.sleep(poll_s)

    def status(self) -> dict[str, int]:
        return {"open_groups": self.open_groups, "capacity": self.capacity, "held": self.held}
