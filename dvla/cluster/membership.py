"""Who is in the cluster, who is alive, and which worker hosts which sampler slot.

Pure bookkeeping, no sockets: the coordinator's cluster server feeds it registrations,
heartbeats and exits and acts on what it answers. Keeping liveness and placement here
makes both testable with a fake clock.

A *slot* is one sampler process of ``pipeline.sample_processes``: a fixed set of env
shards. A slot lives on at most one worker at a time; each placement gets a new
*generation*, so a restarted or re-placed sampler is a new producer on the data plane and
its episodes get group ids no earlier generation used.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from dvla.cluster.protocol import Resources
from dvla.config import ClusterConfig, PlacementConfig

HEALTHY, LATE, DEAD, LEFT = "healthy", "late", "dead", "left"


@dataclass
class Slot:
    """One sampler process's share of the environments."""

    index: int
    shard_envs: list[int]
    first_shard: int
    worker: str | None = None
    generation: int = -1


@dataclass
class WorkerRecord:
    """The coordinator's view of one registered worker."""

    id: str
    name: str
    host: str
    resources: Resources
    capacity: int
    joined: float
    last_seen: float
    state: str = HEALTHY
    slots: set[int] = field(default_factory=set)
    samplers: list[dict[str, Any]] = field(default_factory=list)
    sampler_restarts: int = 0
    reason: str = ""

    @property
    def alive(self) -> bool:
        return self.state in (HEALTHY, LATE)

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "host": self.host,
            "resources": self.resources.to_wire(),
            "capacity": self.capacity,
            "slots": sorted(self.slots),
            "last_heartbeat_s": round(now - self.last_seen, 3),
            "sampler_restarts": self.sampler_restarts,
            "samplers": self.samplers,
            "reason": self.reason,
        }


def split(n: int, parts: int) -> list[int]:
    """``n`` items in ``parts`` near-equal shares, the larger ones first."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def capacity(res: Resources, placement: PlacementConfig) -> int:
    """How many sampler processes fit on a worker with ``res``."""
    fits = [math.inf if placement.processes_per_worker == 0 else placement.processes_per_worker]
    for have, need in (
        (res.cpus, placement.cpus_per_process),
        (res.memory_gb, placement.memory_gb_per_process),
        (res.gpus, placement.gpus_per_process),
    ):
        if need > 0:
            fits.append(math.floor(have / need + 1e-9))
    n = min(fits)
    return 1 << 20 if n == math.inf else int(n)


def refusal(res: Resources, placement: PlacementConfig) -> str | None:
    """Why a worker with ``res`` cannot host even one sampler process, or None."""
    if capacity(res, placement) > 0:
        return None
    return (
        f"placement needs {placement.cpus_per_process:g} CPUs, "
        f"{placement.memory_gb_per_process:g} GB and {placement.gpus_per_process:g} GPUs "
        f"per sampler process; this worker offers {res.cpus} CPUs, {res.memory_gb:g} GB, "
        f"{res.gpus} GPUs"
    )


class Membership:
    """Workers, their liveness, and the slots' placement."""

    def __init__(
        self, cfg: ClusterConfig, slots: list[Slot], generation: int = 0, id_prefix: str = "w"
    ) -> None:
        self.cfg = cfg
        self.id_prefix = id_prefix
        self.slots = slots
        self.workers: dict[str, WorkerRecord] = {}
        #: Placements made so far, across restarts of the coordinator (the data cursor).
        self.generation = generation
        self._next_id = 0

    @property
    def joined_ever(self) -> int:
        """Registrations so far (placement may wait for the first ``min_workers``)."""
        return self._next_id

    def add(self, name: str, host: str, res: Resources, now: float | None = None) -> WorkerRecord:
        """Register a worker (checked by :func:`refusal` first) under a fresh id."""
        now = time.monotonic() if now is None else now
        self._next_id += 1
        rec = WorkerRecord(
            id=f"{self.id_prefix}{self._next_id}",
            name=name[:48],
            host=host[:64],
            resources=res,
            capacity=capacity(res, self.cfg.placement),
            joined=now,
            last_seen=now,
        )
        self.workers[rec.id] = rec
        return rec

    def beat(self, worker_id: str, now: float | None = None) -> WorkerRecord | None:
        """A heartbeat from ``worker_id``; None if it is unknown or already dead."""
        rec = self.workers.get(worker_id)
        if rec is None or not rec.alive:
            return None
        rec.last_seen = time.monotonic() if now is None else now
        rec.state = HEALTHY
        return rec

    def check(self, now: float | None = None) -> list[WorkerRecord]:
        """Mark late and dead workers; return those that just died (their slots freed)."""
        now = time.monotonic() if now is None else now
        died = []
        for rec in self.workers.values():
            if not rec.alive:
                continue
            misses = int((now - rec.last_seen) // self.cfg.heartbeat_timeout_s)
            if misses >= self.cfg.heartbeat_misses:
                self.remove(rec.id, DEAD, f"{misses} heartbeats missed")
                died.append(rec)
            elif misses >= 1:
                rec.state = LATE
        return died

    def remove(self, worker_id: str, state: str, reason: str) -> list[Slot]:
        """Take a worker out (dead or left); its slots become pending again."""
        rec = self.workers[worker_id]
        rec.state, rec.reason = state, reason
        freed = [s for s in self.slots if s.worker == worker_id]
        for slot in freed:
            slot.worker = None
        rec.slots.clear()
        return freed

    def pending(self) -> list[Slot]:
        return [s for s in self.slots if s.worker is None]

    def place(self, eligible: set[str] | None = None) -> list[tuple[WorkerRecord, Slot]]:
        """Put pending slots on healthy workers with room, least loaded first.

        Args:
            eligible: ids of workers that can take work now (connected); None: all.
        """
        out = []
        for slot in self.pending():
            room = [
                w
                for w in self.workers.values()
                if w.state == HEALTHY
                and len(w.slots) < w.capacity
                and (eligible is None or w.id in eligible)
            ]
            if not room:
                break
            target = min(room, key=lambda w: (len(w.slots) / w.capacity, w.joined))
            slot.worker = target.id
            slot.generation = self.generation
            self.generation += 1
            target.slots.add(slot.index)
            out.append((target, slot))
        return out

    def release(self, worker_id: str, slot_index: int) -> None:
        """A worker gave a slot back (it cannot run it any more)."""
        rec = self.workers.get(worker_id)
        if rec is not None:
            rec.slots.discard(slot_index)
        for slot in self.slots:
            if slot.index == slot_index and slot.worker == worker_id:
                slot.worker = None

    def counts(self) -> dict[str, int]:
        out = {HEALTHY: 0, LATE: 0, DEAD: 0, LEFT: 0}
        for rec in self.workers.values():
            out[rec.state] += 1
        return out

    def status(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        placed = sum(s.worker is not None for s in self.slots)
        return {
            "workers": [w.as_dict(now) for w in self.workers.values()],
            "slots": {
                "total": len(self.slots),
                "placed": placed,
                "pending": len(self.slots) - placed,
            },
        }
