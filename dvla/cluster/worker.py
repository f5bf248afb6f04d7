"""The worker: registers with the coordinator and runs the sampler processes it is given.

A worker is a supervisor, not a data path: its sampler processes talk to the
coordinator's data plane themselves (on the same port the worker dialled). The worker
keeps one control connection, sends a heartbeat with each sampler's episode counter every
``cluster.heartbeat_interval_s``, restarts sampler processes that crash (with backoff),
and reconnects with jittered exponential backoff when the coordinator goes away. A
coordinator that declared it dead (``fenced``) gets a fresh registration; its old sampler
processes are stopped first, because their slots now run elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dvla import __version__, logs
from dvla.cluster import protocol
from dvla.cluster.protocol import CLUSTER_PROTOCOL, Resources
from dvla.cluster.supervisor import SamplerProc, Supervisor
from dvla.config import DataPlaneConfig, PipelineFile, TlsConfig
from dvla.transport import endpoints
from dvla.transport.auth import Secret, host_id
from dvla.transport.connection import ChannelError, Connection
from dvla.transport.frames import FrameError, MsgType

log = logs.get(__name__)

EXIT_STOPPED, EXIT_GAVE_UP, EXIT_REFUSED = 0, 1, 2


class Refused(Exception):
    """The coordinator will not take this worker; retrying cannot help."""


@dataclass
class _Session:
    """One accepted registration."""

    worker_id: str
    session: str
    url: str
    cfg: PipelineFile
    group_size: int
    weights: str


class Worker:
    """One worker daemon (``dvla-worker``), or a local worker inside ``dvla run``."""

    def __init__(
        self,
        url: str,
        secret: Secret,
        *,
        name: str,
        resources: Resources,
        log_dir: Path,
        data_plane: DataPlaneConfig | None = None,
        tls: TlsConfig | None = None,
        reconnect_max_s: float = 10.0,
        give_up_s: float | None = None,
        protocol_version: int = CLUSTER_PROTOCOL,
    ) -> None:
        self.url = url
        self.secret = secret
        self.name = name
        self.resources = resources
        self.dp = data_plane or DataPlaneConfig(tls=tls)  # type: ignore[call-arg]
        self.tls = tls
        self.reconnect_max_s = reconnect_max_s
        self.give_up_s = give_up_s
        self.protocol_version = protocol_version
        env = {**os.environ, self.dp.secret_env: secret.value.decode()}
        self.supervisor = Supervisor(log_dir, env)
        self.session: _Session | None = None
        self.exit_reason = ""
        self._restarts: dict[int, int] = {}
        self._assigned: dict[int, dict[str, Any]] = {}
        self._restart_at: dict[int, float] = {}

    # ----------------------------------------------------------------- main loop
    async def run(self, stop: asyncio.Event) -> int:
        """Register, serve, reconnect; until the coordinator or ``stop`` ends it."""
        delay, lost_at = 0.2, time.monotonic()
        try:
            while not stop.is_set():
                try:
                    conn = await endpoints.connect(
                        self.url, self.dp, self.secret, f"worker:{self.name}"[:64]
                    )
                except ChannelError as err:
                    if "authentication" in str(err):
                        return self._refused(f"coordinator refused the handshake: {err}")
                    await self._disconnected(lost_at)
                    if self.give_up_s is not None and time.monotonic() - lost_at > self.give_up_s:
                        self.exit_reason = f"no coordinator at {self.url} for {self.give_up_s:g} s"
                        log.error("worker giving up", reason=self.exit_reason)
                        return EXIT_GAVE_UP
                    log.info(
                        "coordinator unreachable; retrying", url=self.url, in_s=round(delay, 2)
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, self.reconnect_max_s)
                    continue
                try:
                    done = await self._serve(conn, stop)
                except Refused as err:
                    return self._refused(str(err))
                finally:
                    await conn.close("worker leaving", 2.0)
                if done:
                    return EXIT_STOPPED
                delay, lost_at = 0.2, time.monotonic()
            return EXIT_STOPPED
        finally:
            await self.supervisor.stop_all(5.0, graceful=True)

    def _refused(self, reason: str) -> int:
        self.exit_reason = reason
        log.error("worker refused", reason=reason)
        return EXIT_REFUSED

    async def _disconnected(self, since: float) -> None:
        """While cut off, keep samplers only as long as the coordinator would wait for us."""
        s = self.session
        if s is None or not self.supervisor.procs:
            return
        if time.monotonic() - since > s.cfg.cluster.dead_after_s:
            log.warning("coordinator lost; stopping sampler processes", worker=s.worker_id)
            await self.supervisor.stop_all(5.0)
            self._assigned.clear()

    # ----------------------------------------------------------------- one session
    async def _register(self, conn: Connection) -> _Session:
        prev = self.session
        await conn.send(
            MsgType.CONTROL,
            protocol.message(
                "register",
                protocol=self.protocol_version,
                dvla=__version__,
                name=self.name,
                host=os.uname().nodename,
                host_id=host_id(),
                resources=self.resources.to_wire(),
                pid=os.getpid(),
                resume=f"{prev.session}/{prev.worker_id}" if prev else "",
            ),
            10.0,
        )
        try:
            msg = await conn.recv(self.dp.handshake_timeout_s + 10.0)
        except TimeoutError:
            raise ChannelError("coordinator did not answer the registration") from None
        if msg is None:
            raise ChannelError(f"coordinator closed the connection: {conn.close_reason}")
        mtype, body = msg
        if mtype != MsgType.CONTROL:
            raise ChannelError(f"coordinator answered {mtype.name} to register")
        data = protocol.parse(body["op"], body["data"])
        if body["op"] == "refuse":
            raise Refused(data["reason"])
        if body["op"] != "welcome":
            raise ChannelError(f"coordinator answered {body['op']} to register")
        cfg = PipelineFile.model_validate(data["config"])
        if self.tls is not None:
            # Certificate paths in the coordinator's file are its own; use this host's.
            dp = cfg.data_plane.model_copy(update={"tls": self.tls})
            cfg = cfg.model_copy(update={"data_plane": dp})
        session = _Session(
            data["worker_id"],
            data["session"],
            self._sampler_url(data["url"]),
            cfg,
            data["group_size"],
            data["weights"],
        )
        # Sampler processes read the secret from the variable the pipeline names, which
        # need not be the one this worker was given it in.
        self.supervisor.env[cfg.data_plane.secret_env] = self.secret.value.decode()
        self.reconnect_max_s = cfg.cluster.reconnect_max_s
        cfg = self._own_addresses(cfg, conn)
        session.cfg = cfg
        if not data["resumed"] and self.supervisor.procs:
            log.info("new registration; stopping the old one's sampler processes")
            await self.supervisor.stop_all(5.0)
            self._assigned.clear()
        self.session = session
        log.info("registered", worker=session.worker_id, resumed=data["resumed"])
        return session

    def _own_addresses(self, cfg: PipelineFile, conn: Connection) -> PipelineFile:
        """The pipeline as this host's sampler processes must see it.

        The coordinator's ``weight_plane.advertise_host`` names the coordinator; a weight
        receiver here must advertise an address of this host instead, and the one this
        worker reaches the coordinator from is known to be routable between the two.
        """
        wp = cfg.weight_plane
        if wp.advertise_host is None:
            return cfg
        sock = conn.transport.get_extra_info("sockname")
        mine = sock[0] if isinstance(sock, tuple) and sock else None
        if not mine or conn.peer_host == host_id():
            return cfg  # same host (or a Unix socket): the coordinator's setting holds
        return cfg.model_copy(
            update={"weight_plane": wp.model_copy(update={"advertise_host": mine})}
        )

    def _sampler_url(self, served: str) -> str:
        """The coordinator's data-plane URL as this host reaches it.

        The coordinator may listen on 0.0.0.0; the address this worker dialled is the
        one known to work from here, so TCP goes there. The Unix-socket fast path in the
        served URL is kept: it is used only on the coordinator's own host.
        """
        mine, theirs = urlsplit(self.url), endpoints.Address.parse(served)
        if theirs.scheme != "tcp" or mine.scheme != "tcp" or not mine.hostname:
            return served
        addr = endpoints.Address(
            "tcp", mine.hostname, mine.port or theirs.port, theirs.path, theirs.host_id
        )
        return addr.url()

    async def _serve(self, conn: Connection, stop: asyncio.Event) -> bool:
        """One registration; True when the coordinator ended the run."""
        s = await self._register(conn)
        interval = s.cfg.cluster.heartbeat_interval_s
        beat = asyncio.create_task(self._heartbeats(conn, interval))
        try:
            while not stop.is_set():
                try:
                    msg = await conn.recv(min(interval, 0.25))
                except TimeoutError:
                    msg = None
                if msg is None:
                    # Messages already received come first: a "stop" must not be lost to
                    # the sampler exits that the coordinator's closing causes.
                    await self._watch_samplers(conn, s)
                    if conn.closed.is_set():
                        log.warning("control connection lost", reason=conn.close_reason)
                        return False
                    continue
                mtype, body = msg
                if mtype != MsgType.CONTROL:
                    raise ChannelError(f"unexpected {mtype.name} on the control connection")
                op, data = body["op"], protocol.parse(body["op"], body["data"])
                if op == "assign":
                    self._assigned[data["slot"]] = data
                    self._restarts[data["slot"]] = 0
                    await self._start(s, data["slot"])
                elif op == "revoke":
                    self._assigned.pop(data["slot"], None)
                    await self.supervisor.stop(data["slot"], 5.0)
                elif op == "fenced":
                    log.warning("coordinator declared this worker dead", reason=data["reason"])
                    await self.supervisor.stop_all(5.0)
                    self._assigned.clear()
                    self.session = None
                    return False
                elif op == "stop":
                    log.info("coordinator stopped the run", reason=data["reason"])
                    self.exit_reason = data["reason"]
                    await self.supervisor.stop_all(10.0, graceful=True)
                    return True
                else:
                    raise FrameError("unexpected", f"a coordinator does not send {op!r} here")
                await self._watch_samplers(conn, s)
            # Stopped from this side (SIGTERM): say so, so the slots move at once.
            with contextlib.suppress(ChannelError):
                await conn.send(MsgType.CONTROL, protocol.message("leaving", reason="stopped"), 2.0)
            return True
        except (FrameError, ChannelError) as err:
            log.warning("control connection failed", error=str(err))
            return False
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    async def _heartbeats(self, conn: Connection, interval: float) -> None:
        while not conn.closed.is_set():
            samplers = [
                {
                    "slot": sp.slot,
                    "producer": sp.producer,
                    "pid": sp.proc.pid,
                    "started": sp.started(),
                    "restarts": sp.restarts,
                }
                for sp in self.supervisor.procs.values()
            ]
            body = protocol.message("heartbeat", t=time.time(), samplers=samplers)
            with contextlib.suppress(ChannelError):
                await conn.send(MsgType.CONTROL, body, interval * 2)
            await asyncio.sleep(interval)

    # ----------------------------------------------------------------- samplers
    async def _start(self, s: _Session, slot: int) -> SamplerProc:
        a = self._assigned[slot]
        restarts = self._restarts.get(slot, 0)
        producer = f"{s.worker_id}.s{slot}.g{a['generation']}.r{restarts}"
        # Group ids: a 2**24 space of its own per (placement, restart), so no two producers
        # of the run hand out the same id (up to 4096 restarts of one placement).
        base = (a["generation"] * 4096 + restarts % 4096) << 24
        doc = {
            "config": s.cfg.model_dump(mode="json"),
            "group_size": s.group_size,
            "url": s.url,
            "index": slot,
            "seed_index": a["generation"] * 256 + restarts,
            "group_offset": base,
            "group_stride": 1,
            "shard_envs": a["shard_envs"],
            "first_shard": a["first_shard"],
            "weights": s.weights or None,
        }
        return await self.supervisor.start(slot, a["generation"], restarts, producer, doc)

    async def _watch_samplers(self, conn: Connection, s: _Session) -> None:
        """Report sampler processes that died and restart them after a backoff."""
        for sp in self.supervisor.exited():
            code = sp.proc.returncode if sp.proc.returncode is not None else -1
            started = sp.started()
            body = protocol.message(
                "sampler_exit", slot=sp.slot, producer=sp.producer, code=code, started=started
            )
            with contextlib.suppress(ChannelError):  # a lost link is noticed by the caller
                await conn.send(MsgType.CONTROL, body, 5.0)
            if sp.slot not in self._assigned:
                continue
            if code == 0:
                # A clean exit means the coordinator closed its data connection: the
                # coordinator decides what happens to the slot next.
                continue
            log.warning(
                "sampler process crashed; restarting",
                slot=sp.slot,
                code=code,
                started=started,
                last_line=sp.tail(),
            )
            n = self._restarts[sp.slot] = self._restarts.get(sp.slot, 0) + 1
            backoff = s.cfg.cluster.restart_backoff_s * min(2 ** (n - 1), 30)
            if time.monotonic() - sp.started_at > 60:
                backoff = s.cfg.cluster.restart_backoff_s  # it ran well for a while
            self._restart_at[sp.slot] = time.monotonic() + backoff
        now = time.monotonic()
        for slot, when in list(self._restart_at.items()):
            if slot not in self._assigned or slot in self.supervisor.procs:
                del self._restart_at[slot]
            elif now >= when:
                del self._restart_at[slot]
                await self._start(s, slot)
