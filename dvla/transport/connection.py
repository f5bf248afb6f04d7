"""One authenticated data-plane connection over any byte transport.

The receive side is an :class:`asyncio.BufferedProtocol`: the event loop writes incoming
bytes straight into the frame decoder's buffers. A reader task decodes and validates
frames and hands messages to the application; a writer task drains a bounded send queue,
batching every queued frame into one ``writelines`` and waiting for the transport to
drain, so a slow peer slows its senders instead of growing their memory. Heartbeats keep
idle links alive and expose dead ones. Any protocol violation closes this one connection
with a logged reason; nothing else in the process is affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

from dvla import logs
from dvla.config import DataPlaneConfig
from dvla.errors import DvlaError
from dvla.transport import auth, codec
from dvla.transport.frames import (
    PRE_AUTH_MAX_FRAME,
    Frame,
    FrameDecoder,
    FrameError,
    MsgType,
    encode_frame,
    frame_bytes,
)

log = logs.get(__name__)

#: Received frames buffered before reading pauses (receive-side backpressure).
_RECV_HIGH = 8 * 1024 * 1024
_RECV_LOW = 2 * 1024 * 1024
_INBOX = 16


class ChannelError(DvlaError):
    """A data-plane connection could not be made or was lost."""


class FrameProtocol(asyncio.BufferedProtocol):
    """Bytes in, frames out; flow control both ways."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(PRE_AUTH_MAX_FRAME)
        self.transport: asyncio.Transport | None = None
        self.frames: deque[Frame] = deque()
        self.frames_bytes = 0
        self.error: FrameError | None = None
        self.lost = False
        self.can_write = asyncio.Event()
        self.can_write.set()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._sink = memoryview(bytearray(65536))
        self.on_made: Any = None

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        if self.on_made is not None:
            self.on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.error is not None:
            return self._sink  # bytes after a violation are discarded
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.error is not None:
            return
        try:
            frames = self.decoder.buffer_updated(nbytes)
        except FrameError as err:
            self.fail(err)
            return
        for f in frames:
            self.frames.append(f)
            self.frames_bytes += f.size
        if frames:
            self._wake()
        if self.frames_bytes > _RECV_HIGH and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.decoder.mid_frame and self.error is None:
            self.error = FrameError("truncated", "connection ended in the middle of a frame")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is not None and self.error is None and self.decoder.mid_frame:
            self.error = FrameError("truncated", f"connection lost mid-frame: {exc}")
        self.can_write.set()
        self._wake()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    # -- helpers
    def fail(self, err: FrameError) -> None:
        """Tell the peer why (one ERROR frame), then close."""
        if self.error is None:
            self.error = err
        transport = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(
                    frame_bytes(MsgType.ERROR, {"code": err.code, "message": str(err)[:200]})
                )
            transport.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_frame(self, timeout: float) -> Frame | None:
        """The next frame, or None once the connection is over.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        while not self.frames:
            if self.lost or self.error is not None:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self._waiter, timeout)
        f = self.frames.popleft()
        self.frames_bytes -= f.size
        if self._paused and self.frames_bytes < _RECV_LOW and not self.lost:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return f


@dataclass
class ConnStats:
    """Counters of one connection, for status pages and tests."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    heartbeats_out: int = 0
    started: float = field(default_factory=time.monotonic)


Message = tuple[MsgType, dict[str, Any]]


