"""The UCX transport: optional at import time, and a faithful byte stream where installed.

The conformance suite runs every data-plane test on UCX as well; these tests cover what
is UCX's own: that ``import dvla`` and the other transports never need ucxx, the one-line
error when ``transport: ucx`` is asked for without it, and the stream semantics the
module adds on top of UCX messages (credit-based backpressure, chunking, EOF versus
reset, half-close, and isolation of connections that reuse an endpoint address).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from dvla.testing.aio import run, wait_until

HAVE_UCXX = importlib.util.find_spec("ucxx") is not None
needs_ucxx = pytest.mark.skipif(
    not HAVE_UCXX, reason="needs the ucxx package: pip install 'dvla[ucx]'"
)
MISSING = "data_plane.transport 'ucx' needs the ucxx package: pip install 'dvla[ucx]'"


def _python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ----------------------------------------------------------------- without ucxx
def test_import_dvla_never_imports_ucxx() -> None:
    proc = _python(
        """
        import sys
        import dvla, dvla.cli, dvla.transport.endpoints, dvla.transport.ucx
        import dvla.testing.transports
        print("ucxx" in sys.modules)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_without_ucxx_asking_for_ucx_is_a_one_line_config_error() -> None:
    proc = _python(
        """
        import sys
        sys.modules["ucxx"] = None  # as if the package were not installed
        import asyncio
        from dvla.config import DataPlaneConfig
        from dvla.errors import ConfigError
        from dvla.testing.transports import SECRET, TRANSPORTS
        from dvla.transport import endpoints

        async def handler(conn):
            pass

        async def main():
            assert "ucx" not in TRANSPORTS
            cfg = DataPlaneConfig(transport="ucx")
            for attempt in (
                lambda: endpoints.listen(cfg, SECRET, handler),
                lambda: endpoints.connect("ucx://127.0.0.1:9", cfg, SECRET, "c", 2.0),
            ):
                try:
                    await attempt()
                except ConfigError as err:
                    print("OUT", err)
                else:
                    raise SystemExit("no error")
            # Every other transport works as before.
            lst = await endpoints.listen(DataPlaneConfig(transport="tcp"), SECRET, handler)
            conn = await endpoints.connect(lst.address.url(), lst.cfg, SECRET, "c", 5.0)
            await conn.close()
            await lst.close()
            print("OUT tcp ok")

        asyncio.run(main())
        """
    )
    assert proc.returncode == 0, proc.stderr
    out = [line[4:] for line in proc.stdout.splitlines() if line.startswith("OUT ")]
    assert out == [MISSING, MISSING, "tcp ok"]


# ----------------------------------------------------------------- with ucxx
class Recorder(asyncio.BufferedProtocol):
    """Records bytes and callbacks; a small odd-sized buffer splits every message."""

    def __init__(self, keep_open: bool = False) -> None:
        self.keep_open = keep_open
        self.transport: Any = None
        self.data = bytearray()
        self.events: list[str] = []
        self.exc: BaseException | None = None
        self.pauses = 0
        self._buf = bytearray(100_003)
        self.lost = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self._buf[:nbytes]

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self.keep_open

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.exc = exc
        self.lost.set()

    def pause_writing(self) -> None:
        self.pauses += 1


class Acceptor:
    """Hands :func:`ucx.listen` a fresh :class:`Recorder` per connection."""

    def __init__(self, keep_open: bool = False) -> None:
        self.keep_open = keep_open
        self.protocols: list[Recorder] = []

    def _factory(self) -> Recorder:
        proto = Recorder(self.keep_open)
        self.protocols.append(proto)
        return proto


async def _serve(acceptor: Acceptor) -> tuple[Any, int]:
    from dvla.transport import ucx

    return await ucx.listen(acceptor, "127.0.0.1", 0)


async def _dial(port: int, keep_open: bool = False) -> tuple[Any, Recorder]:
    from dvla.transport import ucx

    return await asyncio.wait_for(
        ucx.open_transport("127.0.0.1", port, lambda: Recorder(keep_open)), 10
    )


@needs_ucxx
def test_endpoints_pick_ucx_and_carry_messages() -> None:
    from dvla.testing.transports import SECRET
    from dvla.transport import endpoints

    async def main() -> None:
        from dvla.config import DataPlaneConfig
        from dvla.transport.frames import MsgType

        ack = (MsgType.ACK, {"producer": "p", "seq": 7})
        got: list[Any] = []

        async def handler(conn: Any) -> None:
            while (msg := await conn.recv(10)) is not None:
                got.append(msg)

        cfg = DataPlaneConfig(transport="ucx")
        lst = await endpoints.listen(cfg, SECRET, handler)
        assert lst.address.url().startswith("ucx://127.0.0.1:")
        conn = await endpoints.connect(lst.address.url(), cfg, SECRET, "client", 10)
        assert endpoints.transport_kind(conn) == "ucx"
        await conn.send(*ack)
        await wait_until(lambda: bool(got))
        assert got == [ack]
        await conn.close()
        await lst.close()

    run(main())


