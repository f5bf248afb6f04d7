"""The learner's end of the weight plane: versions in, rounds of replication out.

The learner hands over ``(version, state)`` and goes on training; a round thread packs
the newest version into a flat buffer and replicates it to every receiver that is
behind, along a topology-aware plan (tcp) or a collective (gloo, NCCL). Each round has a
deadline sized by its bytes; a receiver that fails, dies or freezes costs that round at
most its deadline, is dropped from the group, and the next round goes to the survivors.
A receiver that joins late is simply behind, so the next round brings it up to date.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dvla import logs
from dvla.config import WeightPlaneConfig
from dvla.control import wire
from dvla.control.buckets import (
    Layout,
    WeightSyncError,
    checksums,
    empty_buffer,
    host_view,
    pack,
    pack_bucket,
)
from dvla.control.collective import (
    Collective,
    GlooGroup,
    NcclGroup,
    gpu_identity,
    nccl_available,
    new_gloo_store,
    new_group_id,
)
from dvla.control.plan import Member, build_plan
from dvla.control.relay import Fanout, Watermark
from dvla.control.topology import Topology
from dvla.transport import auth

log = logs.get(__name__)
StateDict = dict[str, torch.Tensor]
#: Packing unit of a version that is sent while it is packed: small enough that its
#: first bytes leave at once, large enough that a piece costs far more than its
#: bookkeeping.
PACK_PIECE = 8 * 1024 * 1024


@dataclass
class _Peer:
    name: str
    node: str
    bulk: str
    cuda: bool
    gpu: str
    sock: socket.socket
    version: int = -1
    alive: bool = True
    retry_at: float = 0.0
    failures: int = 0
    layout_sig: str = ""
    done: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Packing:
    """A host-memory version whose first round sends it while it is still being packed.

    ``mark`` rises piece by piece as the buffer fills; the checksums, complete only at
    the end, follow the data in a ``sums`` message. ``previous`` is what to restore if
    packing fails half-way (the state changed shape after ``publish``).
    """

    version: int
    state: StateDict
    layout: Layout
    buf: torch.Tensor
    mark: Watermark
    previous: tuple[int, Layout | None, torch.Tensor | None, dict[bool, list[int]]]
    sums: list[int] = field(default_factory=list)


@dataclass
class RoundReport:
    """What one replication round did; the sync lane and benchmarks read these."""

    version: int
    epoch: int
    backend: str
    plan: str
    bytes: int
    targets: list[str]
    delivered: list[str]
    failed: dict[str, str]
    dropped: list[str]
    seconds: float
    deadline_s: float

    @property
    def ok(self) -> bool:
        return not self.failed and not self.dropped

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class WeightPublisher:
    """Publishes versioned weights to every joined :class:`WeightReceiver`."""

    def __init__(
        self,
        cfg: WeightPlaneConfig,
        secret: auth.Secret,
        name: str = "learner",
        node: str | None = None,
        topology: Topology | None = None,
        device: str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.secret = secret
        self.name = name
        self.node = node or auth.host_id()
        self.topology = topology
        self.device = torch.device(device)
        self.reports: deque[RoundReport] = deque(maxlen=256)
        self.dropped: list[str] = []
        self._peers: dict[str, _Peer] = {}
        self._cond = threading.Condition()
        self._pending: tuple[int, StateDict, Layout] | None = None
        self._version = -1
        self._layout: Layout | None = None
        self._buf: torch.Tensor | None = None
        self._spare: torch.Tensor | None = None
        self._host: tuple[int, torch.Tensor] | None = None
        # Checksums of the current version, keyed by "computed on a GPU buffer": the
        # algorithm follows the buffer's device, which is the receivers' too.
        self._sums: dict[bool, list[int]] = {}
        self._packing: _Packing | None = None
        self._epoch = 0
        self._group: Collective | None = None
        self._group_members: tuple[str, ...] = ()
        self._store: Any = None
        self._store_addr = ""
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = wire.listener(cfg.host, cfg.port)
        self.address = wire.address(self._listener, cfg.advertise_host)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Start accepting receivers and running rounds; returns the control address."""
        for target, nm in (
            (self._accept_loop, "accept"),
            (self._round_loop, "rounds"),
            (self._ping_loop, "ping"),
        ):
            t = threading.Thread(target=target, name=f"dvla-publisher-{nm}", daemon=True)
            t.start()
            self._threads.append(t)
        return self.address

    def close(self) -> None:
        """Say goodbye to every receiver and stop (bounded by a few seconds)."""
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
            peers = list(self._peers.values())
        for p in peers:
            self._send(p, {"op": "bye"}, 1.0)
            self._drop(p, "publisher closing", log_it=False)
        try:
            # close() alone does not wake a thread blocked in accept(); shutdown does.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        finally:
            for t in self._threads:
                t.join(5.0)
            if self._group is not None:
                self._group.close()

    # ------------------------------------------------------------------ learner side
    @property
    def version(self) -> int:
        """The newest version packed and being replicated (-1 before the first)."""
        return self._version

    def publish(self, version: int, state: StateDict) -> None:
        """Offer ``state`` as ``version`` without blocking; newer offers replace older ones.

        ``state`` must not change afterwards (the learner hands over a snapshot).
        """
        layout = self._layout
        if layout is None or not layout.matches(state):
            # Checked here, so a state that cannot be sent fails the caller, not a thread.
            layout = Layout.of(state, self.cfg.bucket_bytes)
        with self._cond:
            latest = self._pending[0] if self._pending else self._version
            if version <= latest:
                raise ValueError(f"weight versions only go up: {version} after {latest}")
            self._pending = (version, state, layout)
            self._cond.notify_all()

    def members(self) -> dict[str, int]:
        """Each live receiver's committed version."""
        with self._cond:
            return {p.name: p.version for p in self._peers.values() if p.alive}

    def wait_delivered(self, version: int, timeout: float, count: int | None = None) -> bool:
        """Whether every live receiver (at least ``count`` of them) holds ``version``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                live = [p for p in self._peers.values() if p.alive]
                if all(p.version >= version for p in live) and (
                    count is None or len(live) >= count
                ):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed.is_set():
                    return False
                self._cond.wait(min(remaining, 0.5))

    # ------------------------------------------------------------------ membership
    def _send(self, peer: _Peer, body: dict[str, Any], timeout: float) -> bool:
        try:
            with peer.lock:
                wire.send_msg(peer.sock, body, time.monotonic() + timeout)
            return True
        except (OSError, TimeoutError) as err:
            self._drop(peer, f"send failed: {err}")
            return False

    def _drop(self, peer: _Peer, why: str, log_it: bool = True) -> None:
        with self._cond:
            if not peer.alive:
                return
            peer.alive = False
            if self._peers.get(peer.name) is peer:
                del self._peers[peer.name]
            self.dropped.append(peer.name)
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            peer.sock.shutdown(socket.SHUT_RDWR)
        peer.sock.close()
        if log_it and not self._closed.is_set():
            log.warning("weight receiver dropped", receiver=peer.name, reason=why)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._admit, args=(conn,), daemon=True).start()

    def _admit(self, conn: socket.socket) -> None:
        try:
            wire.tune(conn)
            wire.handshake(conn, self.secret, "server", self.name, 10.0)
            join = wire.recv_msg(conn, time.monotonic() + 10.0)
            if join["op"] != "join":
                raise WeightSyncError("expected join")
            name = str(join["name"])[:64]
            peer = _Peer(
                name,
                str(join["node"]),
                str(join["bulk"]),
                bool(join.get("cuda")),
                str(join.get("gpu", "")),
                conn,
            )
            peer.version = int(join.get("version", -1))
            with self._cond:
                taken = name in self._peers or name == self.name
                if not taken:
                    self._peers[name] = peer
                    self._cond.notify_all()
            if taken:
                wire.send_msg(
                    conn,
                    {"op": "error", "message": f"name {name!r} is taken"},
                    time.monotonic() + 5.0,
                )
                conn.close()
                return
            if not self._send(peer, {"op": "welcome", "version": self._version}, 5.0):
                return
        except (
            OSError,
            ConnectionError,
            TimeoutError,
            WeightSyncError,
            KeyError,
            ValueError,
        ) as err:
            log.warning("weight receiver refused", error=str(err))
            conn.close()
            return
        log.info("weight receiver joined", receiver=name, node=peer.node, version=peer.version)
        self._read_loop(peer)

    def _read_loop(self, peer: _Peer) -> None:
        try:
            while peer.alive:
                msg = wire.recv_msg(peer.sock, time.monotonic() + self.cfg.heartbeat_timeout_s)
                if msg["op"] == "leave":
                    self._drop(peer, "left", log_it=False)
                    log.info("weight receiver left", receiver=peer.name)
                    return
                if msg["op"] == "done":
                    with self._cond:
                        if int(msg.get("epoch", -1)) == self._epoch:
                            peer.done = msg
                            self._cond.notify_all()
        except (OSError, ConnectionError, TimeoutError, WeightSyncError) as err:
            self._drop(peer, f"{type(err).__name__}: {err}")

    def _ping_loop(self) -> None:
        while not self._closed.wait(self.cfg.heartbeat_interval_s):
            with self._cond:
                peers = [p for p in self._peers.values() if p.alive]
            for p in peers:
                self._send(p, {"op": "ping"}, self.cfg.heartbeat_interval_s)

    # ------------------------------------------------------------------ rounds
    def _round_loop(self) -> None:
        if self.cfg.low_priority:
            wire.lower_priority()
        while not self._closed.is_set():
            with self._cond:
                pending, self._pending = self._pending, None
            if pending is not None:
                try:
                    self._pack(*pending)
                except (WeightSyncError, RuntimeError) as err:
                    log.error("weights could not be packed", version=pending[0], error=str(err))
            now = time.monotonic()
            with self._cond:
                targets = [
                    p
                    for p in self._peers.values()
                    if p.alive and p.version < self._version and p.retry_at <= now
                ]
                packing = self._packing if not targets else None
                if not targets and packing is None:
                    if self._pending is None:
                        self._cond.wait(0.2)
                    continue
            if packing is not None:  # nobody to send it to yet: pack it for later rounds
                with contextlib.suppress(WeightSyncError, RuntimeError):
                    self._fill(packing)
                continue
            try:
                report = self._round(sorted(targets, key=lambda p: p.name))
            except Exception as err:  # a bug must not silently stop replication
                log.error("weight round crashed", error=f"{type(err).__name__}: {err}")
                time.sleep(0.5)
                continue
            log.info(
                "weight round",
                version=report.version,
                backend=report.backend,
                delivered=len(report.delivered),
                failed=len(report.failed) + len(report.dropped),
                seconds=round(report.seconds, 4),
            )

    def _pack(self, version: int, state: StateDict, layout: Layout) -> None:
        device = self.device if self._backend_for_device() == "nccl" else torch.device("cpu")
        buf = self._spare
        if buf is None or buf.numel() != layout.total or buf.device != device:
            buf = empty_buffer(layout, device)
        if device.type == "cpu":
            # The round that sends it packs it too, piece by piece (see _fill_bucket).
            if self._packing is not None:
                # A round ended before the last version was packed whole; its buffer is
                # the fallback if this one fails, so it must be complete first.
                with contextlib.suppress(WeightSyncError, RuntimeError):
                    self._fill(self._packing)
            # Pieces of a strided tensor would each copy all of it: make it dense once.
            state = {k: t if t.is_contiguous() else t.contiguous() for k, t in state.items()}
            with self._cond:
                previous = (self._version, self._layout, self._buf, self._sums)
                mark = Watermark(layout.total)
                self._packing = _Packing(version, state, layout, buf, mark, previous)
                self._spare, self._buf = self._buf, buf
                self._layout, self._version, self._sums = layout, version, {}
                self._cond.notify_all()
            return
        pack(state, layout, buf)
        sums = checksums(buf, layout)
        with self._cond:
            self._spare, self._buf = self._buf, buf
            self._layout, self._version = layout, version
            self._sums = {buf.is_cuda: sums}
            self._cond.notify_all()

    def _fill_bucket(self, packing: _Packing, i: int) -> None:
        """Pack bucket ``i`` of a version being sent; its bytes go as each piece lands."""
        try:
            packing.sums.append(
                pack_bucket(
                    packing.state, packing.layout, packing.buf, i, PACK_PIECE, packing.mark.advance
                )
            )
        except (WeightSyncError, RuntimeError) as err:
            packing.mark.fail(err)
            with self._cond:
                self._packing = None
                self._version, self._layout, self._buf, self._sums = packing.previous
                self._spare = packing.buf
            log.error("weights could not be packed", version=packing.version, error=str(err))
            raise
        if len(packing.sums) == len(packing.layout.buckets):
            with self._cond:
                self._sums, self._packing = {False: packing.sums}, None

    def _fill(self, packing: _Packing) -> None:
        for i in range(len(packing.sums), len(packing.layout.buckets)):
            self._fill_bucket(packing, i)

    def _send_sums(self, targets: list[_Peer], version: int, epoch: int, sums: list[int]) -> None:
        body = {"op": "sums", "version": version, "epoch": epoch, "checksums": sums}
        for p in targets:
            if p.alive:
                self._send(p, body, 5.0)

    def _host_copy(self, version: int, buf: torch.Tensor) -> torch.Tensor:
        """The packed version in host memory, for tcp rounds of a GPU-packed version."""
        cached = self._host
        if cached is None or cached[0] != version:
            host = torch.empty(buf.numel(), dtype=torch.uint8, pin_memory=True)
            host.copy_(buf)
            self._host = cached = (version, host)
        return cached[1]

    def _backend_for_device(self) -> str:
        if self.cfg.backend != "auto":
            return self.cfg.backend
        return "nccl" if self.device.type == "cuda" and nccl_available() else "tcp"

    def _backend(self, targets: list[_Peer]) -> str:
        """The round's backend; auto falls back to tcp where NCCL cannot serve the group.

        NCCL needs every member on a GPU of its own (one rank per GPU).
        """
        backend = self._backend_for_device()
        if backend != "nccl":
            return backend
        gpus = [gpu_identity(self.device)] + [p.gpu for p in targets]
        fits = all(p.cuda for p in targets) and all(gpus) and len(set(gpus)) == len(gpus)
        if fits:
            return "nccl"
        if self.cfg.backend == "nccl":
            raise WeightSyncError("backend nccl needs every receiver on a GPU of its own")
        return "tcp"

    def _round(self, targets: list[_Peer]) -> RoundReport:
        layout, buf, version = self._layout, self._buf, self._version
        assert layout is not None and buf is not None
        sig = layout.signature()
        with self._cond:
            self._epoch += 1
            epoch = self._epoch
            for p in targets:
                p.done = None
        try:
            backend = self._backend(targets)
        except WeightSyncError as err:
            for p in targets:
                p.retry_at = time.monotonic() + 5.0
            return RoundReport(
                version,
                epoch,
                self.cfg.backend,
                "-",
                layout.total,
                [p.name for p in targets],
                [],
                {p.name: str(err) for p in targets},
                [],
                0.0,
                0.0,
            )
        if backend != "nccl" and buf.is_cuda:
            buf = self._host_copy(version, buf)
        packing = self._packing
        if packing is None and buf.is_cuda not in self._sums:
            self._sums[buf.is_cuda] = checksums(buf, layout)
        deadline_s = self.cfg.deadline_s(layout.total)
        deadline = time.monotonic() + deadline_s
        t0 = time.perf_counter()
        base: dict[str, Any] = {
            "op": "round",
            "version": version,
            "epoch": epoch,
            "backend": backend,
            # None while the version is still being packed: a sums message follows.
            "checksums": self._sums[buf.is_cuda] if packing is None else None,
            "checksum": "device" if buf.is_cuda else "host",
            "deadline_s": deadline_s,
        }
        plan_kind = self.cfg.plan if backend == "tcp" else backend
        fan: Fanout | None = None
        failed: dict[str, str] = {}
        if backend == "tcp":
            done = Watermark(layout.total, layout.total)
            mark = packing.mark if packing is not None else done
            fan = self._start_tcp(targets, base, layout, buf, sig, version, epoch, deadline, mark)
            if packing is not None:
                try:
                    self._fill(packing)
                    self._send_sums(targets, version, epoch, packing.sums)
                except (WeightSyncError, RuntimeError) as err:
                    failed.update({p.name: f"packing failed: {err}" for p in targets})
        else:
            failed.update(
                self._run_collective(targets, base, layout, buf, sig, deadline, packing, epoch)
            )
        self._await_done(targets, deadline)
        if fan is not None:
            fan.abort()
            fan.join()
        delivered: list[_Peer] = []
        dropped: list[str] = []
        for p in targets:
            if not p.alive:
                dropped.append(p.name)
            elif p.done is not None and p.done.get("ok"):
                if self._send(p, {"op": "commit", "version": version}, 5.0):
                    delivered.append(p)
            else:
                reason = str(p.done.get("error")) if p.done else "no report by the deadline"
                failed.setdefault(p.name, reason)
                # Back off a receiver that keeps failing, so it cannot make rounds spin.
                p.failures += 1
                p.retry_at = time.monotonic() + min(5.0, 0.1 * 2**p.failures)
                self._send(p, {"op": "abort", "version": version}, 5.0)
        names = {p.name for p in delivered}
        failed = {k: v for k, v in failed.items() if k not in names and k not in dropped}
        if backend != "tcp" and (failed or dropped) and self._group is not None:
            # A group that lost or failed a member is never trusted again.
            self._group.close()
            self._group = None
        report = RoundReport(
            version,
            epoch,
            backend,
            plan_kind,
            layout.total,
            [p.name for p in targets],
            sorted(names),
            failed,
            dropped,
            time.perf_counter() - t0,
            deadline_s,
        )
        # The report is visible before anyone waiting on the versions wakes up.
        self.reports.append(report)
        with self._cond:
            for p in delivered:
                p.version = version
                p.retry_at = 0.0
                p.failures = 0
            self._cond.notify_all()
        return report

    def _round_msg(
        self, p: _Peer, base: dict[str, Any], layout: Layout, sig: str, **extra: Any
    ) -> dict[str, Any]:
        msg = {**base, **extra}
        if p.layout_sig != sig:
            msg["layout"] = layout.to_wire()
            p.layout_sig = sig
        return msg

    def _start_tcp(
        self,
        targets: list[_Peer],
        base: dict[str, Any],
        layout: Layout,
        buf: torch.Tensor,
        sig: str,
        version: int,
        epoch: int,
        deadline: float,
        mark: Watermark,
    ) -> Fanout:
        members = [Member(p.name, p.node) for p in targets]
        plan = build_plan(
            Member(self.name, self.node), members, layout.total, self.topology, self.cfg.plan
        )
        bulk = {p.name: p.bulk for p in targets}
        for p in targets:
            children = [[c, bulk[c]] for c in plan.children(p.name)]
            self._send(
                p,
                self._round_msg(p, base, layout, sig, chunk=plan.chunk_bytes, children=children),
                5.0,
            )
        view = host_view(buf)
        fan = Fanout(
            version,
            epoch,
            self.name,
            view,
            mark,
            plan.chunk_bytes,
            deadline,
            self.secret,
            self.cfg.low_priority,
        )
        fan.start([(c, bulk[c]) for c in plan.children(self.name)])
        return fan

    def _run_collective(
        self,
        targets: list[_Peer],
        base: dict[str, Any],
        layout: Layout,
        buf: torch.Tensor,
        sig: str,
        deadline: float,
        packing: _Packing | None = None,
        epoch: int = 0,
    ) -> dict[str, str]:
        backend = base["backend"]
        names = tuple(p.name for p in targets)
        timeout = max(1.0, deadline - time.monotonic())
        fresh = self._group is None or self._group_members != names
        if fresh:
            if self._group is not None:
                self._group.close()
            self._group = None
            info: dict[str, Any] = {"group": new_group_id(), "size": len(targets) + 1}
            if backend == "gloo":
                if self._store is None:
                    self._store, self._store_addr = new_gloo_store(self.cfg.host, 60.0)
                info["store"] = self._store_addr
            else:
                info["uid"] = NcclGroup.unique_id()
        else:
            assert self._group is not None
            info = {"group": self._group.gid, "size": len(targets) + 1}
        for rank, p in enumerate(targets, start=1):
            msg = self._round_msg(p, base, layout, sig, group={**info, "rank": rank})
            self._send(p, msg, 5.0)
        if fresh:
            try:
                if backend == "gloo":
                    group: Collective = GlooGroup({**info, "rank": 0}, timeout, self._store)
                else:
                    group = NcclGroup({**info, "rank": 0}, timeout, self.device)
            except WeightSyncError as err:
                return {p.name: str(err) for p in targets}
            self._group, self._group_members = group, names
        assert self._group is not None
        ready = None
        if packing is not None:

            def ready(i: int) -> None:
                self._fill_bucket(packing, i)
                if i == len(layout.buckets) - 1:
                    self._send_sums(targets, packing.version, epoch, packing.sums)

        try:
            self._group.broadcast(buf, layout, deadline, ready)
        except (WeightSyncError, TimeoutError, RuntimeError) as err:
            self._group.close()
            self._group = None
            return {p.name: str(err) for p in targets}
        return {}

    def _await_done(self, targets: list[_Peer], deadline: float) -> None:
        with self._cond:
            while any(p.alive and p.done is None for p in targets):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed.is_set():
                    return
                self._cond.wait(remaining)
