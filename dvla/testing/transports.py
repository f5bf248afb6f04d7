"""Transport fixtures for the data-plane conformance suite.

Each :class:`TransportUnderTest` starts a server on one transport and opens both real
clients and *raw* byte-level peers to it, so the suite can speak the protocol correctly
or break it in any way a buggy or hostile peer could, on every transport alike.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import tempfile
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dvla.config import DataPlaneConfig, TlsConfig
from dvla.transport import auth, endpoints, memory
from dvla.transport.connection import Connection
from dvla.transport.frames import Frame, FrameDecoder, MsgType, frame_bytes

SECRET = auth.Secret(b"conformance-secret-0123456789")
T = TypeVar("T")


@dataclass
class RawPeer:
    """A byte-level peer: writes anything, reads frames back."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(1 << 30))
    frames: list[Frame] = field(default_factory=list)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), 10)

    async def read_frame(self, timeout: float = 5.0) -> Frame | None:
        """The next frame from the server, or None at EOF."""
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def read_until_eof(self, timeout: float = 5.0) -> list[Frame]:
        """Every frame until the server closes the connection."""
        out = []
        while (f := await self.read_frame(timeout)) is not None:
            out.append(f)
        return out

    async def handshake(self, secret: auth.Secret = SECRET) -> None:
        """Authenticate as a client, by hand, as another implementation would."""
        mine = auth.new_nonce()
        hello = {"role": "client", "peer": "raw", "nonce": mine, "host": "elsewhere"}
        await self.write(frame_bytes(MsgType.HELLO, hello))
        f = await self.read_frame()
        assert f is not None and f.type == MsgType.HELLO, f
        theirs = f.decode()["nonce"]
        await self.write(
            frame_bytes(MsgType.AUTH, {"proof": auth.proof(secret, "client", mine, theirs)})
        )
        f = await self.read_frame()
        assert f is not None and f.type == MsgType.AUTH, f
        assert auth.verify(secret, "server", theirs, mine, f.decode()["proof"])

    def close(self) -> None:
        self.writer.close()


class TransportUnderTest:
    """One transport kind: how to serve on it and how to reach it."""

    kind = "tcp"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._listeners: list[endpoints.Listener] = []
        self._conns: list[Connection] = []
        self._raws: list[RawPeer] = []

    async def serve(
        self, handler: endpoints.OnConnection, cfg: DataPlaneConfig
    ) -> endpoints.Listener:
        """Start a server on this transport (closed by :meth:`cleanup` at the latest)."""
        lst = await self._serve(handler, cfg)
        self._listeners.append(lst)
        return lst

    async def client(
        self, listener: endpoints.Listener, cfg: DataPlaneConfig, secret: auth.Secret = SECRET
    ) -> Connection:
        """A real, authenticated client connection."""
        conn = await self._client(listener, cfg, secret)
        self._conns.append(conn)
        return conn

    async def raw(self, listener: endpoints.Listener) -> RawPeer:
        """A byte-level peer (no handshake yet)."""
        peer = await self._raw(listener)
        self._raws.append(peer)
        return peer

    async def cleanup(self) -> None:
        """Close whatever a test opened, passed or failed.

        Anything left open keeps a handle in the event loop, and uvloop's ``close()``
        then waits forever: a failing test would hang the suite instead of failing.
        """
        for peer in self._raws:
            peer.writer.transport.abort()
        for conn in self._conns:
            conn.abort()
        for lst in self._listeners:
            await lst.close(2.0)
        self._raws, self._conns, self._listeners = [], [], []

    def config(self, **overrides: Any) -> DataPlaneConfig:
        base: dict[str, Any] = {"transport": "tcp", "handshake_timeout_s": 2.0}
        return DataPlaneConfig(**{**base, **overrides})

    async def _serve(
        self, handler: endpoints.OnConnection, cfg: DataPlaneConfig
    ) -> endpoints.Listener:
        return await endpoints.listen(cfg, SECRET, handler, "server")

    async def _client(
        self, listener: endpoints.Listener, cfg: DataPlaneConfig, secret: auth.Secret = SECRET
    ) -> Connection:
        return await endpoints.connect(listener.address.url(), cfg, secret, "client", 5.0)

    async def _raw(self, listener: endpoints.Listener) -> RawPeer:
        a = listener.address
        r, w = await asyncio.open_connection(a.host, a.port)
        return RawPeer(r, w)


