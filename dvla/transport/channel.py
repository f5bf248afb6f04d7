"""The pipeline's data-plane endpoints: action requests and exactly-once trajectory chunks.

A sampler process holds a :class:`DataPlaneClient`: it asks the coordinator for actions
(``OBS_BATCH`` answered by ``ACTION_BATCH``) and ships finished groups (``TRAJ_CHUNK``).
Every chunk carries ``(producer, seq)``; the client keeps each one until the server acks
it, and after a lost connection it reconnects and resends, in order, whatever is not yet
acked. The :class:`DataPlaneServer` remembers the last sequence number delivered per
producer, across connections, so a resent chunk is acked again but delivered once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from dvla import logs
from dvla.config import DataPlaneConfig
from dvla.data import ActionBatch, ObsBatch, TrajectoryGroup
from dvla.transport import codec, endpoints
from dvla.transport.auth import Secret
from dvla.transport.connection import ChannelError, Connection
from dvla.transport.frames import FrameError, MsgType

log = logs.get(__name__)

OnObs = Callable[[ObsBatch], Awaitable[ActionBatch]]
OnGroup = Callable[[TrajectoryGroup, str, dict[str, Any]], Awaitable[None]]
OnControl = Callable[[Connection], Awaitable[None]]
#: Peers whose names start with this carry CONTROL messages (cluster workers), not data.
CONTROL_PEER = "worker:"


class ChunkLedger:
    """Per-producer delivery state of the server; outlives connections."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.delivered = 0
        self.duplicates = 0
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, producer: str) -> asyncio.Lock:
        """Serialises one producer's chunks even if two of its connections overlap."""
        return self._locks.setdefault(producer, asyncio.Lock())

    def is_new(self, producer: str, seq: int) -> bool:
        """True for the next chunk, False for a duplicate.

        Raises:
            FrameError: a gap: the sender skipped a sequence number.
        """
        last = self.last.get(producer, 0)
        if seq <= last:
            self.duplicates += 1
            return False
        if seq != last + 1:
            raise FrameError("sequence", f"producer {producer}: chunk {seq} after {last}")
        return True

    def commit(self, producer: str, seq: int) -> None:
        self.last[producer] = seq
        self.delivered += 1


class DataPlaneServer:
    """The coordinator's side: serves action requests, receives trajectory groups."""

    def __init__(
        self,
        cfg: DataPlaneConfig,
        secret: Secret,
        on_obs: OnObs,
        on_group: OnGroup,
        name: str = "coordinator",
        on_control: OnControl | None = None,
    ) -> None:
        self.cfg = cfg
        self.secret = secret
        self.on_obs = on_obs
        self.on_group = on_group
        self.on_control = on_control
        #: Says why a data peer may not connect (e.g. its worker was fenced), or None.
        self.refuse_peer: Callable[[str], str | None] = lambda peer: None
        self.name = name
        self.ledger = ChunkLedger()
        self.listener: endpoints.Listener | None = None
        self.requests = 0

    async def start(self, memory_name: str | None = None) -> str:
        """Listen; return the URL clients connect to."""
        self.listener = await endpoints.listen(
            self.cfg, self.secret, self._handle, self.name, memory_name
        )
        return self.listener.address.url()

    async def close(self, timeout: float = 5.0) -> None:
        if self.listener is not None:
            await self.listener.close(timeout)

    async def _answer(self, conn: Connection, req: int, obs: ObsBatch) -> None:
        try:
            act = await self.on_obs(obs)
        except Exception as err:  # the infer lane reports its own failure to the run
            log.warning("action request failed", peer=conn.peer, error=f"{type(err).__name__}")
            return
        with contextlib.suppress(ChannelError):  # the client resends after reconnecting
            await conn.send(MsgType.ACTION_BATCH, codec.action_body(req, act))

    async def _chunk(self, conn: Connection, body: dict[str, Any]) -> None:
        producer, seq = body["producer"], body["seq"]
        group = codec.group_from_body(body)
        async with self.ledger.lock(producer):
            if self.ledger.is_new(producer, seq):
                await self.on_group(group, producer, body.get("stats") or {})
                self.ledger.commit(producer, seq)
        with contextlib.suppress(ChannelError):
            await conn.send(MsgType.ACK, {"producer": producer, "seq": seq})

    def connections(self) -> list[Connection]:
        """Open connections (data and control)."""
        return list(self.listener.connections) if self.listener is not None else []

    async def _handle(self, conn: Connection) -> None:
        if conn.peer.startswith(CONTROL_PEER):
            if self.on_control is None:
                conn.protocol.fail(FrameError("unexpected", "this server takes no workers"))
                return
            await self.on_control(conn)
            return
        refusal = self.refuse_peer(conn.peer)
        if refusal is not None:
            log.info("data plane peer refused", peer=conn.peer, reason=refusal)
            await conn.close(refusal, 1.0)
            return
        answers: set[asyncio.Task[None]] = set()
        try:
            async for mtype, body in conn.messages():
                try:
                    if mtype == MsgType.OBS_BATCH:
                        req, obs = codec.obs_from_body(body)
                        self.requests += 1
                        task = asyncio.create_task(self._answer(conn, req, obs))
                        answers.add(task)
                        task.add_done_callback(answers.discard)
                    elif mtype == MsgType.TRAJ_CHUNK:
                        await self._chunk(conn, body)
                    else:
                        raise FrameError("unexpected", f"a client does not send {mtype.name}")
                except FrameError as err:
                    conn.protocol.fail(err)
                    log.warning(
                        "data plane client broke the protocol", peer=conn.peer, reason=str(err)
                    )
                    return
        finally:
            for task in answers:
                task.cancel()
            await asyncio.gather(*answers, return_exceptions=True)


