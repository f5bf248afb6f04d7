"""Listening and connecting: TCP (optionally TLS), Unix sockets, in-memory, UCX.

A server listens on TCP and, unless the transport is pinned to TCP, on a Unix socket
too. Its address names both plus an id of its host; a client on the same host (same id,
socket file present) takes the Unix socket automatically, any other takes TCP. Every
transport ends in the same :class:`~dvla.transport.connection.Connection`, so nothing
above this module knows which one carries it.

Addresses are URLs: ``tcp://HOST:PORT[?unix=PATH&host=ID]``, ``unix:///PATH``,
``mem://NAME`` (tests) and ``ucx://HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

from dvla import logs
from dvla.config import DataPlaneConfig
from dvla.errors import ConfigError
from dvla.transport import auth, memory
from dvla.transport.connection import ChannelError, Connection, FrameProtocol
from dvla.transport.frames import FrameError

log = logs.get(__name__)

OnConnection = Callable[[Connection], Awaitable[None]]


@dataclass(frozen=True)
class Address:
    """Where a data-plane server can be reached."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""  # unix socket path, or memory name
    host_id: str = ""

    def url(self) -> str:
        if self.scheme in ("tcp", "ucx"):
            base = f"{self.scheme}://{self.host}:{self.port}"
            if self.path:
                return f"{base}?unix={quote(self.path)}&host={self.host_id}"
            return base
        if self.scheme == "unix":
            return f"unix://{self.path}"
        return f"mem://{self.path}"

    @staticmethod
    def parse(url: str) -> Address:
        """Parse a data-plane URL.

        Raises:
            ConfigError: not one of the supported forms.
        """
        parts = urlsplit(url)
        if parts.scheme in ("tcp", "ucx"):
            if not parts.hostname or parts.port is None:
                raise ConfigError(
                    f"data-plane address {url!r}: expected {parts.scheme}://HOST:PORT"
                )
            q = parse_qs(parts.query)
            return Address(
                parts.scheme,
                parts.hostname,
                parts.port,
                q.get("unix", [""])[0],
                q.get("host", [""])[0],
            )
        if parts.scheme == "unix" and parts.path:
            return Address("unix", path=parts.path)
        if parts.scheme == "mem" and parts.netloc:
            return Address("mem", path=parts.netloc)
        raise ConfigError(
            f"data-plane address {url!r}: expected tcp://HOST:PORT, unix:///PATH or mem://NAME"
        )


#: Listeners and connections still open, for :func:`abort_all` (tests' safety net).
_LIVE_LISTENERS: weakref.WeakSet[Listener] = weakref.WeakSet()
_LIVE_CONNS: weakref.WeakSet[Connection] = weakref.WeakSet()


async def abort_all(timeout: float = 2.0) -> int:
    """Close every listener and abort every connection of the running loop; return how many.

    uvloop's ``loop.close()`` waits for every open handle, so a test that fails with a
    server still listening would hang instead of failing; test runners call this last.
    """
    loop = asyncio.get_running_loop()
    conns = [c for c in list(_LIVE_CONNS) if not c.closed.is_set() and c.loop is loop]
    for conn in conns:
        conn.abort()
    listeners = [x for x in list(_LIVE_LISTENERS) if x.loop is loop]
    for lst in listeners:
        await lst.close(timeout)
    return len(conns) + len(listeners)


