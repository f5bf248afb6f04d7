"""A sampler process: simulator shards that talk to the coordinator over the data plane.

``dvla run`` starts these with ``pipeline.sample_processes > 0``, so simulation runs
beside the learner instead of contending with it for one interpreter's GIL. The process
reads its assignment as JSON on stdin (never pickle), the shared secret from the
environment, and exits 0 when the coordinator says goodbye (CLOSE).
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from dvla import logs, registry
from dvla.backends.base import Simulator, SimulatorSpec
from dvla.cluster.supervisor import COUNTER
from dvla.config import PipelineFile
from dvla.control.receiver import WeightReceiver
from dvla.data import TrajectoryGroup
from dvla.errors import DvlaError
from dvla.pipeline.infer import InferLane
from dvla.pipeline.memory import MemoryPools, sampler_ring_slots
from dvla.pipeline.policy import build_policy
from dvla.pipeline.sample import EnvShard, Episode, EpisodeSource, SampleLane
from dvla.pipeline.stats import Accounting
from dvla.pipeline.sync import SyncLane
from dvla.pipeline.weights import ReplicaSet
from dvla.transport.auth import Secret
from dvla.transport.channel import DataPlaneClient
from dvla.transport.connection import ChannelError

log = logs.get(__name__)


async def run(doc: dict[str, Any]) -> None:
    """Run the assigned shards until the coordinator closes the connection."""
    cfg = PipelineFile.model_validate(doc["config"])
    p, index = cfg.pipeline, int(doc["index"])
    sim_cls, sim_opts = registry.build_options("simulator", cfg.simulator, "<sampler>")
    sims: list[Simulator] = []
    try:
        for j, n in enumerate(doc["shard_envs"]):
            sims.append(sim_cls(sim_opts, n, cfg.seed + int(doc["first_shard"]) + j))
    except BaseException:
        for sim in sims:
            sim.close()
        raise
    spec = sims[0].spec
    source = CountingSource(
        [t.num_init_states for t in spec.tasks],
        int(doc["group_size"]),
        cfg.seed + 7919 * (int(doc.get("seed_index", index)) + 1),
        limited=False,
        group_offset=int(doc.get("group_offset", index)),
        group_stride=int(doc.get("group_stride", p.sample_processes)),
    )
    if doc.get("counter"):
        source.attach(Path(doc["counter"]))
    # A restarted sampler is a new producer: its sequence numbers start again at 1.
    producer = str(doc.get("producer") or f"sampler{index}-{secrets.token_hex(4)}")
    # Only a process with its own policy replica copies anything to a GPU (and pins).
    memory = MemoryPools(p.memory, device=bool(doc.get("weights")))
    slots = sampler_ring_slots(
        p, cfg.data_plane.unacked_chunks, int(doc["group_size"]), sum(doc["shard_envs"]), len(sims)
    )
    ring = memory.ring(spec, slots)
    shards = [
        EnvShard(f"{producer}-shard{j}", sim, cfg.simulator.name, source, memory.rollout, ring)
        for j, sim in enumerate(sims)
    ]
    lane = SampleLane(shards, int(doc["group_size"]), Accounting(), p.lane_timeout_s)
    # The parent always passes the secret in the environment (the config dump masks it).
    secret = Secret.resolve(None, cfg.data_plane.secret_env)
    local = (
        await LocalInference.start(cfg, spec, secret, doc["weights"], producer, index, memory)
        if doc.get("weights")
        else None
    )
    client = DataPlaneClient(doc["url"], cfg.data_plane, secret, producer)
    await client.start()
    stop = asyncio.Event()

    async def emit(group: TrajectoryGroup) -> None:
        stats: dict[str, Any] = {
            "busy_s": lane.stats.busy_s,
            "episodes_broken": lane.accounting.episodes_broken,
        }
        if local is not None:
            stats.update(local.stats())
        # The chunk keeps views of the trajectories' ring slots until the coordinator
        # acknowledges it (it may have to be resent): the slots are released then.
        await client.send_group(group, stats, p.lane_timeout_s, on_acked=group.release)

    async def request(obs: Any) -> Any:
        if local is not None:
            return await local.infer.request(obs)
        return await client.request(obs, p.lane_timeout_s)

    async def shard_loop(shard: EnvShard) -> None:
        try:
            await lane.run_shard(shard, request, emit, stop)
        except ChannelError:
            if not client.stopped.is_set():
                raise

    async def watch() -> None:
        await client.stopped.wait()
        stop.set()

    watcher = asyncio.create_task(watch())
    helpers = local.run(stop) if local is not None else []
    try:
        await asyncio.gather(*(shard_loop(s) for s in shards))
    finally:
        stop.set()
        watcher.cancel()
        if helpers:
            await asyncio.wait(helpers, timeout=p.lane_timeout_s)
        if local is not None:
            local.close()
        log.info(
            "sampler stopping",
            producer=producer,
            reason=client.stop_reason,
            unacked=client.unacked,
            reconnects=client.reconnects,
            memory=memory.report(),
        )
        await client.close()
        lane.close()


class CountingSource(EpisodeSource):
    """An episode source that also counts, in a file its worker maps, episodes started.

    The count survives this process: after a crash the worker reads how many episodes
    were started, and the coordinator knows how many of them it received.
    """

    _counter: mmap.mmap | None = None
    _started = 0

    def attach(self, path: Path) -> None:
        with path.open("r+b") as fh:
            self._counter = mmap.mmap(fh.fileno(), COUNTER.size)

    def take(self, n: int) -> list[Episode]:
        out = super().take(n)
        if out and self._counter is not None:
            self._started += len(out)
            COUNTER.pack_into(self._counter, 0, self._started)
        return out


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its worker dies (Linux only).

    The worker spawns from its event-loop thread, which lives as long as the worker, so
    the parent-thread semantics of PR_SET_PDEATHSIG do not fire early.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the worker died before the call above took effect
        os._exit(1)


class LocalInference:
    """This process's own policy replica, batched infer lane and weight-plane sync lane.

    New weights arrive on the weight plane's threads and are loaded into the standby
    replica by the sync lane, so the shards keep stepping against the active one.
    """

    def __init__(
        self, infer: InferLane, sync: SyncLane, receiver: WeightReceiver, replicas: ReplicaSet
    ) -> None:
        self.infer = infer
        self.sync = sync
        self.receiver = receiver
        self.replicas = replicas

    @staticmethod
    async def start(
        cfg: PipelineFile,
        spec: SimulatorSpec,
        secret: Secret,
        publisher: str,
        name: str,
        index: int,
        memory: MemoryPools | None = None,
    ) -> LocalInference:
        """Build the replica and wait for the learner's current weights."""
        p = cfg.pipeline
        torch.set_num_threads(p.torch_threads)
        policy = build_policy(cfg, spec, "<sampler>")
        receiver = WeightReceiver(cfg.weight_plane, secret, publisher, name)
        await asyncio.to_thread(receiver.start, cfg.data_plane.connect_timeout_s)
        first = await receiver.wait_newer(-1, p.lane_timeout_s)
        if first is None:
            receiver.close()
            raise DvlaError(f"no weights from the learner within {p.lane_timeout_s:g} s")
        replicas = ReplicaSet(policy, version=-1)
        await asyncio.to_thread(replicas.load, *first)
        infer = InferLane(
            replicas, p.infer, p.lane_timeout_s, cfg.seed + 104729 * (index + 1), memory
        )
        sync = SyncLane(receiver, replicas, p.lane_timeout_s)
        sync.applied = replicas.active.version
        log.info("local inference ready", sampler=name, version=sync.applied)
        return LocalInference(infer, sync, receiver, replicas)

    def run(self, stop: asyncio.Event) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self.infer.run(stop), name="infer"),
            asyncio.create_task(self.sync.run(stop), name="sync"),
        ]

    def stats(self) -> dict[str, Any]:
        """Counters the coordinator aggregates into its infer and sync lanes."""
        return {
            "infer_busy_s": self.infer.stats.busy_s,
            "infer_batches": self.infer.batches,
            "infer_observations": self.infer.observations,
            "sync_busy_s": self.sync.stats.busy_s,
            "weights_version": self.sync.applied,
        }

    def close(self) -> None:
        self.receiver.close()
        self.infer.close()
        self.sync.close()


def main() -> int:
    """Entry point of ``python -m dvla.pipeline.sampler_process``."""
    logs.configure("info")
    try:
        doc = json.loads(sys.stdin.read())
        if doc.get("parent_pid"):
            _die_with_parent(int(doc["parent_pid"]))
        import uvloop

        uvloop.run(run(doc))
    except DvlaError as err:
        log.error("sampler failed", error=str(err))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
