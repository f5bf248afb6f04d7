"""Two memory pools: rollout memory (simulation, inference) and training memory.

Allocating an episode's worth of frames for every finished trajectory, and a fresh batch
for every forward and every update, churns the allocator at exactly the rate the pipeline
runs, and on a GPU host a training peak can then fragment or evict what inference keeps
cached. So memory is split by role and preallocated:

* the **rollout** pool holds the per-environment step arrays of each shard, the staging
  rows observations are batched into, and a :class:`TrajectoryRing` of finished-trajectory
  slots; trajectories are views of a slot until the learner is done with them;
* the **train** pool holds the grow-only buffers learner batches are flattened into;
* on CUDA, the policy's inference and training allocations go to two separate
  ``torch.cuda.MemPool`` caching pools (:meth:`MemoryPools.inference`,
  :meth:`MemoryPools.training`).

A steady-state run allocates no pool buffer after warm-up: the buffer and allocation
counts of :meth:`MemoryPools.report` stay constant, which ``tests/test_memory.py`` checks.

Ring sizing. A finished trajectory holds its slot until it is consumed, dropped or
discarded (running episodes write into the shards' per-environment arrays, not slots).
With in-process sample lanes (all shards of a lane share one ring) that is at most:
``queue_groups`` groups in the trajectory queue; one batch (``groups_per_iteration``
groups) pending at or inside the learner; the groups one step of each shard completes at
once (at most its environments plus a group); and the finished members of groups still
waiting for the rest (measured on toy: up to about 1.3 x num_envs). So, with
``batch = groups_per_iteration * group_size``::

    slots = queue_groups * group_size + 2 * batch + 2 * num_envs      (async)
    slots = min(slots, batch * (max_staleness + 1))   with pipeline.staleness_gate
    slots = batch                                                     (sync)

The gate's bound is exact: it never lets more than ``groups_per_iteration x
(max_staleness + 1)`` groups be open. A sampler process keeps each group until the
coordinator acknowledges it (at most ``data_plane.unacked_chunks`` groups) plus what its
shards emit and assemble: ``(unacked_chunks + 2 * shards) * group_size + 2 * envs``.

Sizing is a promise about the steady state, not a hard limit: a full ring hands out
fresh arrays, counted as ``overflow``, so a mis-sized ring costs allocations, never a
deadlock. Slots are reused last-released-first, so unpinned memory the kernel commits
stays near the high-water mark even where the capacity is generous.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dvla import logs
from dvla.backends.base import SimulatorSpec
from dvla.config import MemoryConfig, PipelineConfig
from dvla.pipeline.gate import gate_capacity

log = logs.get(__name__)


def cuda_available() -> bool:
    """Whether a CUDA device is usable (pinned memory and MemPools need one)."""
    return torch.cuda.is_available()


def _zeros(shape: tuple[int, ...], dtype: np.dtype[Any], pin: bool) -> np.ndarray:
    """A zeroed array; page-locked through a torch tensor it keeps alive when ``pin``."""
    if not pin:
        return np.zeros(shape, dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    tensor = torch.zeros(max(nbytes, dtype.itemsize), dtype=torch.uint8, pin_memory=True)
    # The array's base chain ends in the tensor, which keeps the pinned block alive.
    return tensor.numpy()[:nbytes].view(dtype).reshape(shape)


class BufferPool:
    """Buffers of one role, with byte accounting; thread-safe.

    Two kinds of buffer: permanent ones (:meth:`allocate`), reserved once, and keyed
    grow-only ones (:meth:`grow`) that are reused for every request of at most their size.
    ``in_use`` counts what is currently handed out (trajectory slots, the rows of the
    latest staged batch); ``high_water`` is its maximum over the run.
    """

    def __init__(self, name: str, pinned: bool = False) -> None:
        self.name = name
        self.pinned = pinned
        self._lock = threading.Lock()
        #: Live buffers the pool holds (permanent and grow-only).
        self.buffers = 0
        #: Arrays the pool has ever allocated (a grown buffer counts again).
        self.allocations = 0
        self.reserved_bytes = 0
        self.pinned_bytes = 0
        self.in_use_bytes = 0
        self.high_water_bytes = 0
        #: Requests served by a fresh, unpooled allocation because the pool was full.
        self.overflow = 0
        self.overflow_bytes = 0
        #: Rows a grow-only buffer of this pool starts with when its user gives no size:
        #: the largest batch the config allows, so it never has to grow mid-run.
        self.min_rows = 0
        self._keyed: dict[str, np.ndarray] = {}
        self._keyed_use: dict[str, int] = {}

    def _new(self, shape: tuple[int, ...], dtype: np.dtype[Any], pin: bool | None) -> np.ndarray:
        pin = self.pinned if pin is None else pin
        arr = _zeros(shape, dtype, pin)
        self.buffers += 1
        self.allocations += 1
        self.reserved_bytes += arr.nbytes
        self.pinned_bytes += arr.nbytes if pin else 0
        return arr

    def _forget(self, arr: np.ndarray) -> None:
        """A grow-only buffer (pinned as the pool is) is being replaced."""
        self.buffers -= 1
        self.reserved_bytes -= arr.nbytes
        self.pinned_bytes -= arr.nbytes if self.pinned else 0

    def allocate(
        self, shape: tuple[int, ...], dtype: Any, *, pin: bool | None = None
    ) -> np.ndarray:
        """A zeroed buffer reserved for the life of the pool.

        Args:
            shape: the array's shape.
            dtype: its numpy dtype.
            pin: page-lock it; default the pool's setting. Only buffers copied to a GPU
                gain from pinning, and pinned memory cannot be swapped out.
        """
        with self._lock:
            return self._new(tuple(shape), np.dtype(dtype), pin)

    def grow(
        self, key: str, rows: int, tail: tuple[int, ...], dtype: Any, min_rows: int = 0
    ) -> np.ndarray:
        """The first ``rows`` rows of the grow-only buffer ``key`` (valid until the next call).

        The buffer is reallocated only when a request outgrows it (to at least 1.5 times
        its size, so a slowly growing batch reallocates a few times, not every time) or
        its row shape or dtype changes; ``min_rows`` sizes the first allocation.
        """
        dt = np.dtype(dtype)
        shape = (rows, *tail)
        with self._lock:
            buf = self._keyed.get(key)
            if (
                buf is None
                or buf.shape[0] < rows
                or buf.shape[1:] != tuple(tail)
                or buf.dtype != dt
            ):
                cap = max(rows, min_rows)
                if buf is not None:
                    if buf.shape[1:] == tuple(tail) and buf.dtype == dt:
                        cap = max(cap, int(buf.shape[0] * 1.5))
                    self._forget(buf)
                buf = self._new((cap, *tail), dt, None)
                self._keyed[key] = buf
            used = math.prod(shape) * dt.itemsize
            self._track(used - self._keyed_use.get(key, 0))
            self._keyed_use[key] = used
        return buf[:rows]

    def fresh(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An unpooled array for a request the pool could not serve: counted as overflow."""
        arr = np.zeros(shape, dtype)
        with self._lock:
            self.overflow_bytes += arr.nbytes
        return arr

    def _track(self, delta: int) -> None:
        self.in_use_bytes += delta
        self.high_water_bytes = max(self.high_water_bytes, self.in_use_bytes)

    def use(self, nbytes: int, overflow: bool = False) -> None:
        """Count ``nbytes`` as handed out (``overflow``: and served by :meth:`fresh`)."""
        with self._lock:
            self._track(nbytes)
            self.overflow += int(overflow)

    def unuse(self, nbytes: int) -> None:
        """``nbytes`` handed out earlier are back."""
        with self._lock:
            self._track(-nbytes)

    def report(self) -> dict[str, Any]:
        """Sizes and counters: what ``summary.json`` and ``/status`` show for this pool."""
        with self._lock:
            return {
                "bytes": self.reserved_bytes,
                "in_use_bytes": self.in_use_bytes,
                "high_water_bytes": self.high_water_bytes,
                "buffers": self.buffers,
                "allocations": self.allocations,
                "overflow": self.overflow,
                "overflow_bytes": self.overflow_bytes,
                "pinned": self.pinned,
                "pinned_bytes": self.pinned_bytes,
            }


