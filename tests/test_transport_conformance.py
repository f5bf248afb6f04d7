"""The conformance suite every data-plane transport passes.

Each test runs once per transport (in-memory, TCP, Unix socket, TLS, and UCX where the
package works). Raw peers write bytes by hand, so splits, truncation, oversized and
malformed frames reach the server exactly as a broken or hostile peer would send them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dvla.data import ObsBatch
from dvla.testing.aio import run, wait_until
from dvla.testing.transports import SECRET, TRANSPORTS, TransportUnderTest, guarded, make
from dvla.transport import codec, endpoints
from dvla.transport.connection import ChannelError, Connection
from dvla.transport.frames import HEADER, MAGIC, VERSION, MsgType, frame_bytes

KINDS = list(TRANSPORTS)


def small_obs(i: int, n: int = 1) -> ObsBatch:
    return ObsBatch(
        {"cam": np.full((n, 4, 4, 3), i % 256, np.uint8)},
        np.full((n, 3), i, np.float32),
        [f"instruction {i}"] * n,
    )


class Collector:
    """A server handler recording every message and every connection's fate."""

    def __init__(self, read: bool = True) -> None:
        self.messages: list[tuple[MsgType, dict[str, Any]]] = []
        self.closed: list[str] = []
        self.read = asyncio.Event()
        if read:
            self.read.set()

    async def __call__(self, conn: Connection) -> None:
        try:
            await asyncio.wait_for(self.read.wait(), 30)
            while (msg := await conn.recv(30)) is not None:
                self.messages.append(msg)
                if msg[0] == MsgType.OBS_BATCH:
                    await conn.send(MsgType.ACK, {"producer": "echo", "seq": msg[1]["req"]})
        finally:
            self.closed.append(conn.close_reason or "")

    def reqs(self) -> list[int]:
        return [m[1]["req"] for m in self.messages if m[0] == MsgType.OBS_BATCH]


@pytest.fixture(params=KINDS)
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> TransportUnderTest:
    if request.param == "tls":
        pytest.importorskip("trustme")
    return make(request.param, tmp_path)


async def healthy(t: TransportUnderTest, lst: endpoints.Listener, coll: Collector) -> None:
    """Another connection to the same server still works."""
    conn = await t.client(lst, t.config())
    before = len(coll.reqs())
    await conn.send(MsgType.OBS_BATCH, codec.obs_body(99_999, small_obs(1)))
    await wait_until(lambda: len(coll.reqs()) > before)
    await conn.close()


# ----------------------------------------------------------------- correct peers
def test_roundtrip_and_zero_copy_views(transport: TransportUnderTest) -> None:
    async def main() -> None:
        coll = Collector()
        lst = await transport.serve(coll, transport.config())
        conn = await transport.client(lst, transport.config())
        obs = small_obs(7, n=5)
        await conn.send(MsgType.OBS_BATCH, codec.obs_body(1, obs))
        reply = await conn.recv(5)
        assert reply == (MsgType.ACK, {"producer": "echo", "seq": 1})
        _, got = codec.obs_from_body(coll.messages[0][1])
        assert np.array_equal(got.images["cam"], obs.images["cam"])
        assert got.instructions == obs.instructions
        assert got.proprio.dtype == np.float32 and got.proprio.shape == (5, 3)
        assert got.images["cam"].base is not None  # a view of the frame's buffer
        assert got.images["cam"].ctypes.data % 64 == 0
        await conn.close()
        await lst.close()

    run(guarded(transport, main()))


