"""The in-process end of the weight (control) plane.

The learner publishes ``(version, state_dict)``; the sync lane applies the newest version
to the inference replicas. Publication keeps only the latest version (a slow subscriber
skips versions instead of queueing them), versions only go up, and inference never reads
a half-loaded model: weights are loaded into the standby replica and then swapped in.
The cross-process and NCCL transports of the weight plane implement the same
:class:`WeightBus` protocol.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from dvla.backends.base import Policy
from dvla.config import PipelineFile
from dvla.transport.auth import Secret

if TYPE_CHECKING:
    from dvla.control.publisher import WeightPublisher

StateDict = dict[str, torch.Tensor]


class WeightBus(Protocol):
    """Carries versioned weights from the learner to inference replicas."""

    def publish(self, version: int, state: StateDict) -> None:
        """Offer ``state`` as ``version``; must be newer than anything published before."""

    async def wait_newer(self, than: int, timeout: float) -> tuple[int, StateDict] | None:
        """The newest version above ``than``, or None if none arrives within ``timeout`` s."""


class LocalWeightBus:
    """A latest-value mailbox for lanes that share one process."""

    def __init__(self) -> None:
        self._version = -1
        self._state: StateDict | None = None
        self._changed = asyncio.Event()

    @property
    def version(self) -> int:
        return self._version

    def publish(self, version: int, state: StateDict) -> None:
        if version <= self._version:
            raise ValueError(f"weight versions only go up: {version} after {self._version}")
        self._version = version
        self._state = state
        self._changed.set()

    async def wait_newer(self, than: int, timeout: float) -> tuple[int, StateDict] | None:
        while self._version <= than:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                return None
        assert self._state is not None
        return self._version, self._state


class WeightSink(Protocol):
    """Anything the learner's versions are also offered to (e.g. the weight publisher)."""

    def publish(self, version: int, state: StateDict) -> None:
        """Offer ``state`` as ``version``; must not block on the transfer."""


class FanoutBus:
    """Publishes to the in-process bus and to other sinks; reads from the local bus."""

    def __init__(self, local: WeightBus, sinks: list[WeightSink]) -> None:
        self.local = local
        self.sinks = sinks

    def publish(self, version: int, state: StateDict) -> None:
        self.local.publish(version, state)
        for sink in self.sinks:
            sink.publish(version, state)

    async def wait_newer(self, than: int, timeout: float) -> tuple[int, StateDict] | None:
        return await self.local.wait_newer(than, timeout)


def start_publisher(
    cfg: PipelineFile, secret: Secret, initial: StateDict, version: int = 0
) -> WeightPublisher:
    """The weight plane's publisher for a run, already offering the initial weights.

    Version 0 is the learner's initial policy (a resumed run offers the version it
    restored), so replicas in other processes start from exactly the learner's weights
    rather than from their own initialisation.
    """
    from dvla.control.publisher import WeightPublisher
    from dvla.control.topology import detect_topology, load_topology

    wp = cfg.weight_plane
    topology = load_topology(wp.topology) if wp.topology else detect_topology()
    publisher = WeightPublisher(wp, secret, topology=topology)
    publisher.start()
    publisher.publish(version, initial)
    return publisher


@dataclass
class Replica:
    """One inference copy of the policy and the version its weights hold."""

    policy: Policy
    version: int
    lock: threading.Lock = field(default_factory=threading.Lock)


class ReplicaSet:
    """Double-buffered inference replicas: load into the standby, then swap it in."""

    def __init__(self, policy: Policy, version: int = 0) -> None:
        # Before any version arrives a replica reports ``version`` (-1: nothing loaded yet).
        first = copy.deepcopy(policy).eval()
        second = copy.deepcopy(policy).eval()
        for p in (*first.parameters(), *second.parameters()):
            p.requires_grad_(False)
        self.active = Replica(first, version)
        self._standby = Replica(second, version)

    def load(self, version: int, state: StateDict) -> None:
        """Blocking: copy ``state`` into the standby replica and make it active."""
        if version <= self.active.version:
            return
        standby = self._standby
        with standby.lock, torch.no_grad():
            standby.policy.load_state_dict(state)
            standby.version = version
        self._standby, self.active = self.active, standby


def snapshot(policy: Policy) -> StateDict:
    """A detached copy of the learner's weights, safe to hand to another thread."""
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}
