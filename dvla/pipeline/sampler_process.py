"""A sampler process: simulator shards that talk to the coordinator over the data plane.

``dvla run`` starts these with ``pipeline.sample_processes > 0``, so simulation runs
beside the learner instead of contending with it for one interpreter's GIL. The process
reads its assignment as JSON on stdin (never pickle), the shared secret from the
environment, and exits 0 when the coordinator says goodbye (CLOSE).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from typing import Any

from dvla import logs, registry
from dvla.backends.base import Simulator
from dvla.config import PipelineFile
from dvla.data import TrajectoryGroup
from dvla.errors import DvlaError
from dvla.pipeline.sample import EnvShard, EpisodeSource, SampleLane
from dvla.pipeline.stats import Accounting
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
    source = EpisodeSource(
        [t.num_init_states for t in spec.tasks],
        int(doc["group_size"]),
        cfg.seed + 7919 * (index + 1),
        limited=False,
        group_offset=index,
        group_stride=p.sample_processes,
    )
    # A restarted sampler is a new producer: its sequence numbers start again at 1.
    producer = f"sampler{index}-{secrets.token_hex(4)}"
    shards = [
        EnvShard(f"{producer}-shard{j}", sim, cfg.simulator.name, source)
        for j, sim in enumerate(sims)
    ]
    lane = SampleLane(shards, int(doc["group_size"]), Accounting(), p.lane_timeout_s)
    # The parent always passes the secret in the environment (the config dump masks it).
    secret = Secret.resolve(None, cfg.data_plane.secret_env)
    client = DataPlaneClient(doc["url"], cfg.data_plane, secret, producer)
    await client.start()
    stop = asyncio.Event()

    async def emit(group: TrajectoryGroup) -> None:
        await client.send_group(group, {"busy_s": lane.stats.busy_s}, p.lane_timeout_s)

    async def request(obs: Any) -> Any:
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
    try:
        await asyncio.gather(*(shard_loop(s) for s in shards))
    finally:
        watcher.cancel()
        log.info(
            "sampler stopping",
            producer=producer,
            reason=client.stop_reason,
            unacked=client.unacked,
            reconnects=client.reconnects,
        )
        await client.close()
        lane.close()


def main() -> int:
    """Entry point of ``python -m dvla.pipeline.sampler_process``."""
    logs.configure("info")
    try:
        doc = json.loads(sys.stdin.read())
        import uvloop

        uvloop.run(run(doc))
    except DvlaError as err:
        log.error("sampler failed", error=str(err))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