def test_send_many_batches_preserve_order_and_split_when_large(
    transport: TransportUnderTest,
) -> None:
    async def main() -> None:
        coll = Collector()
        lst = await transport.serve(coll, transport.config())
        conn = await transport.client(lst, transport.config())
        long_name = "p" * 6000  # 256 such ACKs exceed the 1 MiB msgpack cap: split
        msgs: list[tuple[MsgType, dict[str, Any]]] = [
            (MsgType.OBS_BATCH, codec.obs_body(i, small_obs(i))) for i in range(300)
        ]
        msgs += [(MsgType.ACK, {"producer": long_name, "seq": i}) for i in range(256)]
        msgs += [(MsgType.OBS_BATCH, codec.obs_body(1000, small_obs(3)))]
        await conn.send_many(msgs)
        await wait_until(lambda: len(coll.messages) == len(msgs), 20)
        assert coll.reqs() == [*range(300), 1000]
        got_acks = [b["seq"] for t, b in coll.messages if t == MsgType.ACK]
        assert got_acks == list(range(256))
        _, obs = codec.obs_from_body(coll.messages[5][1])
        assert np.array_equal(obs.images["cam"], small_obs(5).images["cam"])
        # Batching is what makes many small messages cheap: far fewer frames than messages.
        assert conn.stats.frames_out < 20
        await conn.close()
        await lst.close()

    run(guarded(transport, main()))


def test_split_at_every_offset(transport: TransportUnderTest) -> None:
    async def main() -> None:
        coll = Collector()
        lst = await transport.serve(coll, transport.config())
        raw = await transport.raw(lst)
        await raw.handshake()
        frames = [frame_bytes(MsgType.OBS_BATCH, codec.obs_body(i, small_obs(i))) for i in range(1)]
        size = len(frames[0])
        for i in range(size + 1):
            data = frame_bytes(MsgType.OBS_BATCH, codec.obs_body(i, small_obs(i)))
            await raw.write(data[:i])
            await asyncio.sleep(0)
            await raw.write(data[i:])
        await wait_until(lambda: len(coll.reqs()) == size + 1, 20)
        assert coll.reqs() == list(range(size + 1))
        raw.close()
        await lst.close()

    run(guarded(transport, main()))


def test_one_byte_at_a_time(transport: TransportUnderTest) -> None:
    async def main() -> None:
        coll = Collector()
        lst = await transport.serve(coll, transport.config())
        raw = await transport.raw(lst)
        await raw.handshake()
        data = b"".join(
            frame_bytes(MsgType.OBS_BATCH, codec.obs_body(i, small_obs(i))) for i in range(3)
        )
        for k in range(len(data)):
            await raw.write(data[k : k + 1])
        await wait_until(lambda: len(coll.reqs()) == 3)
        assert coll.reqs() == [0, 1, 2]
        raw.close()
        await lst.close()

    run(guarded(transport, main()))


def test_slow_reader_bounds_sender_memory(transport: TransportUnderTest) -> None:
    limit = 2 * 1024 * 1024
    chunk = np.ones((1, 512, 512, 3), np.uint8)  # 768 KiB per frame
    n = 120  # 90 MiB: beyond every buffer on the way (kernel TCP autotuning included)

    async def main() -> None:
        coll = Collector(read=False)
        lst = await transport.serve(coll, transport.config())
        conn = await transport.client(lst, transport.config(send_queue_bytes=limit))
        peak = 0

        async def sender() -> None:
            nonlocal peak
            for i in range(n):
                obs = ObsBatch({"cam": chunk}, np.zeros((1, 3), np.float32), ["x"])
                await conn.send(MsgType.OBS_BATCH, codec.obs_body(i, obs), timeout=30)
                peak = max(peak, conn.queued_bytes)

        task = asyncio.create_task(sender())
        await asyncio.sleep(0.5)  # the reader is asleep: the sender must stall, not buffer
        assert not task.done(), f"{n} frames of 768 KiB were all accepted with nobody reading"
        coll.read.set()
        await task
        await wait_until(lambda: len(coll.reqs()) == n, 30)
        # Send queue limit, plus the transport's 4 MiB write-buffer mark, plus one frame.
        assert peak <= limit + 4 * 1024 * 1024 + 2 * chunk.nbytes, peak
        await conn.close()
        await lst.close()

    run(guarded(transport, main()))


# ----------------------------------------------------------------- broken peers
def _header(mtype: int, meta_len: int, blob_len: int = 0, magic: bytes = MAGIC,
            version: int = VERSION, flags: int = 0) -> bytes:  # fmt: skip
    return HEADER.pack(magic, version, mtype, flags, meta_len, blob_len)


