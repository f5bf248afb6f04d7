"""The coordinator's side of the cluster: registrations, liveness, placement, fencing.

Workers dial the coordinator's data-plane port and identify as ``worker:NAME``; their
connection carries CONTROL messages only. A registration is checked (protocol version,
plausible resources, room for at least one sampler process) and refused with a reason
otherwise; the coordinator itself carries on. Accepted workers get slots (sampler
processes) placed on them and must heartbeat; one that stays silent for
``heartbeat_misses`` heartbeat timeouts is declared dead: its slots go to other workers,
and it is *fenced*: its sampler processes' data connections are closed and anything they
still deliver is counted as ``discarded_dead_worker`` and never trained on, because the
same slot now runs elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from dvla import __version__, logs
from dvla.cluster import protocol
from dvla.cluster.membership import DEAD, LEFT, Membership, Slot, WorkerRecord, refusal, split
from dvla.cluster.protocol import CLUSTER_PROTOCOL, Resources
from dvla.config import PipelineFile
from dvla.transport.connection import ChannelError, Connection
from dvla.transport.frames import FrameError, MsgType

if TYPE_CHECKING:
    from dvla.pipeline.stats import Accounting

log = logs.get(__name__)


def make_slots(cfg: PipelineFile) -> list[Slot]:
    """The run's sampler slots: ``sample_processes`` shares of the env shards."""
    p = cfg.pipeline
    shards = split(p.num_envs, p.shards)
    slots, first = [], 0
    for k, count in enumerate(split(p.shards, p.sample_processes)):
        slots.append(Slot(k, shards[first : first + count], first))
        first += count
    return slots


def worker_of(producer: str) -> str:
    """The worker id in a sampler's producer name (``w3.s0.g7.r0`` -> ``w3``)."""
    return producer.split(".", 1)[0]