@needs_ucxx
def test_paused_reader_bounds_the_sender_then_everything_arrives_in_order() -> None:
    from dvla.transport import ucx

    payload = os.urandom(3 * ucx._WINDOW + 12_345)  # many chunks, several windows

    async def main() -> None:
        acc = Acceptor()
        handle, port = await _serve(acc)
        client, cproto = await _dial(port)
        await wait_until(lambda: len(acc.protocols) == 1)
        server = acc.protocols[0]
        server.transport.pause_reading()
        view = memoryview(payload)
        for i in range(0, len(view), 777_777):  # writes that straddle chunk borders
            client.write(view[i : i + 777_777])
        await asyncio.sleep(0.5)
        # The peer holds at most one window; the rest waits in the sender's buffer.
        assert client.get_write_buffer_size() >= len(payload) - ucx._WINDOW
        assert cproto.pauses == 1 and len(server.data) < ucx._MAX_MSG
        server.transport.resume_reading()
        await wait_until(lambda: len(server.data) == len(payload), 20)
        assert server.data == payload
        assert client.get_write_buffer_size() == 0
        client.close()
        await asyncio.wait_for(server.lost.wait(), 10)
        assert server.events == ["made", "eof", "lost"] and server.exc is None
        await asyncio.wait_for(cproto.lost.wait(), 10)
        assert cproto.exc is None
        ucx.close_listener(handle)

    run(main())


@needs_ucxx
def test_half_close_lets_the_peer_answer_after_eof() -> None:
    from dvla.transport import ucx

    async def main() -> None:
        acc = Acceptor(keep_open=True)
        handle, port = await _serve(acc)
        client, cproto = await _dial(port, keep_open=True)
        client.write(b"question")
        client.write_eof()
        client.write(b"ignored after EOF")
        await wait_until(lambda: len(acc.protocols) == 1 and "eof" in acc.protocols[0].events)
        server = acc.protocols[0]
        assert server.data == b"question"
        server.transport.write(b"answer")
        server.transport.close()
        await asyncio.wait_for(cproto.lost.wait(), 10)
        assert cproto.data == b"answer" and cproto.events == ["made", "eof", "lost"]
        assert cproto.exc is None
        await asyncio.wait_for(server.lost.wait(), 10)
        assert server.exc is None
        ucx.close_listener(handle)

    run(main())


@needs_ucxx
def test_abort_is_a_reset_not_an_eof() -> None:
    from dvla.transport import ucx

    async def main() -> None:
        acc = Acceptor()
        handle, port = await _serve(acc)
        client, cproto = await _dial(port)
        client.write(b"partial")
        await wait_until(lambda: len(acc.protocols) == 1 and acc.protocols[0].data)
        client.abort()
        server = acc.protocols[0]
        await asyncio.wait_for(server.lost.wait(), 10)
        assert server.events == ["made", "lost"]
        assert isinstance(server.exc, ConnectionResetError)
        await asyncio.wait_for(cproto.lost.wait(), 1)
        assert cproto.exc is None  # abort() ends the local side quietly, as asyncio's do
        ucx.close_listener(handle)

    run(main())


@needs_ucxx
def test_connections_reusing_an_endpoint_address_stay_apart() -> None:
    """A late message for a closed connection never reaches the next one."""
    from dvla.transport import ucx

    async def main() -> None:
        acc = Acceptor()
        handle, port = await _serve(acc)
        sent: list[bytes] = []
        for i in range(30):
            client, cproto = await _dial(port)
            msg = f"connection {i} ".encode() * (i + 1)
            sent.append(msg)
            client.write(msg)
            n = i + 1
            await wait_until(lambda: len(acc.protocols) == n)  # noqa: B023
            server = acc.protocols[i]
            await wait_until(lambda: bytes(server.data) == msg)  # noqa: B023
            if i % 2:
                client.close()  # the FIN and its answer cross the server's close
            server.transport.close()
            await asyncio.wait_for(server.lost.wait(), 10)
            await asyncio.wait_for(cproto.lost.wait(), 10)
        assert [bytes(p.data) for p in acc.protocols] == sent
        assert all(p.events[-1] == "lost" and p.events.count("lost") == 1 for p in acc.protocols)
        ucx.close_listener(handle)

    run(main())


@needs_ucxx
def test_nothing_listening_is_a_channel_error_in_time() -> None:
    from dvla.config import DataPlaneConfig
    from dvla.testing.transports import SECRET
    from dvla.transport import endpoints
    from dvla.transport.connection import ChannelError

    async def main() -> None:
        cfg = DataPlaneConfig(transport="ucx")
        t0 = time.monotonic()
        with pytest.raises(ChannelError, match="cannot connect"):
            await endpoints.connect("ucx://127.0.0.1:9", cfg, SECRET, "client", 1.0)
        assert time.monotonic() - t0 < 3

    run(main())


_DOOMED_CLIENT = """
import asyncio, sys
from dvla.transport import ucx

class Quiet(asyncio.Protocol):
    def eof_received(self):
        return True

async def main():
    transport, _ = await ucx.open_transport("127.0.0.1", int(sys.argv[1]), Quiet)
    transport.write(b"half a frame")
    while transport.get_write_buffer_size():
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@needs_ucxx
def test_killed_peer_is_detected_as_a_reset() -> None:
    from dvla.transport import ucx

    async def main() -> None:
        acc = Acceptor()
        handle, port = await _serve(acc)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _DOOMED_CLIENT, str(port), stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.strip() == b"ready"
            await wait_until(lambda: len(acc.protocols) == 1 and acc.protocols[0].data)
            server = acc.protocols[0]
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
            t0 = time.monotonic()
            await asyncio.wait_for(server.lost.wait(), 20)  # UCX notices in a few seconds
            assert server.events == ["made", "lost"], server.events
            assert isinstance(server.exc, ConnectionResetError)
            assert time.monotonic() - t0 < 20
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        ucx.close_listener(handle)

    run(main(), timeout=90)