class DataPlaneClient:
    """A sampler's side: action requests and reliable, ordered trajectory chunks."""

    def __init__(self, url: str, cfg: DataPlaneConfig, secret: Secret, producer: str) -> None:
        self.url = url
        self.cfg = cfg
        self.secret = secret
        self.producer = producer
        self._conn: Connection | None = None
        self._next_req = 0
        self._pending: dict[int, tuple[dict[str, Any], asyncio.Future[ActionBatch]]] = {}
        self._next_seq = 0
        self._unacked: OrderedDict[int, dict[str, Any]] = OrderedDict()
        #: Called once the chunk of that sequence number is acknowledged.
        self._on_acked: dict[int, Callable[[], None]] = {}
        self._window = asyncio.Event()
        self._window.set()
        self._chunk_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.stopped = asyncio.Event()
        self.stop_reason = ""
        self._closing = False
        self.reconnects = 0
        self.resent = 0

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    @property
    def connection(self) -> Connection | None:
        return self._conn

    async def start(self) -> None:
        """Connect (retrying until ``connect_timeout_s``) and start the receive loop.

        Raises:
            ChannelError: no connection could be made in time.
        """
        self._conn = await self._dial()
        self._task = asyncio.create_task(self._run(), name=f"dvla-client-{self.producer}")

    async def _dial(self) -> Connection:
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        delay = 0.05
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await endpoints.connect(
                    self.url, self.cfg, self.secret, self.producer, max(remaining, 0.1)
                )
            except ChannelError as err:
                if "authentication" in str(err):
                    raise  # a wrong secret does not get better by retrying
                if time.monotonic() + delay >= deadline:
                    raise ChannelError(
                        f"data plane: no connection to {self.url} within "
                        f"{self.cfg.connect_timeout_s:g} s: {err}"
                    ) from None
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # jitter spreads herds
            delay = min(delay * 2, 2.0)

    async def _run(self) -> None:
        try:
            while True:
                conn = self._conn
                assert conn is not None
                await self._receive(conn)
                reason = conn.close_reason or ""
                # A goodbye or a protocol error from the server: reconnecting cannot help.
                if self._closing or reason.startswith(("peer closed:", "peer reported")):
                    self._stop(reason)
                    return
                log.info("data plane connection lost; reconnecting", reason=reason)
                self._conn = None
                try:
                    new = await self._dial()
                except ChannelError as err:
                    self._stop(str(err))
                    return
                self.reconnects += 1
                await self._resend(new)
        except asyncio.CancelledError:
            self._stop("client closed")
            raise

    async def _receive(self, conn: Connection) -> None:
        async for mtype, body in conn.messages():
            try:
                if mtype == MsgType.ACTION_BATCH:
                    req, act = codec.action_from_body(body)
                    entry = self._pending.pop(req, None)
                    if entry is not None and not entry[1].done():
                        entry[1].set_result(act)
                elif mtype == MsgType.ACK and body["producer"] == self.producer:
                    while self._unacked and next(iter(self._unacked)) <= body["seq"]:
                        seq, _ = self._unacked.popitem(last=False)
                        hook = self._on_acked.pop(seq, None)
                        if hook is not None:
                            hook()
                    if len(self._unacked) < self.cfg.unacked_chunks:
                        self._window.set()
                else:
                    raise FrameError("unexpected", f"a server does not send {mtype.name} here")
            except FrameError as err:
                conn.protocol.fail(err)
                return

    async def _resend(self, conn: Connection) -> None:
        """Resend unacked chunks in order, then unanswered requests; then go live."""
        async with self._chunk_lock:
            for body in list(self._unacked.values()):
                with contextlib.suppress(ChannelError):
                    await conn.send(MsgType.TRAJ_CHUNK, body)
                    self.resent += 1
            self._conn = conn
        for body, _ in list(self._pending.values()):
            with contextlib.suppress(ChannelError):
                await conn.send(MsgType.OBS_BATCH, body)

    def _stop(self, reason: str) -> None:
        if self.stopped.is_set():
            return
        self.stop_reason = reason
        self.stopped.set()
        err = ChannelError(f"data plane: {reason}")
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self._window.set()

    async def request(self, obs: ObsBatch, timeout: float = 120.0) -> ActionBatch:
        """Actions for ``obs`` from the coordinator's infer lane.

        Raises:
            ChannelError: the client stopped or no answer came within ``timeout``.
        """
        if self.stopped.is_set():
            raise ChannelError(f"data plane: {self.stop_reason}")
        self._next_req += 1
        req = self._next_req
        body = codec.obs_body(req, obs)
        fut: asyncio.Future[ActionBatch] = asyncio.get_running_loop().create_future()
        self._pending[req] = (body, fut)
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(ChannelError):
                await conn.send(MsgType.OBS_BATCH, body, timeout)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._pending.pop(req, None)
            raise ChannelError(f"data plane: no actions within {timeout:g} s") from None

    async def send_group(
        self,
        group: TrajectoryGroup,
        stats: dict[str, Any] | None = None,
        timeout: float = 120.0,
        on_acked: Callable[[], None] | None = None,
    ) -> None:
        """Ship one finished group; returns once it is queued, not once it is acked.

        Waits while ``unacked_chunks`` chunks are unacknowledged (backpressure). The
        queued chunk refers to the group's arrays, not a copy, until it is acknowledged
        (a reconnect resends it): ``on_acked`` is called then, e.g. to reuse their memory.

        Raises:
            ChannelError: the client stopped, or the window stayed full for ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while len(self._unacked) >= self.cfg.unacked_chunks and not self.stopped.is_set():
            self._window.clear()
            try:
                await asyncio.wait_for(self._window.wait(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise ChannelError(
                    f"data plane: {len(self._unacked)} chunks unacknowledged for {timeout:g} s"
                ) from None
        if self.stopped.is_set():
            raise ChannelError(f"data plane: {self.stop_reason}")
        async with self._chunk_lock:
            self._next_seq += 1
            body = codec.chunk_body(self.producer, self._next_seq, group)
            if stats:
                body["stats"] = stats
            self._unacked[self._next_seq] = body
            if on_acked is not None:
                self._on_acked[self._next_seq] = on_acked
            conn = self._conn
            if conn is not None:
                with contextlib.suppress(ChannelError):
                    await conn.send(MsgType.TRAJ_CHUNK, body, timeout)

    async def flush(self, timeout: float) -> bool:
        """Wait until every chunk is acked; False if time ran out or the client stopped."""
        deadline = time.monotonic() + timeout
        while self._unacked and not self.stopped.is_set():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return not self._unacked

    async def close(self, timeout: float = 5.0) -> None:
        """Stop: no reconnects; pending requests fail."""
        self._closing = True
        if self._conn is not None:
            await self._conn.close("client done", timeout)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._stop("client closed")
