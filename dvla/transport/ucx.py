"""UCX data-plane transport: an asyncio transport over one ucxx endpoint.

UCX moves *messages*, not a byte stream, and knows nothing of asyncio's flow control, so
this module puts a small stream protocol on top of ucxx tag messages and exposes it as an
ordinary :class:`asyncio.Transport`. The connection code above it therefore runs
unchanged on UCX, exactly as on TCP or a Unix socket.

Every message starts with one kind byte:

* ``D`` + bytes: stream data. Writes are copied into chunks of at most ``_MAX_MSG``
  bytes, so one send carries many small frames and a huge frame goes out in pieces.
* ``C`` + 8-byte count: credit. A sender may have at most ``_WINDOW`` bytes that its
  peer has not yet handed to its protocol; the peer returns credit as its protocol takes
  them, never while reading is paused. A slow reader thereby fills the sender's write
  buffer, which pauses the sender's protocol, as a full socket would, and the receiver
  never holds more than one window.
* ``F``: end of stream (like a TCP FIN), answered by ``A``. UCX reports a clean close
  and a killed peer alike, so FIN tells them apart: EOF then ``connection_lost(None)``
  for the first, ``connection_lost(ConnectionResetError)`` for the second. The closing
  side closes the endpoint only once its FIN is acknowledged, so nothing written before
  ``close()`` is lost in flight.

Why tag messages and not ucxx's active messages: ucxx files arrived active messages
under the endpoint's address, and a new endpoint at a reused address receives what was
sent to a closed one (even its close notice). Tags are drawn at random per connection,
so a late message for an old connection can never reach a new one. The receiver also
learns a message's size before accepting it, and refuses one larger than any chunk.

ucxx wakes a waiting coroutine by polling (``await asyncio.sleep(0)`` in a loop, 100 % of
a core while idle) unless its notifier thread is on, and that thread aborts the process
when too many messages arrive at once. The receiver therefore probes for messages itself
and sleeps between probes, briefly at first and longer the longer the endpoint stays
idle (``_POLL_*``); a probed message is then fetched at once.

ucxx is imported lazily, so ``import dvla`` works without it; the first use sets UCX
defaults (the TCP transport) through the environment unless they are already set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from dvla import logs
from dvla.errors import ConfigError
from dvla.transport.connection import FrameProtocol

log = logs.get(__name__)

#: Set before ucxx is first imported, unless the environment already says otherwise.
#: ``sm`` alone cannot connect a listener and an endpoint; ``tcp,sm`` works but moved
#: about half the bytes per second of ``tcp`` on one host. On InfiniBand or NVLink set
#: ``UCX_TLS`` yourself (e.g. ``rc,tcp`` or ``all``).
_ENV_DEFAULTS = {"UCX_TLS": "tcp", "UCX_WARN_UNUSED_ENV_VARS": "n"}
_MISSING = "data_plane.transport 'ucx' needs the ucxx package: pip install 'dvla[ucx]'"

_MAX_MSG = 2 * 1024 * 1024  # payload bytes per message
_WINDOW = 8 * 1024 * 1024  # bytes a sender may have unconsumed at its peer
_GRANT_AT = _WINDOW // 4  # consumed bytes that trigger a credit message
_OP_TIMEOUT_S = 30.0  # one send/receive in flight longer than this: the peer is dead
_CLOSE_TIMEOUT_S = 30.0  # close(): flush, FIN and its acknowledgement within this
_IDLE_WAIT_S = 1.0  # the idle sender wakes this often to re-check its state
_POLL_SPIN_S = 0.0002  # after a message, probe on every loop iteration this long
_POLL_MIN_S = 0.001  # then sleep at least this long between probes
_POLL_MAX_S = 0.005  # and at most this long (the added latency of an idle endpoint)
_ABORT_NS = 10**9  # longest UCX may take to tear an endpoint down

_DATA, _CREDIT, _FIN, _ACK = b"D", b"C", b"F", b"A"

P = TypeVar("P", bound=asyncio.BaseProtocol)


def _ucxx() -> Any:
    """The ucxx module, imported on first use after setting the UCX defaults.

    Raises:
        ConfigError: ucxx is not installed.
    """
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        import ucxx
    except ImportError:
        raise ConfigError(_MISSING) from None
    return ucxx


class UcxTransport(asyncio.Transport):
    """A byte-stream transport over one ucxx endpoint; see the module docstring."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        endpoint: Any,
        protocol: asyncio.BaseProtocol,
        peername: Any = None,
    ) -> None:
        super().__init__({"peername": peername, "sockname": None})
        self._loop = loop
        self._ep = endpoint
        self._protocol = protocol
        # Sending: chunks of b"D" + payload; the newest still takes writes.
        self._out: deque[bytearray] = deque()
        self._open_chunk: bytearray | None = None
        self._inflight: bytearray | None = None  # kept alive while UCX may read it
        self._buffered = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._write_paused = False
        self._credit = _WINDOW
        self._to_grant = 0
        self._wake = asyncio.Event()
        # Receiving: arrived data (and the FIN, as None) waiting for the protocol.
        self._inbox: deque[memoryview | None] = deque()
        self._paused = False
        self._pump_scheduled = False
        # Closing.
        self._closing = False  # close(): no more reads or writes, then FIN
        self._eof_wanted = False  # write_eof(): no more writes, then FIN
        self._fin_sent = False
        self._fin_acked = False
        self._fin_received = False
        self._ack_due = False
        self._lost = False
        self._deadline: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _start(self) -> None:
        self._protocol.connection_made(self)
        if self._lost:  # the protocol aborted in connection_made
            return
        self._tasks = [
            self._loop.create_task(self._send_loop(), name="dvla-ucx-send"),
            self._loop.create_task(self._recv_loop(), name="dvla-ucx-recv"),
        ]

    # ------------------------------------------------------------ WriteTransport
    def write(self, data: Any) -> None:
        if self._closing or self._eof_wanted or self._lost:
            return
        view = memoryview(data).cast("B")
        n = len(view)
        if not n:
            return
        pos = 0
        while pos < n:
            chunk = self._open_chunk
            if chunk is None or len(chunk) > _MAX_MSG:
                chunk = bytearray(_DATA)
                self._out.append(chunk)
                self._open_chunk = chunk
            take = min(n - pos, _MAX_MSG + 1 - len(chunk))
            chunk += view[pos : pos + take]
            pos += take
        self._buffered += n
        if self._buffered > self._high and not self._write_paused:
            self._write_paused = True
            self._protocol.pause_writing()
        self._wake.set()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 4 * low if low is not None else 64 * 1024
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        if self._buffered > self._high and not self._write_paused:
            self._write_paused = True
            self._protocol.pause_writing()
        self._maybe_resume_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Finish the sending side; the peer may go on writing until it closes too."""
        if self._eof_wanted or self._closing or self._lost:
            return
        self._eof_wanted = True
        self._wake.set()

    # ------------------------------------------------------------- ReadTransport
    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._schedule_pump()

    def is_reading(self) -> bool:
        return not self._paused and not self._closing and not self._lost

    # ------------------------------------------------------------- BaseTransport
    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Flush what is queued, send FIN, and close the endpoint once it is acknowledged."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._schedule_pump()  # drop what is unread, and return its credit
        self._deadline = self._loop.call_later(_CLOSE_TIMEOUT_S, self._close_timed_out)
        self._wake.set()
        self._check_done()

    def abort(self) -> None:
        """Drop everything and close the endpoint now; the peer sees a reset."""
        self._finish(None)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    # ------------------------------------------------------------------ sending
    def _maybe_resume_writing(self) -> None:
        if self._write_paused and self._buffered <= self._low:
            self._write_paused = False
            self._protocol.resume_writing()

    async def _send(self, msg: bytearray) -> None:
        self._inflight = msg
        await asyncio.wait_for(self._ep.send(msg), _OP_TIMEOUT_S)

    async def _send_loop(self) -> None:
        try:
            while not self._lost:
                if not self._wake.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), _IDLE_WAIT_S)
                    continue
                self._wake.clear()
                if self._ack_due:
                    self._ack_due = False
                    await self._send(bytearray(_ACK))
                if self._to_grant >= _GRANT_AT:
                    grant, self._to_grant = self._to_grant, 0
                    await self._send(bytearray(_CREDIT + grant.to_bytes(8, "little")))
                while self._out and self._credit >= len(self._out[0]) - 1 and not self._lost:
                    chunk = self._out.popleft()
                    if chunk is self._open_chunk:
                        self._open_chunk = None
                    await self._send(chunk)
                    n = len(chunk) - 1
                    self._credit -= n
                    self._buffered -= n
                    self._maybe_resume_writing()
                    if self._ack_due or self._to_grant >= _GRANT_AT:
                        self._wake.set()
                        break  # answer the peer before the next chunk
                if (self._closing or self._eof_wanted) and not self._out and not self._fin_sent:
                    await self._send(bytearray(_FIN))
                    self._fin_sent = True
                    self._check_done()
        except asyncio.CancelledError:
            self._finish(None)  # e.g. the event loop shuts down: do not leak the endpoint
            raise
        except Exception as err:
            self._finish(_reset("send", err))

    # ---------------------------------------------------------------- receiving
    async def _recv_msg(self) -> bytearray | None:
        """The next message, or None once the endpoint is closed and nothing is left."""
        ep = self._ep
        idle_since = time.monotonic()
        delay = 0.0
        while True:
            probe = ep.tag_probe(remove=True)
            if probe.matched:
                break
            if ep.closed:  # what arrived before the close can still be received
                probe = ep.tag_probe(remove=True)
                if probe.matched:
                    break
                return None
            await asyncio.sleep(delay)
            idle = time.monotonic() - idle_since
            delay = 0.0 if idle < _POLL_SPIN_S else min(max(idle / 8, _POLL_MIN_S), _POLL_MAX_S)
        size = int(probe.length)
        if not 0 < size <= _MAX_MSG + 1:
            raise ConnectionResetError(f"UCX peer sent a message of {size} bytes")
        buf = bytearray(size)
        await asyncio.wait_for(ep.recv_with_handle(buf, probe), _OP_TIMEOUT_S)
        return buf

    async def _recv_loop(self) -> None:
        try:
            while not self._lost:
                msg = await self._recv_msg()
                if msg is None:
                    raise ConnectionResetError("UCX peer closed the connection without EOF")
                kind = bytes(msg[:1])
                if kind == _DATA and len(msg) > 1:
                    self._inbox.append(memoryview(msg)[1:])
                    self._pump()
                elif kind == _CREDIT and len(msg) == 9:
                    self._credit += int.from_bytes(msg[1:], "little")
                    self._wake.set()
                elif kind == _FIN and not self._fin_received:
                    self._fin_received = True
                    self._ack_due = True
                    self._wake.set()
                    self._inbox.append(None)
                    self._pump()
                elif kind == _ACK and self._fin_sent:
                    self._fin_acked = True
                    self._check_done()
                else:
                    raise ConnectionResetError(f"UCX peer broke the stream protocol ({kind!r})")
        except asyncio.CancelledError:
            self._finish(None)
            raise
        except Exception as err:
            if self._lost:
                return
            # The endpoint failed: a clean end if the peer had finished its stream.
            clean = self._fin_received and not self._out and not self._inbox
            self._finish(None if clean else _reset("receive", err))

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and not self._lost:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Hand arrived data to the protocol until it pauses reading; then the EOF."""
        self._pump_scheduled = False
        try:
            self._deliver()
        except Exception as err:  # a protocol callback failed: end this connection only
            log.warning("ucx protocol callback failed", error=f"{type(err).__name__}: {err}")
            self._finish(err)

    def _deliver(self) -> None:
        proto = self._protocol
        while self._inbox and not self._lost:
            if self._closing:  # unread data is dropped, but its credit goes back
                data = self._inbox.popleft()
                self._to_grant += len(data) if data is not None else 0
                continue
            if self._paused:
                break
            data = self._inbox[0]
            if data is None:
                self._inbox.popleft()
                keep_open = proto.eof_received()  # type: ignore[attr-defined]
                if not keep_open:
                    self.close()
                self._check_done()
                continue
            if isinstance(proto, asyncio.BufferedProtocol):
                buf = memoryview(proto.get_buffer(len(data))).cast("B")
                k = min(len(buf), len(data))
                if not k:
                    raise RuntimeError("the protocol offered an empty buffer")
                buf[:k] = data[:k]
                rest = data[k:]
                if len(rest):
                    self._inbox[0] = rest
                else:
                    self._inbox.popleft()
                self._to_grant += k
                proto.buffer_updated(k)
            else:
                self._inbox.popleft()
                self._to_grant += len(data)
                proto.data_received(bytes(data))  # type: ignore[attr-defined]
        if self._to_grant >= _GRANT_AT:
            self._wake.set()

    # ------------------------------------------------------------------ closing
    def _check_done(self) -> None:
        """Close the endpoint once our FIN is acknowledged and nothing more is wanted."""
        if self._lost or not (self._fin_sent and self._fin_acked):
            return
        if self._closing or (self._fin_received and not self._inbox):
            self._finish(None)

    def _close_timed_out(self) -> None:
        self._finish(TimeoutError(f"UCX peer did not take the last data in {_CLOSE_TIMEOUT_S:g} s"))

    def _finish(self, exc: Exception | None) -> None:
        """Close the endpoint and tell the protocol, exactly once."""
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._deadline is not None:
            self._deadline.cancel()
        current = asyncio.current_task(self._loop) if self._loop.is_running() else None
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._out.clear()
        self._open_chunk = None
        self._buffered = 0
        self._inbox.clear()
        try:
            self._ep.abort(period=_ABORT_NS)
        except Exception as err:  # the endpoint is gone either way
            log.debug("ucx endpoint close failed", error=f"{type(err).__name__}: {err}")
        self._wake.set()
        self._loop.call_soon(self._protocol.connection_lost, exc)