class Connection:
    """A duplex channel of validated messages; see the module docstring."""

    def __init__(
        self, transport: asyncio.BaseTransport, protocol: FrameProtocol, cfg: DataPlaneConfig
    ) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.protocol = protocol
        self.cfg = cfg
        self.peer = "?"
        self.peer_host = ""
        self.peer_unix: str | None = None
        self.close_reason: str | None = None
        self.stats = ConnStats()
        self._inbox: asyncio.Queue[Message | None] = asyncio.Queue(_INBOX)
        self._sendq: deque[tuple[list[memoryview | bytes], int]] = deque()
        self._queued = 0
        self._space = asyncio.Event()
        self._space.set()
        self._has_data = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"Connection(peer={self.peer!r})"

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the send queue and in the transport's write buffer."""
        return self._queued + self.transport.get_write_buffer_size()

    # ----------------------------------------------------------------- handshake
    def _write_now(self, msg_type: MsgType, body: dict[str, Any]) -> None:
        self.transport.writelines(encode_frame(msg_type, body))

    async def _expect(self, want: MsgType, deadline: float) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FrameError("handshake", "handshake not completed in time")
        try:
            frame = await self.protocol.next_frame(remaining)
        except TimeoutError:
            raise FrameError("handshake", "handshake not completed in time") from None
        if frame is None:
            err = self.protocol.error
            raise err if err is not None else FrameError("closed", "peer closed during handshake")
        body = frame.decode()
        if frame.type == MsgType.ERROR:
            body = codec.validate(MsgType.ERROR, body)
            raise FrameError("peer-" + body["code"], f"peer refused: {body['message']}")
        if frame.type != want:
            raise FrameError(
                "handshake", f"expected {want.name} during handshake, got {frame.type.name}"
            )
        return codec.validate(want, body)

    async def handshake(self, secret: auth.Secret, role: str, name: str, unix: str | None) -> None:
        """Mutual HMAC authentication; then the full frame-size limit applies.

        Raises:
            FrameError: the peer failed authentication, broke the protocol or was too slow.
        """
        deadline = time.monotonic() + self.cfg.handshake_timeout_s
        mine = auth.new_nonce()
        hello: dict[str, Any] = {"role": role, "peer": name, "nonce": mine, "host": auth.host_id()}
        if unix:
            hello["unix"] = unix
        if role == "client":
            self._write_now(MsgType.HELLO, hello)
        theirs = await self._expect(MsgType.HELLO, deadline)
        peer_role = "server" if role == "client" else "client"
        if theirs["role"] != peer_role:
            raise FrameError("handshake", f"expected a {peer_role}, got role {theirs['role']!r}")
        if len(theirs["nonce"]) != auth.NONCE_BYTES:
            raise FrameError("handshake", f"nonce must be {auth.NONCE_BYTES} bytes")
        if role == "server":
            self._write_now(MsgType.HELLO, hello)
        self.peer, self.peer_host = theirs["peer"][:64], theirs["host"]
        self.peer_unix = theirs.get("unix")
        if role == "client":
            self._write_now(
                MsgType.AUTH, {"proof": auth.proof(secret, role, mine, theirs["nonce"])}
            )
            # The server may follow its AUTH with large frames in the same read.
            self.protocol.decoder.max_frame = self.cfg.max_frame_bytes
        got = await self._expect(MsgType.AUTH, deadline)
        if not auth.verify(secret, peer_role, theirs["nonce"], mine, got["proof"]):
            raise FrameError("auth", f"{peer_role} failed authentication (wrong secret?)")
        if role == "server":
            self._write_now(
                MsgType.AUTH, {"proof": auth.proof(secret, role, mine, theirs["nonce"])}
            )
        self.protocol.decoder.max_frame = self.cfg.max_frame_bytes

    def start(self) -> None:
        """Start the reader and writer tasks (after the handshake)."""
        self._tasks = [
            asyncio.create_task(self._reader(), name=f"dvla-read-{self.peer}"),
            asyncio.create_task(self._writer(), name=f"dvla-write-{self.peer}"),
        ]

    # ----------------------------------------------------------------- sending
    async def send(self, msg_type: MsgType, body: dict[str, Any], timeout: float = 60.0) -> None:
        """Queue one message; waits while the send queue is full.

        Raises:
            ChannelError: the connection is closed, or no room came within ``timeout``.
        """
        bufs = encode_frame(msg_type, body)
        size = sum(len(b) for b in bufs)
        if size > self.cfg.max_frame_bytes:
            raise ChannelError(
                f"data plane: a {msg_type.name} of {size} bytes exceeds "
                f"data_plane.max_frame_bytes ({self.cfg.max_frame_bytes})"
            )
        deadline = time.monotonic() + timeout
        while self._queued and self._queued + size > self.cfg.send_queue_bytes:
            if self.closed.is_set():
                break
            self._space.clear()
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self._space.wait(), max(remaining, 0))
            except TimeoutError:
                raise ChannelError(
                    f"data plane: peer {self.peer} accepted nothing for {timeout:g} s"
                ) from None
        if self.closed.is_set():
            raise ChannelError(
                f"data plane: connection to {self.peer} is closed ({self.close_reason})"
            )
        self._sendq.append((bufs, size))
        self._queued += size
        self._has_data.set()

    async def _writer(self) -> None:
        transport = self.transport
        interval = self.cfg.heartbeat_interval_s
        try:
            while not self.closed.is_set():
                try:
                    await asyncio.wait_for(self._has_data.wait(), interval)
                except TimeoutError:
                    transport.writelines(encode_frame(MsgType.HEARTBEAT, {"t": time.time()}))
                    self.stats.heartbeats_out += 1
                    continue
                bufs: list[memoryview | bytes] = []
                while self._sendq:
                    frame, size = self._sendq.popleft()
                    bufs.extend(frame)
                    self._queued -= size
                    self.stats.frames_out += 1
                    self.stats.bytes_out += size
                self._has_data.clear()
                transport.writelines(bufs)
                del bufs
                self._space.set()
                try:
                    await asyncio.wait_for(
                        self.protocol.can_write.wait(), self.cfg.heartbeat_timeout_s
                    )
                except TimeoutError:
                    self._close(f"peer accepted no bytes for {self.cfg.heartbeat_timeout_s:g} s")
        except Exception as err:  # a transport error ends this connection only
            self._close(f"write failed: {type(err).__name__}: {err}")

    # ----------------------------------------------------------------- receiving
    async def recv(self, timeout: float) -> Message | None:
        """The next application message, or None once the connection is closed.

        Raises:
            TimeoutError: nothing arrived within ``timeout``.
        """
        if self.closed.is_set() and self._inbox.empty():
            return None
        msg = await asyncio.wait_for(self._inbox.get(), timeout)
        if msg is None:
            self._inbox.put_nowait(None)  # later calls see the end too
        return msg

    async def _reader(self) -> None:
        reason = "peer closed the connection"
        try:
            while True:
                seen = self.protocol.decoder.bytes_in
                try:
                    frame = await self.protocol.next_frame(self.cfg.heartbeat_timeout_s)
                except TimeoutError:
                    if self.protocol.decoder.bytes_in != seen:
                        continue  # a large frame is still arriving: the peer is alive
                    reason = f"peer silent for {self.cfg.heartbeat_timeout_s:g} s"
                    break
                if frame is None:
                    if self.protocol.error is not None:
                        reason = f"{self.protocol.error.code}: {self.protocol.error}"
                    break
                self.stats.frames_in += 1
                if frame.type == MsgType.HEARTBEAT:
                    continue
                try:
                    body = codec.validate(frame.type, frame.decode())
                except FrameError as err:
                    self.protocol.fail(err)
                    reason = f"{err.code}: {err}"
                    break
                if frame.type == MsgType.CLOSE:
                    reason = f"peer closed: {body['reason']}"
                    break
                if frame.type == MsgType.ERROR:
                    reason = f"peer reported {body['code']}: {body['message']}"
                    break
                if frame.type in (MsgType.HELLO, MsgType.AUTH):
                    self.protocol.fail(FrameError("handshake", "handshake message after handshake"))
                    reason = "handshake message after handshake"
                    break
                while not self.closed.is_set():
                    try:
                        await asyncio.wait_for(self._inbox.put((frame.type, body)), 1.0)
                        break
                    except TimeoutError:
                        continue
        finally:
            self._close(reason)

    # ----------------------------------------------------------------- closing
    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self._space.set()
        self._has_data.set()
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait(None)
        if not self.transport.is_closing():
            self.transport.close()
        log.info("data plane connection closed", peer=self.peer, reason=reason)
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current:
                t.cancel()

    async def close(self, reason: str = "done", timeout: float = 5.0) -> None:
        """Flush what is queued, say goodbye, close."""
        if self.closed.is_set():
            return
        with contextlib.suppress(ChannelError, TimeoutError):
            await self.send(MsgType.CLOSE, {"reason": reason}, timeout)
            deadline = time.monotonic() + timeout
            while (self._sendq or not self.protocol.can_write.is_set()) and (
                time.monotonic() < deadline and not self.closed.is_set()
            ):
                await asyncio.sleep(0.01)
        self._close(f"closed locally: {reason}")
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def abort(self) -> None:
        """Drop the connection at once (tests: a peer that dies)."""
        self.transport.abort()
        self._close("aborted locally")
