"""Pipelined relaying of one flat buffer along a replication tree over TCP.

A node forwards each chunk to its children as soon as it has arrived, so a chain of
hops costs about one transfer plus one chunk per hop rather than one transfer per hop.
A :class:`Watermark` says how much of the buffer is valid; one thread receives and raises
it, one thread per child sends up to it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dvla import logs
from dvla.control import wire
from dvla.control.buckets import Layout, WeightSyncError, bucket_checksum
from dvla.transport import auth

log = logs.get(__name__)


class Watermark:
    """How many leading bytes of a buffer are valid; senders wait for it to rise."""

    def __init__(self, total: int, level: int = 0) -> None:
        self.total = total
        self._level = level
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    def advance(self, level: int) -> None:
        with self._cond:
            self._level = level
            self._cond.notify_all()

    def fail(self, err: BaseException) -> None:
        with self._cond:
            self._error = err
            self._cond.notify_all()

    def wait_above(self, pos: int, deadline: float) -> int:
        """The level once it exceeds ``pos``; raises if the source failed or time ran out."""
        with self._cond:
            while self._level <= pos:
                if self._error is not None:
                    raise ConnectionError(f"upstream failed: {self._error}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("weight-plane deadline passed waiting for upstream")
                self._cond.wait(remaining)
            return self._level


def send_stream(
    sock: socket.socket, buf: memoryview, mark: Watermark, chunk: int, deadline: float
) -> None:
    """Send ``buf`` to a child as fast as the watermark allows."""
    sent = 0
    while sent < mark.total:
        level = mark.wait_above(sent, deadline)
        while sent < level:
            n = min(chunk, level - sent)
            wire.set_deadline(sock, deadline)
            sock.sendall(buf[sent : sent + n])
            sent += n


def recv_stream(
    sock: socket.socket, buf: memoryview, mark: Watermark, chunk: int, deadline: float
) -> None:
    """Receive ``buf`` from the parent, raising the watermark every ``chunk`` bytes."""
    pos, told, total = 0, 0, mark.total
    try:
        while pos < total:
            wire.set_deadline(sock, deadline)
            got = sock.recv_into(buf[pos:], min(total - pos, 1 << 22))
            if not got:
                raise ConnectionError("parent closed the weight stream early")
            pos += got
            if pos - told >= chunk or pos == total:
                mark.advance(pos)
                told = pos
    except BaseException as err:
        mark.fail(err)
        raise


@dataclass
class Fanout:
    """Sender threads to a node's children for one version; collects their failures."""

    version: int
    epoch: int
    source: str
    buf: memoryview
    mark: Watermark
    chunk: int
    deadline: float
    secret: auth.Secret
    low_priority: bool = False
    failed: dict[str, str] = field(default_factory=dict)
    threads: list[tuple[str, threading.Thread]] = field(default_factory=list)
    socks: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, children: list[tuple[str, str]]) -> None:
        for name, addr in children:
            t = threading.Thread(
                target=self._send, args=(name, addr), name=f"dvla-weights-to-{name}", daemon=True
            )
            t.start()
            self.threads.append((name, t))

    def _send(self, name: str, addr: str) -> None:
        if self.low_priority:
            wire.lower_priority()
        try:
            timeout = max(0.1, min(10.0, self.deadline - time.monotonic()))
            sock = wire.connect(addr, self.secret, self.source, timeout)
            with self._lock:
                self.socks.append(sock)
            try:
                header = {
                    "op": "stream",
                    "version": self.version,
                    "epoch": self.epoch,
                    "total": self.mark.total,
                }
                wire.send_msg(sock, header, self.deadline)
                send_stream(sock, self.buf, self.mark, self.chunk, self.deadline)
                # The child closes once it has everything; waiting for that keeps the
                # sender from reporting success for bytes still in a kernel buffer.
                sock.settimeout(max(0.01, self.deadline - time.monotonic()))
                sock.recv(1)
            finally:
                sock.close()
        except (OSError, ConnectionError, TimeoutError, WeightSyncError) as err:
            with self._lock:
                self.failed[name] = f"{type(err).__name__}: {err}"
            log.debug("weight stream to child failed", child=name, error=str(err))

    def join(self) -> dict[str, str]:
        """Wait for every sender (each bounded by the deadline); the children that failed."""
        for _, t in self.threads:
            t.join(max(0.0, self.deadline - time.monotonic()) + 1.0)
        with self._lock:
            for name, t in self.threads:
                if t.is_alive():
                    self.failed.setdefault(name, "still sending at the deadline")
            return dict(self.failed)

    def abort(self) -> None:
        """Cut every child connection (a newer round replaces this one)."""
        with self._lock:
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class BucketChecker:
    """Checks each bucket's checksum as soon as the watermark says it has arrived.

    A thread of its own beside the receiving one, so checking a version overlaps its
    transfer: when the last byte arrives only the last bucket is left to check.
    ``expected`` returns the checksums, waiting for them where they follow the data.
    """

    def __init__(
        self,
        buf: torch.Tensor,
        layout: Layout,
        expected: Callable[[], Sequence[int]],
        mark: Watermark,
        deadline: float,
        version: int,
    ) -> None:
        self.buf, self.layout, self.expected = buf, layout, expected
        self.mark, self.deadline, self.version = mark, deadline, version
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dvla-weights-check", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            # Hash each bucket as it lands; the expected sums may only follow the data
            # (a version packed while it is sent), so compare at the end.
            got = []
            for a, n in self.layout.buckets:
                self.mark.wait_above(a + n - 1, self.deadline)
                got.append(bucket_checksum(self.buf[a : a + n]))
            expected = [int(x) for x in self.expected()]
            if len(expected) != len(got):
                raise WeightSyncError(f"bucket 0 of version {self.version} failed its checksum")
            for i, (have, want) in enumerate(zip(got, expected, strict=True)):
                if have != want:
                    raise WeightSyncError(
                        f"bucket {i} of version {self.version} failed its checksum"
                    )
        except (OSError, ConnectionError, TimeoutError, WeightSyncError, ValueError) as err:
            self.error = err

    def result(self) -> None:
        """Wait for the last bucket's check (bounded by the deadline); raise what failed."""
        self._thread.join(max(0.0, self.deadline - time.monotonic()) + 1.0)
        if self._thread.is_alive():
            raise TimeoutError("weight checksums not done by the deadline")
        if self.error is not None:
            raise self.error