def _reset(where: str, err: BaseException) -> ConnectionResetError:
    if isinstance(err, ConnectionResetError):
        return err
    if isinstance(err, TimeoutError):
        return ConnectionResetError(f"UCX {where} made no progress in {_OP_TIMEOUT_S:g} s")
    return ConnectionResetError(f"UCX {where} failed: {type(err).__name__}: {err}")


def _attach(
    loop: asyncio.AbstractEventLoop, endpoint: Any, protocol: asyncio.BaseProtocol, peer: Any
) -> UcxTransport:
    transport = UcxTransport(loop, endpoint, protocol, peer)
    transport._start()
    return transport


class Acceptor(Protocol):
    """What :func:`listen` needs of the data-plane listener: a protocol per connection."""

    def _factory(self) -> FrameProtocol: ...


async def listen(acceptor: Acceptor, host: str, port: int) -> tuple[Any, int]:
    """Accept UCX connections on ``port``; each gets a protocol from ``acceptor``.

    ucxx cannot bind one address: UCX listens on every interface, so ``host`` only names
    this server in its address. The handshake's secret keeps strangers out either way.

    Returns:
        The listener handle (for :func:`close_listener`) and the port it listens on.

    Raises:
        ConfigError: ucxx is not installed.
        OSError: the port cannot be used.
    """
    ucxx = _ucxx()
    loop = asyncio.get_running_loop()

    async def accepted(endpoint: Any) -> None:
        try:
            _attach(loop, endpoint, acceptor._factory(), None)
        except Exception as err:
            log.warning("ucx connection setup failed", error=f"{type(err).__name__}: {err}")
            with contextlib.suppress(Exception):
                endpoint.abort(period=_ABORT_NS)

    try:
        handle = ucxx.create_listener(accepted, port=port)
    except Exception as err:
        raise OSError(f"UCX cannot listen on port {port}: {err}") from None
    if host not in ("0.0.0.0", "::", ""):
        # ucxx cannot bind one address; only the HMAC handshake guards the others.
        log.warning(
            "ucx listener is reachable on every interface, not only the configured host",
            host=host,
            port=handle.port,
        )
    return handle, int(handle.port)