class ClusterServer:
    """Accepts workers, watches their heartbeats, places and re-places slots."""

    def __init__(
        self,
        cfg: PipelineFile,
        group_size: int,
        accounting: Accounting,
        weights: str | None,
        generation: int = 0,
    ) -> None:
        self.cfg = cfg
        self.group_size = group_size
        self.accounting = accounting
        self.weights = weights or ""
        self.session = secrets.token_hex(8)
        # Worker ids carry the session, so producers of an earlier coordinator's workers
        # never share a name with this one's.
        self.membership = Membership(
            cfg.cluster, make_slots(cfg), generation, id_prefix=f"w{self.session[:4]}-"
        )
        self.url = ""
        self.conns: dict[str, Connection] = {}
        self.fenced: set[str] = set()
        #: Trajectories received per producer (what a crash report is compared with).
        self.delivered: dict[str, int] = {}
        #: Episodes counted lost per producer, reduced if some arrive after all.
        self.lost: dict[str, int] = {}
        self.refused = 0
        self.sampler_connections: Callable[[], Iterable[Connection]] = list
        self.on_producer_gone: Callable[[str], None] = lambda producer: None
        self._stopping = False
        self._warned_pending = 0.0

    # ----------------------------------------------------------------- data path hooks
    def is_fenced(self, producer: str) -> bool:
        return worker_of(producer) in self.fenced

    def refuse_peer(self, peer: str) -> str | None:
        """Sampler processes that must not deliver here.

        A fenced worker's sampler may connect late (it was still starting); a sampler of
        a previous coordinator (before a restart) may reconnect to this one: neither is
        running a slot of this coordinator, so neither may feed its learner.
        """
        if self.is_fenced(peer):
            return f"fenced: worker {worker_of(peer)} was declared dead"
        if worker_of(peer) not in self.membership.workers:
            return f"unknown producer {peer!r}: not a sampler of this coordinator's workers"
        return None

    def record_delivery(self, producer: str, trajectories: int) -> None:
        self.delivered[producer] = self.delivered.get(producer, 0) + trajectories

    def record_fenced_delivery(self, producer: str, trajectories: int) -> None:
        """A group from a fenced producer: counted, never trained on."""
        acc = self.accounting
        acc.produced += trajectories
        acc.discarded_dead_worker += trajectories
        self.record_delivery(producer, trajectories)
        back = min(trajectories, self.lost.get(producer, 0))
        if back:
            self.lost[producer] -= back
            acc.episodes_lost -= back

    def _count_lost(self, producer: str, started: int) -> int:
        lost = max(0, started - self.delivered.get(producer, 0) - self.lost.get(producer, 0))
        if lost:
            self.lost[producer] = self.lost.get(producer, 0) + lost
            self.accounting.episodes_lost += lost
        return lost

    # ----------------------------------------------------------------- connections
    async def handle(self, conn: Connection) -> None:
        """Serve one worker's control connection."""
        rec = await self._register(conn)
        if rec is None:
            return
        try:
            async for mtype, body in conn.messages():
                if mtype != MsgType.CONTROL:
                    raise FrameError("unexpected", f"a worker does not send {mtype.name}")
                op, data = body["op"], protocol.parse(body["op"], body["data"])
                if rec.id in self.fenced:
                    continue
                if op == "heartbeat":
                    if self.membership.beat(rec.id) is not None:
                        rec.samplers = data["samplers"]
                elif op == "sampler_exit":
                    self._sampler_exit(rec, data)
                elif op == "leaving":
                    await self._lose(rec, LEFT, f"left: {data['reason']}")
                    return
                else:
                    raise FrameError("unexpected", f"a worker does not send {op!r}")
        except FrameError as err:
            log.warning("worker broke the protocol", worker=rec.id, reason=str(err))
            conn.protocol.fail(err)
        finally:
            if self.conns.get(rec.id) is conn:
                del self.conns[rec.id]

    async def _refuse(self, conn: Connection, reason: str, **ctx: Any) -> None:
        self.refused += 1
        log.warning("worker refused", reason=reason, peer=conn.peer, **ctx)
        with contextlib.suppress(ChannelError):
            await conn.send(MsgType.CONTROL, protocol.message("refuse", reason=reason), 5.0)
        await conn.close("refused", 2.0)

    async def _register(self, conn: Connection) -> WorkerRecord | None:
        try:
            msg = await conn.recv(self.cfg.data_plane.handshake_timeout_s)
        except TimeoutError:
            await self._refuse(conn, "no registration within the handshake timeout")
            return None
        if msg is None:
            return None
        mtype, body = msg
        try:
            if mtype != MsgType.CONTROL or body["op"] != "register":
                raise FrameError("unexpected", "a worker must register first")
            data = protocol.parse("register", body["data"])
        except FrameError as err:
            await self._refuse(conn, f"bad registration: {err}")
            return None
        if data["protocol"] != CLUSTER_PROTOCOL:
            await self._refuse(
                conn,
                f"worker speaks cluster protocol {data['protocol']} (dvla {data['dvla']}); "
                f"this coordinator speaks {CLUSTER_PROTOCOL} (dvla {__version__})",
            )
            return None
        try:
            res = Resources.from_wire(data["resources"])
        except ValueError as err:
            await self._refuse(conn, f"impossible resources: {err}", worker=data["name"])
            return None
        why = refusal(res, self.cfg.cluster.placement)
        if why is not None:
            await self._refuse(conn, why, worker=data["name"])
            return None
        if self._stopping:
            await self._refuse(conn, "the run is stopping")
            return None
        rec, resumed = self._resume(data["resume"]), True
        if rec is None:
            rec, resumed = self.membership.add(data["name"], data["host"], res), False
        welcome = protocol.message(
            "welcome",
            worker_id=rec.id,
            session=self.session,
            url=self.url,
            config=self.cfg.model_dump(mode="json"),
            group_size=self.group_size,
            weights=self.weights,
            heartbeat_interval_s=self.cfg.cluster.heartbeat_interval_s,
            resumed=resumed,
        )
        try:
            await conn.send(MsgType.CONTROL, welcome, 10.0)
        except ChannelError:
            if not resumed:
                self.membership.remove(rec.id, LEFT, "lost during registration")
            return None
        self.conns[rec.id] = conn
        log.info(
            "worker joined",
            worker=rec.id,
            name=rec.name,
            host=rec.host,
            capacity=rec.capacity,
            resumed=resumed,
        )
        return rec

    def _resume(self, token: str) -> WorkerRecord | None:
        """A worker that lost its connection but not its place comes back as itself."""
        session, _, wid = token.partition("/")
        rec = self.membership.workers.get(wid)
        if session != self.session or rec is None or not rec.alive or wid in self.conns:
            return None
        self.membership.beat(wid)
        return rec

    def _sampler_exit(self, rec: WorkerRecord, data: dict[str, Any]) -> None:
        producer = data["producer"]
        self.on_producer_gone(producer)
        if data["code"] == 0:
            return
        lost = self._count_lost(producer, data["started"])
        rec.sampler_restarts += 1
        log.warning(
            "sampler process crashed",
            worker=rec.id,
            slot=data["slot"],
            code=data["code"],
            episodes_lost=lost,
        )

    # ----------------------------------------------------------------- liveness, placement
    async def tick(self) -> None:
        """Declare silent workers dead, then place pending slots; called every ~100 ms."""
        for rec in self.membership.check():
            await self._fence(rec, rec.reason)
        if self.membership.joined_ever >= self.cfg.cluster.min_workers:
            for rec, slot in self.membership.place(set(self.conns)):
                await self._assign(rec, slot)
        pending = self.membership.pending()
        now = time.monotonic()
        if pending and now - self._warned_pending > 30:
            self._warned_pending = now
            log.warning(
                "sampler slots wait for a worker with room",
                pending=[s.index for s in pending],
                workers=self.membership.counts(),
            )

    async def _assign(self, rec: WorkerRecord, slot: Slot) -> None:
        body = protocol.message(
            "assign",
            slot=slot.index,
            generation=slot.generation,
            slots=len(self.membership.slots),
            shard_envs=slot.shard_envs,
            first_shard=slot.first_shard,
        )
        conn = self.conns.get(rec.id)
        try:
            if conn is None:
                raise ChannelError("not connected")
            await conn.send(MsgType.CONTROL, body, 5.0)
            log.info("slot placed", slot=slot.index, worker=rec.id, generation=slot.generation)
        except ChannelError:
            self.membership.release(rec.id, slot.index)

    async def _lose(self, rec: WorkerRecord, state: str, reason: str) -> None:
        self.membership.remove(rec.id, state, reason)
        await self._fence(rec, reason)

    async def _fence(self, rec: WorkerRecord, reason: str) -> None:
        """Cut a dead worker off: its slots are elsewhere now, its output is not used."""
        self.fenced.add(rec.id)
        lost = sum(self._count_lost(s["producer"], s["started"]) for s in rec.samplers)
        for s in rec.samplers:
            self.on_producer_gone(s["producer"])
        prefix = f"{rec.id}."
        doomed = [c for c in self.sampler_connections() if c.peer.startswith(prefix)]
        log.warning(
            "worker lost; its slots are re-placed",
            worker=rec.id,
            name=rec.name,
            state=rec.state,
            reason=reason,
            episodes_lost=lost,
            closing=[c.peer for c in doomed],
        )
        conn = self.conns.pop(rec.id, None)
        if conn is not None and rec.state == DEAD:
            with contextlib.suppress(ChannelError):
                await conn.send(MsgType.CONTROL, protocol.message("fenced", reason=reason), 1.0)
            doomed.append(conn)
        await asyncio.gather(*(c.close(f"fenced: {reason}", 1.0) for c in doomed))

    async def stop_workers(self, reason: str, timeout: float) -> None:
        """Tell every connected worker the run is over (their samplers are closed apart)."""
        self._stopping = True
        body = protocol.message("stop", reason=reason)
        conns = list(self.conns.values())

        async def tell(conn: Connection) -> None:
            with contextlib.suppress(ChannelError):
                await conn.send(MsgType.CONTROL, body, timeout)

        await asyncio.gather(*(tell(c) for c in conns))

    def status(self) -> dict[str, Any]:
        out = self.membership.status()
        out["refused_registrations"] = self.refused
        out["generation"] = self.membership.generation
        return out
