"""Exactly-once trajectory chunks and resilient action requests over the data plane."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pytest

from dvla.data import ActionBatch, ObsBatch, TrajectoryGroup
from dvla.testing import make_group, make_obs
from dvla.testing.aio import run
from dvla.testing.transports import SECRET, make
from dvla.transport import codec
from dvla.transport.auth import Secret
from dvla.transport.channel import DataPlaneClient, DataPlaneServer
from dvla.transport.connection import ChannelError
from dvla.transport.frames import MsgType, frame_bytes


class Coordinator:
    """The coordinator's callbacks: answers with one action per row, records groups."""

    def __init__(self, block: asyncio.Event | None = None) -> None:
        self.groups: list[tuple[str, int]] = []
        self.block = block

    async def on_obs(self, obs: ObsBatch) -> ActionBatch:
        n = len(obs)
        first = float(obs.proprio[0, 0]) if n else 0.0
        return ActionBatch(
            np.full((n, 7), first, np.float32),
            np.zeros((n, 7), np.int64),
            np.zeros((n, 7), np.float32),
            version=3,
        )

    async def on_group(self, group: TrajectoryGroup, producer: str, stats: dict[str, Any]) -> None:
        if self.block is not None:
            await asyncio.wait_for(self.block.wait(), 30)
        self.groups.append((producer, group.group_id))


async def start(kind: str, tmp: Any, coord: Coordinator, **cfg: Any) -> tuple[Any, str, Any]:
    t = make(kind, tmp)
    c = t.config(**cfg)
    server = DataPlaneServer(c, SECRET, coord.on_obs, coord.on_group)
    name = "chan" + str(random.getrandbits(32)) if kind == "memory" else None
    url = await server.start(memory_name=name)
    return server, url, c


@pytest.mark.parametrize("kind", ["memory", "tcp", "unix"])
def test_chunks_arrive_exactly_once_despite_dropped_connections(kind: str, tmp_path: Any) -> None:
    n = 150

    async def main() -> None:
        coord = Coordinator()
        server, url, cfg = await start(kind, tmp_path, coord, unacked_chunks=8)
        client = DataPlaneClient(url, cfg, SECRET, "p1")
        await client.start()
        rng = random.Random(3)

        async def chaos() -> None:
            # Cut the link from either end at random moments, mid-stream.
            while True:
                await asyncio.sleep(rng.uniform(0.005, 0.03))
                conns = list(server.listener.connections) if server.listener else []
                target = client.connection if rng.random() < 0.5 or not conns else conns[0]
                if target is not None and not target.closed.is_set():
                    target.abort()

        chaos_task = asyncio.create_task(chaos())
        for gid in range(n):
            await client.send_group(make_group([1.0, 0.0], group_id=gid), timeout=30)
        chaos_task.cancel()
        assert await client.flush(30), f"{client.unacked} chunks never acked"
        assert coord.groups == [("p1", gid) for gid in range(n)]
        assert server.ledger.delivered == n
        assert client.reconnects > 0 and client.resent > 0
        await client.close()
        await server.close()

    run(main(), 120)


def test_requests_are_resent_after_reconnect(tmp_path: Any) -> None:
    async def main() -> None:
        coord = Coordinator()
        server, url, cfg = await start("tcp", tmp_path, coord)
        client = DataPlaneClient(url, cfg, SECRET, "p1")
        await client.start()
        for i in range(20):
            obs = make_obs(2)
            obs.proprio[:] = i
            if i % 5 == 4:
                assert client.connection is not None
                client.connection.abort()
            act = await client.request(obs, timeout=10)
            assert act.version == 3 and act.actions.shape == (2, 7)
            assert float(act.actions[0, 0]) == i  # the answer to this request, no other
        assert client.reconnects >= 3
        await client.close()
        await server.close()

    run(main())


def test_full_window_applies_backpressure(tmp_path: Any) -> None:
    async def main() -> None:
        gate = asyncio.Event()
        coord = Coordinator(block=gate)
        server, url, cfg = await start("memory", tmp_path, coord, unacked_chunks=3)
        client = DataPlaneClient(url, cfg, SECRET, "p1")
        await client.start()
        for gid in range(3):
            await client.send_group(make_group([1.0], group_id=gid), timeout=5)
        with pytest.raises(ChannelError, match="unacknowledged"):
            await client.send_group(make_group([1.0], group_id=3), timeout=0.3)
        gate.set()
        await client.send_group(make_group([1.0], group_id=3), timeout=5)
        assert await client.flush(5)
        assert [g for _, g in coord.groups] == [0, 1, 2, 3]
        await client.close()
        await server.close()

    run(main())


def test_sequence_gap_and_unexpected_messages_are_protocol_errors(tmp_path: Any) -> None:
    async def main() -> None:
        coord = Coordinator()
        t = make("tcp", tmp_path)
        server = DataPlaneServer(t.config(), SECRET, coord.on_obs, coord.on_group)
        await server.start()
        assert server.listener is not None
        for body, code in [
            (codec.chunk_body("p", 2, make_group([1.0])), "sequence"),
            ({"producer": "p", "seq": 1}, "unexpected"),
        ]:
            raw = await t.raw(server.listener)
            await raw.handshake()
            mtype = MsgType.TRAJ_CHUNK if "group" in body else MsgType.ACK
            await raw.write(frame_bytes(mtype, body))
            frames = await raw.read_until_eof()
            assert [f.decode()["code"] for f in frames if f.type == MsgType.ERROR] == [code]
            raw.close()
        assert coord.groups == []
        await server.close()

    run(main())


def test_wrong_secret_fails_fast_without_retrying(tmp_path: Any) -> None:
    async def main() -> None:
        coord = Coordinator()
        server, url, cfg = await start("tcp", tmp_path, coord, connect_timeout_s=20)
        client = DataPlaneClient(url, cfg, Secret(b"a-different-secret-456"), "p1")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ChannelError, match="authentication"):
            await client.start()
        assert loop.time() - t0 < 2
        await server.close()

    run(main())


def test_client_gives_up_when_server_is_gone(tmp_path: Any) -> None:
    async def main() -> None:
        coord = Coordinator()
        server, url, cfg = await start("tcp", tmp_path, coord, connect_timeout_s=0.5)
        client = DataPlaneClient(url, cfg, SECRET, "p1")
        await client.start()
        assert client.connection is not None
        await server.close(timeout=1)
        await asyncio.wait_for(client.stopped.wait(), 5)
        assert "server stopping" in client.stop_reason
        with pytest.raises(ChannelError):
            await client.request(make_obs(1), timeout=1)
        await client.close()

    run(main())