class Listener:
    """A running data-plane server: accepts, authenticates, hands connections over."""

    def __init__(
        self, cfg: DataPlaneConfig, secret: auth.Secret, on_connection: OnConnection, name: str
    ) -> None:
        self.cfg = cfg
        self.secret = secret
        self.on_connection = on_connection
        self.name = name
        self.address = Address("tcp")
        self._servers: list[asyncio.AbstractServer] = []
        self._ucx: object | None = None
        self._unix_path = ""
        self._mem_name = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections: set[Connection] = set()
        self.rejected = 0

    def _factory(self) -> FrameProtocol:
        proto = FrameProtocol()
        proto.on_made = self._made
        return proto

    def _made(self, proto: FrameProtocol) -> None:
        assert proto.transport is not None
        conn = Connection(proto.transport, proto, self.cfg)
        _LIVE_CONNS.add(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: Connection) -> None:
        try:
            await conn.handshake(self.secret, "server", self.name, self._unix_path or None)
        except FrameError as err:
            self.rejected += 1
            if not err.code.startswith("peer-"):
                conn.protocol.fail(err)
            conn.transport.close()
            log.warning("data plane connection rejected", reason=f"{err.code}: {err}")
            await conn.wait_lost(2.0)
            return
        conn.start()
        self.connections.add(conn)
        try:
            await self.on_connection(conn)
        except Exception as err:
            log.warning(
                "data plane handler failed", peer=conn.peer, error=f"{type(err).__name__}: {err}"
            )
        finally:
            self.connections.discard(conn)
            await conn.close("server handler finished")

    async def start(self, memory_name: str | None = None) -> None:
        self.loop = loop = asyncio.get_running_loop()
        _LIVE_LISTENERS.add(self)
        cfg = self.cfg
        if memory_name is not None:
            memory.serve(memory_name, self._factory)
            self._mem_name = memory_name
            self.address = Address("mem", path=memory_name)
            return
        if cfg.transport == "ucx":
            from dvla.transport import ucx

            self._ucx, port = await ucx.listen(self, cfg.host, cfg.port)
            self.address = Address("ucx", cfg.host, port)
            return
        if cfg.transport in ("auto", "unix"):
            self._unix_path = os.path.join(
                tempfile.gettempdir(), f"dvla-{os.getpid()}-{secrets.token_hex(4)}.sock"
            )
            self._servers.append(await loop.create_unix_server(self._factory, self._unix_path))
            os.chmod(self._unix_path, 0o600)
        ssl_ctx = cfg.tls and auth.TlsFiles(cfg.tls.cert, cfg.tls.key, cfg.tls.ca).server_context()
        tcp = await loop.create_server(self._factory, cfg.host, cfg.port, ssl=ssl_ctx or None)
        self._servers.append(tcp)
        port = tcp.sockets[0].getsockname()[1]
        self.address = Address("tcp", cfg.host, port, self._unix_path, auth.host_id())

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, remove the socket file."""
        _LIVE_LISTENERS.discard(self)
        for server in self._servers:
            server.close()
        if self._ucx is not None:
            from dvla.transport import ucx

            ucx.close_listener(self._ucx)
        if self._mem_name:
            memory.unserve(self._mem_name)
        conns = list(self.connections)
        await asyncio.gather(*(c.close("server stopping", timeout) for c in conns))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout)
        if self._unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)


async def listen(
    cfg: DataPlaneConfig,
    secret: auth.Secret,
    on_connection: OnConnection,
    name: str = "coordinator",
    memory_name: str | None = None,
) -> Listener:
    """Start a data-plane server; ``memory_name`` serves in-memory only (tests)."""
    listener = Listener(cfg, secret, on_connection, name)
    await listener.start(memory_name)
    return listener


def same_host(addr: Address) -> bool:
    """Whether ``addr``'s Unix socket is reachable from here."""
    return bool(addr.path) and addr.host_id == auth.host_id() and os.path.exists(addr.path)


async def _open(addr: Address, cfg: DataPlaneConfig) -> tuple[asyncio.BaseTransport, FrameProtocol]:
    loop = asyncio.get_running_loop()
    if addr.scheme == "mem":
        t, p = memory.connect(addr.path, FrameProtocol)
        assert isinstance(p, FrameProtocol)
        return t, p
    if addr.scheme == "ucx":
        from dvla.transport import ucx

        return await ucx.connect(addr.host, addr.port)
    use_unix = addr.scheme == "unix" or (cfg.transport in ("auto", "unix") and same_host(addr))
    if use_unix:
        path = addr.path
        try:
            return await loop.create_unix_connection(FrameProtocol, path)
        except OSError:
            if addr.scheme == "unix" or cfg.transport == "unix":
                raise
            log.debug("unix fast path unavailable; using TCP", path=path)
    if cfg.transport == "unix":
        raise ConnectionRefusedError(
            f"transport 'unix' needs a same-host peer; {addr.url()} is not"
        )
    ssl_ctx = cfg.tls and auth.TlsFiles(cfg.tls.cert, cfg.tls.key, cfg.tls.ca).client_context()
    return await loop.create_connection(
        FrameProtocol,
        addr.host,
        addr.port,
        ssl=ssl_ctx or None,
        server_hostname=addr.host if ssl_ctx else None,
    )


async def connect(
    url: str, cfg: DataPlaneConfig, secret: auth.Secret, name: str, timeout: float | None = None
) -> Connection:
    """Open and authenticate one connection (no retries; see the channel for those).

    Raises:
        ChannelError: nothing listens there, the handshake failed, or time ran out.
    """
    addr = Address.parse(url)
    timeout = cfg.connect_timeout_s if timeout is None else timeout
    try:
        transport, proto = await asyncio.wait_for(_open(addr, cfg), timeout)
    except (OSError, TimeoutError) as err:
        raise ChannelError(f"data plane: cannot connect to {url}: {err or 'timed out'}") from None
    conn = Connection(transport, proto, cfg)
    _LIVE_CONNS.add(conn)
    try:
        await conn.handshake(secret, "client", name, None)
    except FrameError as err:
        if not err.code.startswith("peer-"):
            proto.fail(err)  # tell the server why, as it would tell us
        transport.close()
        raise ChannelError(f"data plane: handshake with {url} failed: {err}") from None
    conn.start()
    return conn


def transport_kind(conn: Connection) -> str:
    """Which transport carries ``conn`` (for logs and tests)."""
    t = conn.transport
    if isinstance(t, memory.MemoryTransport):
        return "memory"
    if type(t).__name__.startswith("Ucx"):
        return "ucx"
    sock = t.get_extra_info("socket")
    family = getattr(sock, "family", None)
    if family is not None and family.name == "AF_UNIX":
        return "unix"
    return "tls" if t.get_extra_info("sslcontext") is not None else "tcp"