@dataclass(eq=False)
class Slot:
    """One trajectory's worth of arrays, ``[max_steps, ...]`` each; a ring row or overflow."""

    ring: TrajectoryRing = field(repr=False)
    index: int  # row in the ring; -1: an overflow allocation
    images: dict[str, np.ndarray]
    proprio: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    rewards: np.ndarray
    busy: bool = False

    def release(self) -> None:
        """Give the slot back to its ring (idempotent)."""
        self.ring.release(self)


class TrajectoryRing:
    """Fixed-shape trajectory slots, reused for the life of the run; thread-safe.

    Slots are handed out last-released-first, so the slots a run touches (and the host
    memory the kernel commits for them) stay near the high-water mark, not the capacity.
    """

    def __init__(
        self,
        pool: BufferPool,
        slots: int,
        max_steps: int,
        cameras: dict[str, tuple[int, int]],
        proprio_dim: int,
        action_dim: int,
        pin: bool | None = False,
    ) -> None:
        self.pool = pool
        self.max_steps = t = max_steps
        self._shapes: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {
            **{f"image:{c}": ((t, h, w, 3), np.dtype(np.uint8)) for c, (h, w) in cameras.items()},
            "proprio": ((t, proprio_dim), np.dtype(np.float32)),
            "tokens": ((t, action_dim), np.dtype(np.int64)),
            "logprobs": ((t, action_dim), np.dtype(np.float32)),
            "versions": ((t,), np.dtype(np.int64)),
            "rewards": ((t,), np.dtype(np.float32)),
        }
        self.slot_bytes = sum(math.prod(s) * d.itemsize for s, d in self._shapes.values())
        arrays = {k: pool.allocate((slots, *s), d, pin=pin) for k, (s, d) in self._shapes.items()}
        self._slots = [self._slot(i, {k: a[i] for k, a in arrays.items()}) for i in range(slots)]
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()
        self.in_use = 0
        self.high_water = 0
        self.overflow = 0

    @staticmethod
    def for_spec(
        pool: BufferPool, spec: SimulatorSpec, slots: int, pin: bool | None = False
    ) -> TrajectoryRing:
        """A ring whose slots fit the longest episode of ``spec``."""
        t, cams, p, d = spec.max_episode_steps, spec.cameras, spec.proprio_dim, spec.action_dim
        return TrajectoryRing(pool, slots, t, cams, p, d, pin)

    def _slot(self, index: int, a: dict[str, np.ndarray]) -> Slot:
        images = {k.split(":", 1)[1]: v for k, v in a.items() if k.startswith("image:")}
        return Slot(
            self, index, images, a["proprio"], a["tokens"], a["logprobs"], a["versions"],
            a["rewards"],
        )  # fmt: skip

    @property
    def capacity(self) -> int:
        return len(self._slots)

    def acquire(self) -> Slot:
        """A free slot; when none is free, a fresh allocation (counted as overflow).

        Never blocks: a ring too small for the run costs allocations, not a deadlock.
        """
        with self._lock:
            self.in_use += 1
            self.high_water = max(self.high_water, self.in_use)
            if self._free:
                slot = self._slots[self._free.pop()]
                slot.busy = True
                self.pool.use(self.slot_bytes)
                return slot
            self.overflow += 1
        arrays = {k: self.pool.fresh(s, d) for k, (s, d) in self._shapes.items()}
        slot = self._slot(-1, arrays)
        slot.busy = True
        self.pool.use(self.slot_bytes, overflow=True)
        if self.overflow == 1:
            log.warning(
                "trajectory ring full: allocating beyond it (pipeline.memory.trajectory_slots)",
                pool=self.pool.name,
                slots=self.capacity,
            )
        return slot

    def release(self, slot: Slot) -> None:
        """Make ``slot`` reusable; releasing a slot that is not handed out does nothing."""
        with self._lock:
            if not slot.busy:
                return
            slot.busy = False
            self.in_use -= 1
            if slot.index >= 0:
                self._free.append(slot.index)
        self.pool.unuse(self.slot_bytes)

    def report(self) -> dict[str, int]:
        with self._lock:
            return {
                "slots": self.capacity,
                "slots_in_use": self.in_use,
                "slots_high_water": self.high_water,
                "slot_overflow": self.overflow,
            }


