"""The receiving end of the weight plane, one per inference process.

A receiver joins the publisher's group over an authenticated control connection and
takes part in rounds: it receives a version (relaying it to its children in the plan as
it arrives), checks every bucket's checksum, reports, and makes the version visible only
when the publisher's commit arrives. Its consumer therefore never sees a partly
transferred version, and versions only go up.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from dvla import logs
from dvla.config import WeightPlaneConfig
from dvla.control import wire
from dvla.control.buckets import (
    Layout,
    WeightSyncError,
    empty_buffer,
    first_bad_bucket,
    host_view,
    unpack,
)
from dvla.control.collective import Collective, GlooGroup, NcclGroup, gpu_identity
from dvla.control.relay import BucketChecker, Fanout, Watermark, recv_stream
from dvla.transport import auth

log = logs.get(__name__)
StateDict = dict[str, torch.Tensor]


@dataclass
class _Held:
    version: int
    layout: Layout
    buf: torch.Tensor


class WeightReceiver:
    """Joins a :class:`~dvla.control.publisher.WeightPublisher` and receives its versions."""

    def __init__(
        self,
        cfg: WeightPlaneConfig,
        secret: auth.Secret,
        publisher: str,
        name: str,
        node: str | None = None,
        device: str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.secret = secret
        self.publisher = publisher
        self.name = name
        self.node = node or auth.host_id()
        self.device = torch.device(device)
        self.rounds_ok = 0
        self.rounds_failed = 0
        self._cond = threading.Condition()
        self._committed: _Held | None = None
        self._leased: _Held | None = None
        self._staged: _Held | None = None
        self._free: list[torch.Tensor] = []
        self._layout: Layout | None = None
        self._group: Collective | None = None
        self._inbox: dict[tuple[int, int], socket.socket] = {}
        self._late_sums: tuple[int, int, list[int]] = (-1, -1, [])
        self._rounds: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._closed = threading.Event()
        #: Why the publisher was lost (it left without a goodbye); None while all is well.
        self.lost: str | None = None
        self._ctl: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._bulk = wire.listener(cfg.host, 0)
        self.bulk_addr = wire.address(self._bulk, cfg.advertise_host)
        self.buffers_allocated = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> None:
        """Join the publisher; raises if it cannot be reached or refuses us."""
        self._join(timeout)
        for target, nm in (
            (self._control_loop, "control"),
            (self._accept_loop, "accept"),
            (self._round_loop, "rounds"),
        ):
            t = threading.Thread(target=target, name=f"dvla-weights-{nm}", daemon=True)
            t.start()
            self._threads.append(t)

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        sock = wire.connect(self.publisher, self.secret, self.name, timeout)
        try:
            with self._cond:
                version = self._committed.version if self._committed else -1
            join = {
                "op": "join",
                "name": self.name,
                "node": self.node,
                "bulk": self.bulk_addr,
                "version": version,
                "cuda": self.device.type == "cuda",
                "gpu": gpu_identity(self.device),
            }
            wire.send_msg(sock, join, deadline)
            reply = wire.recv_msg(sock, deadline)
            if reply["op"] == "error":
                raise WeightSyncError(
                    f"weight publisher refused {self.name}: {reply.get('message')}"
                )
            if reply["op"] != "welcome":
                raise WeightSyncError(f"weight publisher answered {reply['op']!r} to join")
        except BaseException:
            sock.close()
            raise
        self._ctl = sock

    def close(self) -> None:
        """Leave the group and stop every thread (bounded)."""
        leaving = not self._closed.is_set()
        self._closed.set()
        if leaving:
            with contextlib.suppress(OSError, TimeoutError):
                self._send({"op": "leave"})
        self._rounds.put(None)
        for s in (self._ctl, self._bulk):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        with self._cond:
            for s in self._inbox.values():
                s.close()
            self._inbox.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(5.0)

    # ------------------------------------------------------------------ consumer side
    @property
    def version(self) -> int:
        """The newest committed version (-1 before the first)."""
        with self._cond:
            return self._committed.version if self._committed else -1

    def take_newer(self, than: int, timeout: float) -> tuple[int, StateDict] | None:
        """The newest committed version above ``than``, waiting up to ``timeout`` s.

        The returned tensors view a receive buffer that stays untouched until the next
        call, which is the consumer saying it has finished copying them.

        Raises:
            WeightSyncError: the publisher vanished without saying goodbye; replicas
                would otherwise serve ever staler weights in silence.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            self._release_lease()
            while self._committed is None or self._committed.version <= than:
                if self.lost is not None:
                    raise WeightSyncError(f"weight plane lost: {self.lost}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                # After an orderly goodbye nothing new comes: wait out the timeout
                # rather than return at once, so a polling caller does not spin.
                self._cond.wait(remaining)
            held = self._committed
            self._leased = held
            return held.version, unpack(held.buf, held.layout)

    def _release_lease(self) -> None:
        held, self._leased = self._leased, None
        if held is not None and held is not self._committed:
            self._free.append(held.buf)

    async def wait_newer(self, than: int, timeout: float) -> tuple[int, StateDict] | None:
        """:class:`~dvla.pipeline.weights.WeightBus`'s read side, off the event loop."""
        return await asyncio.to_thread(self.take_newer, than, timeout)

    def publish(self, version: int, state: StateDict) -> None:
        raise WeightSyncError("a weight receiver cannot publish")

    # ------------------------------------------------------------------ buffers
    def _buffer(self, layout: Layout, device: torch.device) -> torch.Tensor:
        with self._cond:
            for i, buf in enumerate(self._free):
                if buf.numel() == layout.total and buf.device == device:
                    return self._free.pop(i)
            # Buffers of an old layout or device are dropped, not kept forever.
            self._free.clear()
            self.buffers_allocated += 1
        return empty_buffer(layout, device)

    def _recycle(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buf)

    # ------------------------------------------------------------------ control
    def _send(self, body: dict[str, Any]) -> None:
        sock = self._ctl
        if sock is None:
            return
        with self._send_lock:
            wire.send_msg(sock, body, time.monotonic() + self.cfg.heartbeat_timeout_s)

    def _control_loop(self) -> None:
        sock = self._ctl
        assert sock is not None
        try:
            while not self._closed.is_set():
                msg = wire.recv_msg(sock, time.monotonic() + self.cfg.heartbeat_timeout_s)
                op = msg["op"]
                if op == "ping":
                    self._send({"op": "pong", "version": self.version})
                elif op == "round":
                    self._rounds.put(msg)
                elif op == "commit":
                    self._commit(int(msg["version"]))
                elif op == "sums":  # a version's checksums, after its data
                    with self._cond:
                        sums = [int(x) for x in msg["checksums"]]
                        self._late_sums = (int(msg["version"]), int(msg["epoch"]), sums)
                        self._cond.notify_all()
                elif op == "abort":
                    self._abort(int(msg["version"]))
                elif op == "bye":
                    break
        except (OSError, ConnectionError, TimeoutError, WeightSyncError) as err:
            if not self._closed.is_set():
                self.lost = f"{self.publisher} unreachable ({type(err).__name__}: {err})"
                log.warning("weight publisher lost", receiver=self.name, error=str(err))
        finally:
            self._closed.set()
            self._rounds.put(None)
            with self._cond:
                self._cond.notify_all()

    def _commit(self, version: int) -> None:
        with self._cond:
            staged = self._staged
            if staged is None or staged.version != version:
                return
            self._staged = None
            old, self._committed = self._committed, staged
            if old is not None and old is not self._leased:
                self._free.append(old.buf)
            self._cond.notify_all()
        log.debug("weights committed", receiver=self.name, version=version)

    def _abort(self, version: int) -> None:
        with self._cond:
            if self._staged is not None and self._staged.version == version:
                self._free.append(self._staged.buf)
                self._staged = None

    def _checksums(self, msg: dict[str, Any], deadline: float) -> list[int]:
        """The round's checksums, from its message or from the ``sums`` message after it.

        A version that the publisher packs while sending it has its checksums follow.
        """
        if msg.get("checksums") is not None:
            return [int(x) for x in msg["checksums"]]
        key = (int(msg["version"]), int(msg["epoch"]))
        with self._cond:
            while self._late_sums[:2] != key:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed.is_set():
                    raise TimeoutError("no checksums from the publisher before the deadline")
                self._cond.wait(remaining)
            return self._late_sums[2]

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._bulk.accept()
            except OSError:
                return
            try:
                wire.tune(conn)
                wire.handshake(conn, self.secret, "server", self.name, 10.0)
                head = wire.recv_msg(conn, time.monotonic() + 10.0, wire.PREAUTH_MAX)
                if head["op"] != "stream":
                    raise WeightSyncError("expected a weight stream header")
                key = (int(head["version"]), int(head["epoch"]))
            except (OSError, ConnectionError, TimeoutError, WeightSyncError, KeyError) as err:
                log.warning("weight stream refused", receiver=self.name, error=str(err))
                conn.close()
                continue
            with self._cond:
                old = self._inbox.pop(key, None)
                if old is not None:
                    old.close()
                self._inbox[key] = conn
                self._cond.notify_all()

    def _await_stream(self, key: tuple[int, int], deadline: float) -> socket.socket:
        with self._cond:
            while key not in self._inbox:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed.is_set():
                    raise TimeoutError("no weight stream from the parent before the deadline")
                self._cond.wait(remaining)
            for k in [k for k in self._inbox if k < key]:
                self._inbox.pop(k).close()
            return self._inbox.pop(key)

    # ------------------------------------------------------------------ rounds
    def _round_loop(self) -> None:
        if self.cfg.low_priority:
            wire.lower_priority()
        while True:
            msg = self._rounds.get()
            while msg is not None and not self._rounds.empty():
                msg = self._rounds.get()  # only the newest round matters
            if msg is None or self._closed.is_set():
                return
            self._round(msg)

    def _round(self, msg: dict[str, Any]) -> None:
        version, epoch = int(msg["version"]), int(msg["epoch"])
        deadline = time.monotonic() + float(msg["deadline_s"])
        t0 = time.perf_counter()
        error = ""
        buf: torch.Tensor | None = None
        try:
            if "layout" in msg:
                self._layout = Layout.from_wire(msg["layout"])
            layout = self._layout
            if layout is None:
                raise WeightSyncError("round without a layout")
            nccl = msg["backend"] == "nccl"
            buf = self._buffer(layout, self.device if nccl else torch.device("cpu"))
            if msg.get("checksum", "host") != ("device" if buf.is_cuda else "host"):
                raise WeightSyncError("checksum kind does not match the receive buffer's device")
            if msg["backend"] == "tcp":  # checks each bucket as it arrives
                self._receive_tcp(msg, version, epoch, layout, buf, deadline)
            else:
                self._receive_collective(msg, layout, buf, deadline)
                bad = first_bad_bucket(buf, layout, self._checksums(msg, deadline))
                if bad is not None:
                    raise WeightSyncError(f"bucket {bad} of version {version} failed its checksum")
        except (OSError, ConnectionError, TimeoutError, WeightSyncError, KeyError) as err:
            error = f"{type(err).__name__}: {err}"
        if error:
            self.rounds_failed += 1
            if buf is not None:
                self._recycle(buf)
            log.info("weight round failed", receiver=self.name, version=version, error=error)
        else:
            assert buf is not None and layout is not None
            with self._cond:
                if self._staged is not None:
                    self._free.append(self._staged.buf)
                self._staged = _Held(version, layout, buf)
            self.rounds_ok += 1
        seconds = time.perf_counter() - t0
        with contextlib.suppress(OSError, TimeoutError):
            self._send(
                {
                    "op": "done",
                    "version": version,
                    "epoch": epoch,
                    "ok": not error,
                    "error": error,
                    "seconds": seconds,
                }
            )

    def _receive_tcp(
        self,
        msg: dict[str, Any],
        version: int,
        epoch: int,
        layout: Layout,
        buf: torch.Tensor,
        deadline: float,
    ) -> None:
        if buf.is_cuda:
            raise WeightSyncError("the tcp backend receives into host memory; use device cpu")
        view = host_view(buf)
        mark = Watermark(layout.total)
        chunk = int(msg["chunk"])
        fan = Fanout(
            version,
            epoch,
            self.name,
            view,
            mark,
            chunk,
            deadline,
            self.secret,
            self.cfg.low_priority,
        )
        fan.start([(str(n), str(a)) for n, a in msg["children"]])
        checker = BucketChecker(
            buf, layout, lambda: self._checksums(msg, deadline), mark, deadline, version
        )
        checker.start()
        try:
            sock = self._await_stream((version, epoch), deadline)
            try:
                recv_stream(sock, view, mark, chunk, deadline)
            finally:
                sock.close()
            # Checked as the buckets arrived, and before waiting for the children.
            checker.result()
        except BaseException as err:
            mark.fail(err)
            fan.abort()
            raise
        finally:
            failed = fan.join()
            if failed:
                log.info("weight relay to children failed", receiver=self.name, failed=failed)

    def _receive_collective(
        self, msg: dict[str, Any], layout: Layout, buf: torch.Tensor, deadline: float
    ) -> None:
        info = msg["group"]
        group = self._group
        if group is None or group.gid != str(info["group"]):
            if group is not None:
                group.close()
            self._group = None
            timeout = max(1.0, deadline - time.monotonic())
            if msg["backend"] == "gloo":
                group = GlooGroup(info, timeout)
            else:
                group = NcclGroup(info, timeout, self.device)
            self._group = group
        try:
            group.broadcast(buf, layout, deadline)
        except BaseException:
            group.close()
            self._group = None
            raise
