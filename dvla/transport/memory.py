"""An in-memory byte transport: two asyncio transports wired back to back in one loop.

It behaves like a socket for everything the connection code relies on (buffered
protocols, write-buffer flow control, pause/resume of reading, EOF, abort), so unit tests
and the conformance suite run the real protocol code without opening a port.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

_SERVERS: dict[str, Callable[[], asyncio.BaseProtocol]] = {}


class MemoryTransport(asyncio.Transport):
    """One end of an in-memory connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self.peer: MemoryTransport | None = None
        self._out: deque[memoryview] = deque()
        self._buffered = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._write_paused = False
        self._reading_paused = False
        self._closing = False
        self._lost = False
        self._eof_sent = False
        self._scheduled = False

    # -- WriteTransport
    def write(self, data: Any) -> None:
        if self._closing or self._lost:
            return
        chunk = memoryview(bytes(data))
        if not len(chunk):
            return
        self._out.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > self._high and not self._write_paused:
            self._write_paused = True
            self._protocol.pause_writing()
        self._schedule()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high if high is not None else 64 * 1024
        self._low = low if low is not None else self._high // 4

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._closing = True
        self._schedule()

    # -- ReadTransport
    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self.peer is not None:
            self.peer._schedule()

    def is_reading(self) -> bool:
        return not self._reading_paused

    # -- BaseTransport
    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        self._closing = True
        self._schedule()

    def abort(self) -> None:
        """Vanish without EOF, like a killed process: the peer sees a reset."""
        self._out.clear()
        self._buffered = 0
        self._closing = True
        self._lose(None)
        if self.peer is not None:
            self.peer._lose(ConnectionResetError("peer aborted"))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": "memory", "sockname": "memory"}.get(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    # -- delivery
    def _schedule(self) -> None:
        if not self._scheduled and not self._lost:
            self._scheduled = True
            self._loop.call_soon(self._pump)

    def _lose(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self._loop.call_soon(self._protocol.connection_lost, exc)

    def _pump(self) -> None:
        self._scheduled = False
        peer = self.peer
        if self._lost or peer is None or peer._lost:
            return
        proto = peer._protocol
        while self._out and not peer._reading_paused:
            chunk = self._out.popleft()
            if isinstance(proto, asyncio.BufferedProtocol):
                while len(chunk):
                    buf = memoryview(proto.get_buffer(len(chunk)))
                    n = min(len(buf), len(chunk))
                    buf[:n] = chunk[:n]
                    chunk = chunk[n:]
                    self._buffered -= n
                    proto.buffer_updated(n)
                    if peer._reading_paused and len(chunk):
                        self._out.appendleft(chunk)
                        break
            else:
                self._buffered -= len(chunk)
                proto.data_received(bytes(chunk))  # type: ignore[attr-defined]
            if peer._lost or self._lost:
                return
        if self._write_paused and self._buffered <= self._low:
            self._write_paused = False
            self._protocol.resume_writing()
        if self._closing and not self._out and not self._eof_sent:
            self._eof_sent = True
            keep_open = proto.eof_received()  # type: ignore[attr-defined]
            if not keep_open:
                peer._lose(None)
            self._lose(None)


def serve(name: str, factory: Callable[[], asyncio.BaseProtocol]) -> None:
    """Accept in-memory connections to ``mem://name``."""
    if name in _SERVERS:
        raise OSError(f"mem://{name} is already in use")
    _SERVERS[name] = factory


def unserve(name: str) -> None:
    """Stop accepting on ``mem://name``; open connections stay."""
    _SERVERS.pop(name, None)


def connect(
    name: str, factory: Callable[[], asyncio.BaseProtocol]
) -> tuple[MemoryTransport, asyncio.BaseProtocol]:
    """Open an in-memory connection to ``mem://name``.

    Raises:
        ConnectionRefusedError: nothing serves that name.
    """
    server_factory = _SERVERS.get(name)
    if server_factory is None:
        raise ConnectionRefusedError(f"nothing listens on mem://{name}")
    loop = asyncio.get_running_loop()
    client_proto = factory()
    server_proto = server_factory()
    a = MemoryTransport(loop, client_proto)
    b = MemoryTransport(loop, server_proto)
    a.peer, b.peer = b, a
    server_proto.connection_made(b)
    client_proto.connection_made(a)
    return a, client_proto
