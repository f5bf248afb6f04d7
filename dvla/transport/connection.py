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
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from dvla import logs
from dvla.config import DataPlaneConfig
from dvla.errors import DvlaError
from dvla.transport import auth, codec
from dvla.transport.frames import (
    BATCHABLE,
    HEADER,
    MAX_META,
    PRE_AUTH_MAX_FRAME,
    Frame,
    FrameDecoder,
    FrameError,
    MsgType,
    encode_frame,
    encode_frame_sized,
    frame_bytes,
)

log = logs.get(__name__)

#: Received frames buffered before reading pauses (receive-side backpressure).
_RECV_HIGH = 8 * 1024 * 1024
_RECV_LOW = 2 * 1024 * 1024
#: Decoded messages waiting for the application before the reader stops taking frames.
_INBOX_BYTES = 8 * 1024 * 1024
#: Most buffers and bytes handed to the transport in one writelines call.
_BATCH_BUFFERS = 8192
_BATCH_BYTES = 16 * 1024 * 1024
#: Kernel buffer size asked for on Unix sockets (capped by net.core.[rw]mem_max).
_UNIX_SOCKBUF = 4 * 1024 * 1024
#: Most messages in one BATCH frame.
_BATCH_ITEMS = 256
#: Queued bytes above which a send yields to the event loop once.
_YIELD_BYTES = 256 * 1024


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
        self.discarding = False

    def stop_receiving(self) -> None:
        """Read and drop whatever still arrives, so the transport can finish closing.

        A transport whose reading is paused never sees the peer's EOF (or, under TLS, its
        close_notify): its handle would stay open and the event loop could not close.
        """
        self.discarding = True
        self.frames.clear()
        self.frames_bytes = 0
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            # Unix sockets default to ~200 KiB buffers: a large frame would take dozens of
            # wake-ups. TCP autotunes its own buffers, so it is left alone.
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, _UNIX_SOCKBUF)
        if self.on_made is not None:
            self.on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.error is not None or self.discarding:
            return self._sink  # bytes after a violation or after closing are discarded
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.error is not None or self.discarding:
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

    async def take_frames(self, timeout: float) -> list[Frame]:
        """Every frame received so far (waiting for one); empty once the connection is over.

        Taking them all at once lets the reader handle a burst of small frames without an
        await per frame.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        if not self.frames:
            first = await self.next_frame(timeout)
            if first is None:
                return []
            self.frames.appendleft(first)
            self.frames_bytes += first.size
        out = list(self.frames)
        self.frames.clear()
        self.frames_bytes = 0
        if self._paused and not self.lost:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return out

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
        self.loop = asyncio.get_running_loop()
        self.peer = "?"
        self.peer_host = ""
        self.peer_unix: str | None = None
        self.close_reason: str | None = None
        self.stats = ConnStats()
        self._inbox: deque[tuple[Message, int]] = deque()
        self._inbox_bytes = 0
        self._inbox_ready = asyncio.Event()
        self._inbox_space = asyncio.Event()
        self._inbox_space.set()
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
        bufs, size = encode_frame_sized(msg_type, body)
        if size > MAX_META and HEADER.unpack_from(bufs[0])[4] > MAX_META:
            # Refused here with the code the peer would use; send_many splits on it.
            raise FrameError("too-large", f"{msg_type.name}: msgpack section above {MAX_META}")
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
        if self._queued >= _YIELD_BYTES:
            # A producer that never blocks would otherwise starve the writer task.
            await asyncio.sleep(0)

    async def send_many(
        self, messages: list[tuple[MsgType, dict[str, Any]]], timeout: float = 60.0
    ) -> None:
        """Queue several messages in order, batching runs of one type into BATCH frames.

        A BATCH frame costs one header, one msgpack pass and one validation dispatch for
        all its messages, which is what makes many small messages per second affordable.
        The peer receives the messages one by one, exactly as if sent separately.

        Raises:
            ChannelError: as :meth:`send`.
        """
        i = 0
        while i < len(messages):
            msg_type = messages[i][0]
            j = i + 1
            while (
                j < len(messages)
                and j - i < _BATCH_ITEMS
                and messages[j][0] == msg_type
                and msg_type in BATCHABLE
            ):
                j += 1
            if j - i == 1:
                await self.send(msg_type, messages[i][1], timeout)
            else:
                await self._send_batch(msg_type, [body for _, body in messages[i:j]], timeout)
            i = j

    async def _send_batch(
        self, msg_type: MsgType, bodies: list[dict[str, Any]], timeout: float
    ) -> None:
        try:
            await self.send(MsgType.BATCH, codec.batch_body(msg_type, bodies), timeout)
        except FrameError as err:  # the msgpack section outgrew its cap: split the batch
            if err.code != "too-large" or len(bodies) == 1:
                raise
            half = len(bodies) // 2
            await self._send_batch(msg_type, bodies[:half], timeout)
            await self._send_batch(msg_type, bodies[half:], timeout)

    async def _drained(self) -> bool:
        """Wait until the transport's buffer is below its mark; False if it stops moving."""
        transport, can_write = self.transport, self.protocol.can_write
        while not can_write.is_set():
            before = transport.get_write_buffer_size()
            try:
                await asyncio.wait_for(can_write.wait(), self.cfg.heartbeat_timeout_s)
            except TimeoutError:
                if transport.get_write_buffer_size() >= before:
                    return False  # not one byte accepted in a whole timeout
        return True

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
                # One writelines per batch, bounded so no call hands the transport more
                # than it accepts (uvloop refuses about a million buffers in one call).
                bufs: list[memoryview | bytes] = []
                batch = 0
                while self._sendq and len(bufs) < _BATCH_BUFFERS and batch < _BATCH_BYTES:
                    frame, size = self._sendq.popleft()
                    bufs.extend(frame)
                    batch += size
                    self._queued -= size
                    self.stats.frames_out += 1
                    self.stats.bytes_out += size
                if not self._sendq:
                    self._has_data.clear()
                transport.writelines(bufs)
                del bufs
                self._space.set()
                if not await self._drained():
                    self._close(f"peer accepted no bytes for {self.cfg.heartbeat_timeout_s:g} s")
        except Exception as err:  # a transport error ends this connection only
            self._close(f"write failed: {type(err).__name__}: {err}")

    # ----------------------------------------------------------------- receiving
    async def recv(self, timeout: float) -> Message | None:
        """The next application message, or None once the connection is closed.

        Raises:
            TimeoutError: nothing arrived within ``timeout``.
        """
        if not self._inbox:
            if self.closed.is_set():
                return None
            self._inbox_ready.clear()
            await asyncio.wait_for(self._inbox_ready.wait(), timeout)
            if not self._inbox:
                return None
        return self._pop()

    async def messages(self) -> AsyncIterator[Message]:
        """Every message until the connection closes (liveness is the reader's job)."""
        while True:
            try:
                msg = await self.recv(1.0)
            except TimeoutError:
                continue
            if msg is None:
                return
            yield msg

    async def recv_many(self, timeout: float, limit: int = 4096) -> list[Message] | None:
        """Every message already received (at least one, at most ``limit``), or None.

        Raises:
            TimeoutError: nothing arrived within ``timeout``.
        """
        first = await self.recv(timeout)
        if first is None:
            return None
        out = [first]
        while self._inbox and len(out) < limit:
            out.append(self._pop())
        return out

    def _pop(self) -> Message:
        msg, size = self._inbox.popleft()
        self._inbox_bytes -= size
        if self._inbox_bytes < _INBOX_BYTES // 2:
            self._inbox_space.set()
        return msg

    def _handle(self, frame: Frame) -> str | None:
        """Validate one frame into the inbox; a reason to close, or None to go on."""
        self.stats.frames_in += 1
        mtype = frame.type
        if mtype == MsgType.HEARTBEAT:
            return None
        try:
            body = codec.validate(mtype, frame.decode())
        except FrameError as err:
            self.protocol.fail(err)
            return f"{err.code}: {err}"
        if mtype == MsgType.CLOSE:
            return f"peer closed: {body['reason']}"
        if mtype == MsgType.ERROR:
            return f"peer reported {body['code']}: {body['message']}"
        if mtype == MsgType.HELLO or mtype == MsgType.AUTH:
            self.protocol.fail(FrameError("handshake", "handshake message after handshake"))
            return "handshake: handshake message after handshake"
        if mtype == MsgType.BATCH:
            items = codec.batch_from_body(body)
            share = frame.size // len(items)
            for item in items:
                self._inbox.append((item, share))
            self._inbox_bytes += share * len(items)
            return None
        self._inbox.append(((mtype, body), frame.size))
        self._inbox_bytes += frame.size
        return None

    async def _reader(self) -> None:
        reason = "peer closed the connection"
        try:
            while True:
                seen = self.protocol.decoder.bytes_in
                try:
                    frames = await self.protocol.take_frames(self.cfg.heartbeat_timeout_s)
                except TimeoutError:
                    if self.protocol.decoder.bytes_in != seen:
                        continue  # a large frame is still arriving: the peer is alive
                    reason = f"peer silent for {self.cfg.heartbeat_timeout_s:g} s"
                    break
                if not frames:
                    if self.protocol.error is not None:
                        reason = f"{self.protocol.error.code}: {self.protocol.error}"
                    break
                stop = None
                for frame in frames:
                    stop = self._handle(frame)
                    if stop is not None:
                        break
                if self._inbox:
                    self._inbox_ready.set()
                if stop is not None:
                    reason = stop
                    break
                # Receive-side backpressure: wait while the application lags behind.
                while self._inbox_bytes > _INBOX_BYTES and not self.closed.is_set():
                    self._inbox_space.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._inbox_space.wait(), 1.0)
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
        self._inbox_ready.set()  # wake a waiting recv: it returns what is left, then None
        self.protocol.stop_receiving()
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
        await self.wait_lost(timeout)

    async def wait_lost(self, timeout: float) -> None:
        """Wait for the transport to finish closing; abort it if it does not in time.

        A transport left half-closed (waiting to flush to a peer that stopped reading)
        would keep its handle, and an event loop cannot close while handles remain.
        """
        deadline = time.monotonic() + timeout
        while not self.protocol.lost and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if not self.protocol.lost:
            self.transport.abort()

    def abort(self) -> None:
        """Drop the connection at once (tests: a peer that dies)."""
        self.transport.abort()
        self._close("aborted locally")