class UnixUnderTest(TransportUnderTest):
    """The same-host fast path, picked automatically from a TCP address."""

    kind = "unix"

    def config(self, **overrides: Any) -> DataPlaneConfig:
        return super().config(**{"transport": "auto", **overrides})

    async def _raw(self, listener: endpoints.Listener) -> RawPeer:
        r, w = await asyncio.open_unix_connection(listener.address.path)
        return RawPeer(r, w)


class MemoryUnderTest(TransportUnderTest):
    """In-memory transport (unit tests)."""

    kind = "memory"

    async def _serve(
        self, handler: endpoints.OnConnection, cfg: DataPlaneConfig
    ) -> endpoints.Listener:
        name = f"conformance-{secrets.token_hex(4)}"
        return await endpoints.listen(cfg, SECRET, handler, "server", memory_name=name)

    async def _raw(self, listener: endpoints.Listener) -> RawPeer:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        proto = asyncio.StreamReaderProtocol(reader)
        transport, _ = memory.connect(listener.address.path, lambda: proto)
        return RawPeer(reader, asyncio.StreamWriter(transport, proto, reader, loop))


class TlsUnderTest(TransportUnderTest):
    """TCP with mutual TLS (certificates from a throw-away CA)."""

    kind = "tls"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        import trustme

        ca = trustme.CA()
        self.ca_path = workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        self.files: dict[str, tuple[str, str]] = {}
        for who in ("server", "client"):
            cert = ca.issue_cert("127.0.0.1", "localhost")
            c, k = workdir / f"{who}.pem", workdir / f"{who}.key"
            cert.cert_chain_pems[0].write_to_path(str(c))
            cert.private_key_pem.write_to_path(str(k))
            self.files[who] = (str(c), str(k))

    def tls(self, who: str) -> TlsConfig:
        cert, key = self.files[who]
        return TlsConfig(cert=cert, key=key, ca=str(self.ca_path))

    def config(self, **overrides: Any) -> DataPlaneConfig:
        return super().config(**{"tls": self.tls("server"), **overrides})

    async def _client(
        self, listener: endpoints.Listener, cfg: DataPlaneConfig, secret: auth.Secret = SECRET
    ) -> Connection:
        cfg = cfg.model_copy(update={"tls": self.tls("client")})
        return await super()._client(listener, cfg, secret)

    async def _raw(self, listener: endpoints.Listener) -> RawPeer:
        t = self.tls("client")
        ctx = auth.TlsFiles(t.cert, t.key, t.ca).client_context()
        a = listener.address
        r, w = await asyncio.open_connection(a.host, a.port, ssl=ctx, server_hostname=a.host)
        return RawPeer(r, w)


TRANSPORTS: dict[str, type[TransportUnderTest]] = {
    "memory": MemoryUnderTest,
    "tcp": TransportUnderTest,
    "unix": UnixUnderTest,
    "tls": TlsUnderTest,
}


def make(kind: str, workdir: Path | None = None) -> TransportUnderTest:
    """A transport under test by name (``memory``, ``tcp``, ``unix``, ``tls``, ``ucx``)."""
    wd = workdir or Path(tempfile.mkdtemp(prefix="dvla-conf-"))
    return TRANSPORTS[kind](wd)


def client_ssl(t: TlsUnderTest) -> ssl.SSLContext:
    """The raw client's TLS context (for tests that open sockets themselves)."""
    c = t.tls("client")
    return auth.TlsFiles(c.cert, c.key, c.ca).client_context()


class UcxUnderTest(TransportUnderTest):
    """UCX (ucxx tag messages); registered only where the ucxx package is installed."""

    kind = "ucx"

    def config(self, **overrides: Any) -> DataPlaneConfig:
        return super().config(**{"transport": "ucx", **overrides})

    async def _raw(self, listener: endpoints.Listener) -> RawPeer:
        from dvla.transport import ucx

        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        a = listener.address
        transport, proto = await asyncio.wait_for(
            ucx.open_transport(a.host, a.port, lambda: asyncio.StreamReaderProtocol(reader)), 10
        )
        return RawPeer(reader, asyncio.StreamWriter(transport, proto, reader, loop))


def _ucx_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ucxx") is not None


if _ucx_installed():
    TRANSPORTS["ucx"] = UcxUnderTest


async def guarded(t: TransportUnderTest, coro: Awaitable[T]) -> T:
    """Run a test body, then close everything it opened on ``t``."""
    try:
        return await coro
    finally:
        await t.cleanup()
