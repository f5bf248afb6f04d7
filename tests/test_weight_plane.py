"""The weight plane: buckets, the authenticated wire, rounds, failures, and late joiners."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from dvla.config import WeightPlaneConfig
from dvla.control import buckets, wire
from dvla.control.buckets import Layout, WeightSyncError
from dvla.control.publisher import WeightPublisher
from dvla.control.receiver import WeightReceiver
from dvla.testing import weights as peers
from dvla.transport.auth import Secret

SECRET = Secret(b"weight-plane-test-secret-0123456")


def _state(n: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(n, generator=g),
        "b": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(seed, dtype=torch.int64),
        "mask": torch.rand(13, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
        "t": torch.randn(5, 6, generator=g).t(),  # not contiguous
    }


# ---------------------------------------------------------------- buckets
def test_pack_unpack_round_trip_and_buckets_tile() -> None:
    state = _state(5000)
    layout = Layout.of(state, bucket_bytes=4096)
    assert sum(n for _, n in layout.buckets) == layout.total
    assert all(n <= 4096 for _, n in layout.buckets) and len(layout.buckets) > 3
    buf = buckets.empty_buffer(layout)
    buckets.pack(state, layout, buf)
    out = buckets.unpack(buf, layout)
    assert out.keys() == state.keys()
    for k, v in state.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    again = Layout.from_wire(layout.to_wire())
    assert again == layout and again.signature() == layout.signature()


def test_checksum_catches_a_changed_byte() -> None:
    state = _state(5000)
    layout = Layout.of(state, bucket_bytes=4096)
    buf = buckets.empty_buffer(layout)
    buckets.pack(state, layout, buf)
    sums = buckets.checksums(buf, layout)
    assert buckets.first_bad_bucket(buf, layout, sums) is None
    a, _ = layout.buckets[2]
    buf[a + 5] ^= 0xFF
    assert buckets.first_bad_bucket(buf, layout, sums) == 2
    assert buckets.first_bad_bucket(buf, layout, sums[:-1]) == 0


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["slots"][0].__setitem__(1, "complex128"),
        lambda d: d["slots"][0].__setitem__(4, 999999),
        lambda d: d["slots"][0].__setitem__(3, 3),
        lambda d: d["buckets"].pop(),
        lambda d: d.pop("total"),
    ],
)
def test_malformed_layouts_are_rejected(mutate: object) -> None:
    doc = Layout.of(_state(), 4096).to_wire()
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(WeightSyncError, match="malformed weight layout"):
        Layout.from_wire(doc)


def test_pack_refuses_a_changed_architecture() -> None:
    state = _state()
    layout = Layout.of(state, 4096)
    state["w"] = torch.randn(3)
    with pytest.raises(WeightSyncError, match="changed dtype or shape"):
        buckets.pack(state, layout, buckets.empty_buffer(layout))


# ---------------------------------------------------------------- wire
def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


def test_handshake_rejects_a_wrong_secret() -> None:
    import threading

    a, b = _pair()
    errors: list[BaseException] = []

    def server() -> None:
        try:
            wire.handshake(b, SECRET, "server", "pub", 2.0)
        except BaseException as err:
            errors.append(err)
            b.close()

    t = threading.Thread(target=server)
    t.start()
    try:
        with pytest.raises((WeightSyncError, ConnectionError, OSError)):
            wire.handshake(a, Secret(b"another-secret-0123456789abcdef"), "client", "x", 2.0)
    finally:
        t.join(5)
        a.close()
        b.close()
    assert errors and "failed authentication" in str(errors[0])


def test_messages_with_a_bad_magic_or_size_are_protocol_errors() -> None:
    a, b = _pair()
    with a, b:
        a.sendall(b"XXXX\x00\x00\x00\x00")
        with pytest.raises(WeightSyncError, match="not speaking the weight protocol"):
            wire.recv_msg(b, time.monotonic() + 2)
        a.sendall(wire.MAGIC + (10_000).to_bytes(4, "little"))
        with pytest.raises(WeightSyncError, match="exceeds"):
            wire.recv_msg(b, time.monotonic() + 2, limit=4096)


# ---------------------------------------------------------------- rounds in one process
@pytest.fixture
def cfg() -> WeightPlaneConfig:
    return WeightPlaneConfig(
        bucket_mb=0.25, heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0, deadline_base_s=5.0
    )


@pytest.mark.parametrize("backend", ["tcp", "gloo"])
def test_versions_reach_every_receiver_whole(cfg: WeightPlaneConfig, backend: str) -> None:
    cfg = cfg.model_copy(update={"backend": backend})
    pub = WeightPublisher(cfg, SECRET)
    addr = pub.start()
    recs = [WeightReceiver(cfg, SECRET, addr, f"r{i}") for i in range(3)]
    try:
        for r in recs:
            r.start()
        for v in (1, 2, 3):
            pub.publish(v, _state(100_000, seed=v))
            assert pub.wait_delivered(v, 30, count=3)
        with pytest.raises(ValueError, match="only go up"):
            pub.publish(3, _state())
        want = peers.digest(_state(100_000, seed=3))
        for r in recs:
            # Delivered means committed by the publisher; the receiver applies it next.
            got = r.take_newer(2, 5)
            assert got is not None and got[0] == 3 and peers.digest(got[1]) == want
            # Receive buffers are reused: never more than three per receiver.
            assert r.buffers_allocated <= 3
        assert all(rep.ok for rep in pub.reports)
        assert {rep.backend for rep in pub.reports} == {backend}
    finally:
        for r in recs:
            r.close()
        pub.close()


def test_a_version_failing_its_checksums_is_never_applied(
    cfg: WeightPlaneConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dvla.control.publisher as publisher

    real = publisher.pack_bucket

    def wrong(*args: Any, **kwargs: Any) -> int:
        real(*args, **kwargs)
        return 1  # not the bucket's checksum

    monkeypatch.setattr(publisher, "pack_bucket", wrong)
    pub = WeightPublisher(cfg, SECRET)
    rec = WeightReceiver(cfg, SECRET, pub.start(), "r0")
    try:
        rec.start()
        pub.publish(1, _state(50_000, seed=1))
        deadline = time.monotonic() + 10
        while not any(rep.failed for rep in pub.reports) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("checksum" in why for rep in pub.reports for why in rep.failed.values())
        assert rec.take_newer(-1, 0.5) is None and rec.version == -1
        monkeypatch.setattr(publisher, "pack_bucket", real)
        pub.publish(2, _state(50_000, seed=2))
        got = rec.take_newer(-1, 10)
        assert got is not None and got[0] == 2
        assert peers.digest(got[1]) == peers.digest(_state(50_000, seed=2))
    finally:
        rec.close()
        pub.close()


def test_a_duplicate_receiver_name_is_refused(cfg: WeightPlaneConfig) -> None:
    pub = WeightPublisher(cfg, SECRET)
    addr = pub.start()
    first = WeightReceiver(cfg, SECRET, addr, "same")
    second = WeightReceiver(cfg, SECRET, addr, "same")
    try:
        first.start()
        with pytest.raises(WeightSyncError, match="is taken"):
            second.start()
    finally:
        first.close()
        second.close()
        pub.close()


def test_a_receiver_with_the_wrong_secret_cannot_join(cfg: WeightPlaneConfig) -> None:
    pub = WeightPublisher(cfg, SECRET)
    rec = WeightReceiver(cfg, Secret(b"not-the-secret-0123456789abcdef0"), pub.start(), "x")
    try:
        with pytest.raises((WeightSyncError, ConnectionError, OSError)):
            rec.start()
        assert pub.members() == {}
    finally:
        rec.close()
        pub.close()


# ---------------------------------------------------------------- receivers in processes
@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            with_cont = p.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(with_cont, signal.SIGCONT)
            p.kill()
        p.wait(10)
        if p.stdout is not None:
            p.stdout.close()


def _start(
    procs: list[subprocess.Popen[str]], addr: str, cfg: WeightPlaneConfig, names: list[str]
) -> list[subprocess.Popen[str]]:
    new = [peers.spawn(addr, n, SECRET.value, cfg.model_dump(mode="json")) for n in names]
    procs.extend(new)
    for p in new:
        assert "joined" in peers.read_line(p, 30)
    return new


def _expect(p: subprocess.Popen[str], version: int, state: dict[str, torch.Tensor]) -> None:
    deadline = time.monotonic() + 60
    while True:
        line = peers.read_line(p, max(0.1, deadline - time.monotonic()))
        if line["version"] >= version:
            assert line["version"] == version
            assert line["digest"] == peers.digest(state)
            return


@pytest.mark.parametrize("backend", ["tcp", "gloo"])
def test_receiver_processes_get_every_version(
    cfg: WeightPlaneConfig, procs: list[subprocess.Popen[str]], backend: str
) -> None:
    cfg = cfg.model_copy(update={"backend": backend, "bucket_mb": 4.0})
    pub = WeightPublisher(cfg, SECRET)
    try:
        ps = _start(procs, pub.start(), cfg, ["r0", "r1", "r2"])
        for v in (1, 2):
            state = _state(2_000_000, seed=v)
            pub.publish(v, state)
            for p in ps:
                _expect(p, v, state)
    finally:
        pub.close()


def test_a_receiver_killed_mid_broadcast_costs_one_round_not_the_group(
    cfg: WeightPlaneConfig, procs: list[subprocess.Popen[str]]
) -> None:
    cfg = cfg.model_copy(update={"bucket_mb": 8.0, "min_bandwidth_mbps": 20.0})
    pub = WeightPublisher(cfg, SECRET)
    try:
        ps = _start(procs, pub.start(), cfg, ["r0", "r1", "r2"])
        big = _state(60_000_000, seed=1)  # 240 MB: long enough to kill a relay in flight
        pub.publish(1, big)
        time.sleep(0.15)
        ps[0].kill()  # r0 is first in the chain: its children lose their feed too
        deadline_s = cfg.deadline_s(Layout.of(big, cfg.bucket_bytes).total)
        t0 = time.monotonic()
        while not any("r0" in rep.dropped for rep in pub.reports):
            assert time.monotonic() - t0 < deadline_s + 5, "the round outlived its deadline"
            time.sleep(0.05)
        failed = next(rep for rep in pub.reports if "r0" in rep.dropped)
        assert failed.seconds <= deadline_s + 1 and not failed.ok
        # The survivors catch up on version 1, then get version 2.
        for p in ps[1:]:
            _expect(p, 1, big)
        small = _state(500_000, seed=2)
        pub.publish(2, small)
        for p in ps[1:]:
            _expect(p, 2, small)
        assert set(pub.members()) == {"r1", "r2"}
        # A receiver that joins late is given the current version.
        (late,) = _start(procs, pub.address, cfg, ["late"])
        _expect(late, 2, small)
    finally:
        pub.close()


def test_a_frozen_receiver_is_dropped_and_the_rest_go_on(
    cfg: WeightPlaneConfig, procs: list[subprocess.Popen[str]]
) -> None:
    pub = WeightPublisher(cfg, SECRET)
    try:
        ps = _start(procs, pub.start(), cfg, ["r0", "r1", "r2"])
        os.kill(ps[1].pid, signal.SIGSTOP)
        state = _state(1_000_000, seed=3)
        pub.publish(1, state)
        for p in (ps[0], ps[2]):
            _expect(p, 1, state)
        t0 = time.monotonic()
        while "r1" in pub.members():
            assert time.monotonic() - t0 < cfg.heartbeat_timeout_s + 5
            time.sleep(0.05)
        assert "r1" in pub.dropped
    finally:
        pub.close()


def test_a_receiver_says_so_when_the_publisher_vanishes(cfg: WeightPlaneConfig) -> None:
    pub = WeightPublisher(cfg, SECRET)
    rec = WeightReceiver(cfg, SECRET, pub.start(), "r0")
    try:
        rec.start()
        pub.publish(1, _state())
        assert rec.take_newer(0, 10) is not None
        # No goodbye: the publisher's sockets just go away, as when its process dies.
        for p in list(pub._peers.values()):
            p.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(WeightSyncError, match="weight plane lost"):
            rec.take_newer(1, 10)
    finally:
        rec.close()
        pub.close()


def test_after_a_goodbye_polling_waits_instead_of_spinning(cfg: WeightPlaneConfig) -> None:
    pub = WeightPublisher(cfg, SECRET)
    rec = WeightReceiver(cfg, SECRET, pub.start(), "r0")
    try:
        rec.start()
        pub.close()
        t0 = time.monotonic()
        while not rec._closed.is_set():
            assert time.monotonic() - t0 < 5
            time.sleep(0.01)
        t0 = time.monotonic()
        assert rec.take_newer(-1, 0.3) is None
        assert time.monotonic() - t0 >= 0.25 and rec.lost is None
    finally:
        rec.close()