BAD_INPUTS: dict[str, tuple[bytes, str]] = {
    "oversized": (_header(MsgType.OBS_BATCH, 1 << 30), "too-large"),
    "garbage": (os.urandom(64), "magic"),
    "wrong-magic": (_header(MsgType.HEARTBEAT, 1, magic=b"HTTP") + b"\x80", "magic"),
    "wrong-version": (_header(MsgType.HEARTBEAT, 1, version=9) + b"\x80", "version"),
    "unknown-type": (_header(77, 1) + b"\x80", "type"),
    "flags": (_header(MsgType.HEARTBEAT, 1, flags=4) + b"\x80", "flags"),
    "bad-msgpack": (_header(MsgType.OBS_BATCH, 3) + b"\xc1\xc1\xc1", "body"),
    "schema": (frame_bytes(MsgType.OBS_BATCH, {"req": "one"}), "schema"),
    "rows": (
        frame_bytes(
            MsgType.OBS_BATCH,
            {
                "req": 1,
                "images": {},
                "proprio": np.zeros((2, 3), np.float32),
                "instructions": ["a"],
            },
        ),
        "schema",
    ),
    "batch-of-control": (
        frame_bytes(MsgType.BATCH, {"type": int(MsgType.CLOSE), "items": [{"reason": "x"}]}),
        "schema",
    ),
    "batch-bad-item": (
        frame_bytes(MsgType.BATCH, {"type": int(MsgType.ACK), "items": [{"producer": 1}]}),
        "schema",
    ),
    "handshake-again": (frame_bytes(MsgType.AUTH, {"proof": b"x" * 32}), "handshake"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_closes_only_that_connection(transport: TransportUnderTest, case: str) -> None:
    data, code = BAD_INPUTS[case]

    async def main() -> None:
        coll = Collector()
        lst = await transport.serve(coll, transport.config(max_frame_bytes=1 << 20))
        raw = await transport.raw(lst)
        await raw.handshake()
        await raw.write(data)
        frames = await raw.read_until_eof()
        errors = [f.decode() for f in frames if f.type == MsgType.ERROR]
        assert errors and errors[0]["code"] == code, (case, errors)
        await wait_until(lambda: len(coll.closed) == 1)
        assert code in coll.closed[0]
        assert coll.reqs() == []
        raw.close()
        await healthy(transport, lst, coll)
        await lst.close()

    run(guarded(transport, main()))


def test_unauthenticated_peers_are_refused(transport: TransportUnderTest) -> None:
    async def main() -> None:
        coll = Collector()
        lst = await transport.serve(coll, transport.config(handshake_timeout_s=0.5))
        # Wrong secret: a one-line error naming the cause; the server never hands it on.
        wrong = type(SECRET)(b"not-the-secret-at-all-000")
        with pytest.raises(ChannelError, match="authentication"):
            await transport.client(lst, transport.config(), secret=wrong)
        # Data before authentication: refused; past the tiny pre-auth cap, unread.
        raw = await transport.raw(lst)
        await raw.write(frame_bytes(MsgType.OBS_BATCH, codec.obs_body(1, small_obs(1))))
        frames = await raw.read_until_eof()
        assert [f.decode()["code"] for f in frames if f.type == MsgType.ERROR] == ["handshake"]
        raw.close()
        raw = await transport.raw(lst)
        big = ObsBatch(
            {"cam": np.zeros((1, 64, 64, 3), np.uint8)}, np.zeros((1, 3), np.float32), ["x"]
        )
        await raw.write(frame_bytes(MsgType.OBS_BATCH, codec.obs_body(1, big)))
        frames = await raw.read_until_eof()
        assert [f.decode()["code"] for f in frames if f.type == MsgType.ERROR] == ["too-large"]
        # A client that connects and says nothing is dropped at the handshake deadline.
        silent = await transport.raw(lst)
        t0 = time.monotonic()
        frames = await silent.read_until_eof(5)
        assert time.monotonic() - t0 < 3
        assert [f.decode()["code"] for f in frames if f.type == MsgType.ERROR] == ["handshake"]
        assert lst.rejected == 4 and coll.messages == []
        raw.close()
        silent.close()
        await healthy(transport, lst, coll)
        await lst.close()

    run(guarded(transport, main()))


def test_truncated_frame_delivers_nothing(transport: TransportUnderTest) -> None:
    async def main() -> None:
        coll = Collector()
        lst = await transport.serve(coll, transport.config())
        raw = await transport.raw(lst)
        await raw.handshake()
        data = frame_bytes(MsgType.OBS_BATCH, codec.obs_body(5, small_obs(5)))
        await raw.write(data[: len(data) // 2])
        if raw.writer.can_write_eof():
            raw.writer.write_eof()
        else:
            raw.close()
        await wait_until(lambda: len(coll.closed) == 1)
        assert "truncated" in coll.closed[0]
        assert coll.reqs() == []
        raw.close()
        await healthy(transport, lst, coll)
        await lst.close()

    run(guarded(transport, main()))


_KILLED_PEER = textwrap.dedent(
    """
    import socket, sys, time
    from dvla.transport import auth, codec
    from dvla.transport.frames import FrameDecoder, MsgType, frame_bytes
    import numpy as np
    from dvla.data import ObsBatch
    secret = auth.Secret(sys.argv[2].encode())
    if sys.argv[1].startswith("/"):
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    else:
        host, port = sys.argv[1].rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
    dec = FrameDecoder(1 << 20)
    def frame():
        while True:
            data = s.recv(65536)
            if not data:
                sys.exit(1)  # the server hung up: nothing left to test here
            got = dec.feed(data)
            if got:
                return got[0]
    mine = auth.new_nonce()
    s.sendall(frame_bytes(MsgType.HELLO, {"role": "client", "peer": "doomed",
                                         "nonce": mine, "host": "x"}))
    theirs = frame().decode()["nonce"]
    s.sendall(frame_bytes(MsgType.AUTH, {"proof": auth.proof(secret, "client", mine, theirs)}))
    frame()
    obs = ObsBatch({"cam": np.zeros((1, 64, 64, 3), np.uint8)}, np.zeros((1, 3), np.float32), ["x"])
    data = frame_bytes(MsgType.OBS_BATCH, codec.obs_body(1, obs))
    s.sendall(data[: len(data) // 2])
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_peer_killed_mid_frame(transport: TransportUnderTest) -> None:
    async def main() -> None:
        coll = Collector()
        lst = await transport.serve(coll, transport.config())
        if transport.kind in ("memory", "tls", "ucx"):
            # No process can reach an in-memory server, and a raw TLS or UCX client in a child
            # adds nothing over the TCP case: the peer vanishes without EOF instead.
            raw = await transport.raw(lst)
            await raw.handshake()
            data = frame_bytes(MsgType.OBS_BATCH, codec.obs_body(1, small_obs(1)))
            await raw.write(data[: len(data) // 2])
            raw.writer.transport.abort()
            raw.close()
        else:
            a = lst.address
            target = a.path if transport.kind == "unix" else f"{a.host}:{a.port}"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _KILLED_PEER, target, SECRET.value.decode(),
                stdout=subprocess.PIPE,
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                assert line.strip() == b"ready"
                await wait_until(lambda: len(lst.connections) == 1)
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGKILL)
                await proc.wait()
        await wait_until(lambda: len(coll.closed) == 1)
        assert coll.reqs() == []
        await healthy(transport, lst, coll)
        await lst.close()

    run(guarded(transport, main()))


def test_peer_silent_past_heartbeat_timeout_is_closed(transport: TransportUnderTest) -> None:
    async def main() -> None:
        coll = Collector()
        cfg = transport.config(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.3)
        lst = await transport.serve(coll, cfg)
        raw = await transport.raw(lst)
        await raw.handshake()  # then never sends another byte, not even heartbeats
        await wait_until(lambda: len(coll.closed) == 1, 5)
        assert "silent" in coll.closed[0]
        raw.close()
        # A real client's heartbeats keep an idle connection open meanwhile.
        conn = await transport.client(lst, cfg)
        await asyncio.sleep(0.8)
        assert not conn.closed.is_set() and conn.stats.heartbeats_out > 0
        await conn.close()
        await lst.close()

    run(guarded(transport, main()))