def close_listener(handle: Any) -> None:
    """Stop accepting; open connections stay."""
    handle.close()


async def _resolve(host: str, port: int) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    return str(infos[0][4][0])


async def open_transport(host: str, port: int, factory: Callable[[], P]) -> tuple[UcxTransport, P]:
    """Connect to a UCX listener and run ``factory()``'s protocol over the connection.

    Raises:
        ConfigError: ucxx is not installed.
        OSError: nothing listens there (UCX reports it as a timeout after a few seconds).
    """
    ucxx = _ucxx()
    loop = asyncio.get_running_loop()
    ip = await _resolve(host, port)
    try:
        endpoint = await ucxx.create_endpoint(ip, port)
    except OSError:
        raise
    except Exception as err:
        raise ConnectionRefusedError(f"UCX cannot reach {host}:{port}: {err}") from None
    protocol = factory()
    try:
        transport = _attach(loop, endpoint, protocol, (host, port))
    except BaseException:
        with contextlib.suppress(Exception):
            endpoint.abort(period=_ABORT_NS)
        raise
    return transport, protocol


async def connect(host: str, port: int) -> tuple[UcxTransport, FrameProtocol]:
    """Open a data-plane connection over UCX (see :func:`open_transport`)."""
    return await open_transport(host, port, FrameProtocol)