def ring_slots(p: PipelineConfig, group_size: int, envs: int) -> int:
    """Trajectory slots an in-process sample lane needs in the steady state (module doc)."""
    if p.memory.trajectory_slots is not None:
        return p.memory.trajectory_slots
    batch = p.groups_per_iteration * group_size
    if p.mode == "sync":
        return batch  # a rollout runs exactly one batch, released by its update
    slots = p.queue_groups * group_size + 2 * batch + 2 * envs
    if p.staleness_gate:
        # The gate keeps at most this many groups open, each of group_size trajectories.
        slots = min(slots, gate_capacity(p.groups_per_iteration, p.max_staleness) * group_size)
    return slots


def sampler_ring_slots(
    p: PipelineConfig, unacked_chunks: int, group_size: int, envs: int, shards: int
) -> int:
    """Trajectory slots a sampler process needs: its unacknowledged groups and more."""
    if p.memory.trajectory_slots is not None:
        return p.memory.trajectory_slots
    return (unacked_chunks + 2 * shards) * group_size + 2 * envs


class MemoryPools:
    """The rollout and train pools, the rings drawn from them and, on CUDA, two MemPools."""

    def __init__(self, cfg: MemoryConfig | None = None, device: bool | None = None) -> None:
        """Build the pools.

        Args:
            cfg: the ``pipeline.memory`` section; default all defaults.
            device: whether this process feeds a GPU (runs the policy); default whether
                CUDA is available. A sampler process without a policy pins nothing.
        """
        self.cfg = cfg = cfg if cfg is not None else MemoryConfig()  # type: ignore[call-arg]
        cuda = cuda_available() if device is None else device and cuda_available()
        if cfg.pinned == "on" and not cuda:
            log.info("pipeline.memory.pinned: on, but no CUDA device here: not pinning")
        self.pin_staging = cuda and cfg.pinned != "off"
        self.pin_slots = cuda and cfg.pinned == "on"
        self.rollout = BufferPool("rollout", self.pin_staging)
        self.train = BufferPool("train", self.pin_staging)
        self.rings: list[TrajectoryRing] = []
        self._cuda: dict[str, Any] = {}
        self._peak: dict[str, int] = {}
        if cuda and cfg.cuda_pools:
            self._cuda = {"inference": torch.cuda.MemPool(), "training": torch.cuda.MemPool()}
            self._peak = dict.fromkeys(self._cuda, 0)

    def ring(self, spec: SimulatorSpec, slots: int) -> TrajectoryRing:
        """A trajectory ring from the rollout pool, reported with it."""
        ring = TrajectoryRing.for_spec(self.rollout, spec, slots, self.pin_slots)
        self.rings.append(ring)
        return ring

    @contextlib.contextmanager
    def _use(self, role: str) -> Iterator[None]:
        pool = self._cuda.get(role)
        if pool is None:
            yield
            return
        # Only this thread's allocations are routed: the lane's own worker thread. No
        # snapshot here (it walks the allocator): report() samples the pools' sizes.
        with torch.cuda.use_mem_pool(pool):
            yield

    def inference(self) -> contextlib.AbstractContextManager[None]:
        """Route the current thread's CUDA allocations to the inference pool (no-op on CPU)."""
        return self._use("inference")

    def training(self) -> contextlib.AbstractContextManager[None]:
        """Route the current thread's CUDA allocations to the training pool (no-op on CPU).

        Backward passes run in autograd's own device threads, whose allocations stay in
        the default pool: still apart from the inference pool, which is what matters.
        """
        return self._use("training")

    @staticmethod
    def _cuda_bytes(pool: Any) -> tuple[int, int, int]:
        """Reserved bytes, allocated bytes and segments of one MemPool."""
        segments = torch.cuda.memory_snapshot(pool.id, include_traces=False)  # type: ignore[no-untyped-call]
        reserved = sum(int(s.get("total_size", 0)) for s in segments)
        allocated = sum(int(s.get("allocated_size", 0)) for s in segments)
        return reserved, allocated, len(segments)

    def report(self) -> dict[str, dict[str, Any]]:
        """Every pool's size, use, high-water mark and overflow, by pool name."""
        rollout = self.rollout.report()
        rings = [r.report() for r in self.rings]
        for key in ("slots", "slots_in_use", "slots_high_water", "slot_overflow"):
            rollout[key] = sum(r[key] for r in rings)
        out = {"rollout": rollout, "train": self.train.report()}
        for role, pool in self._cuda.items():
            reserved, allocated, segments = self._cuda_bytes(pool)
            self._peak[role] = max(self._peak[role], reserved)
            # A caching pool keeps what it reserved, so the peak is what report() saw.
            out[f"cuda_{role}"] = {
                "bytes": reserved,
                "in_use_bytes": allocated,
                "high_water_bytes": self._peak[role],
                "buffers": segments,
                "overflow": 0,
                "pinned": False,
            }
        return out
