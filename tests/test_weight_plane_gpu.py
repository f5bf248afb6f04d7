"""The weight plane on a GPU host: device checksums, packing from GPU weights, NCCL.

Every test is marked ``gpu`` and skipped with a reason where CUDA is absent; the NCCL
broadcast between two ranks needs two GPUs (NCCL allows one rank per GPU).
"""

from __future__ import annotations

import time

import pytest
import torch

from dvla.config import WeightPlaneConfig
from dvla.control import buckets
from dvla.control.buckets import Layout
from dvla.control.collective import NcclGroup, nccl_available
from dvla.control.publisher import WeightPublisher
from dvla.control.receiver import WeightReceiver
from dvla.testing import weights as peers
from dvla.transport.auth import Secret

SECRET = Secret(b"weight-plane-gpu-secret-01234567")
pytestmark = pytest.mark.gpu


def _state(device: str, n: int = 3_000_000) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1)
    return {
        "w": torch.randn(n, generator=g, device=device),
        "h": torch.randn(257, 33, generator=g, device=device).to(torch.bfloat16),
        "i": torch.arange(11, device=device),
    }


def test_device_checksum_is_stable_and_catches_changes() -> None:
    state = _state("cuda")
    layout = Layout.of(state, 1 << 20)
    buf = buckets.empty_buffer(layout, "cuda")
    buckets.pack(state, layout, buf)
    sums = buckets.checksums(buf, layout)
    assert sums == buckets.checksums(buf.clone(), layout)
    assert buckets.first_bad_bucket(buf, layout, sums) is None
    a, _ = layout.buckets[1]
    buf[a + 3] += 1
    assert buckets.first_bad_bucket(buf, layout, sums) == 1


def test_packing_gpu_weights_into_pinned_host_memory_waits_for_the_copy() -> None:
    state = _state("cuda", 20_000_000)
    layout = Layout.of(state, 1 << 22)
    host = buckets.empty_buffer(layout, "cpu")
    assert host.is_pinned()
    buckets.pack(state, layout, host)
    out = buckets.unpack(host, layout)
    for k, v in state.items():
        assert torch.equal(out[k], v.cpu()), k


def test_nccl_is_found_and_a_single_rank_group_broadcasts() -> None:
    assert nccl_available(), "cupy's NCCL should load on a GPU host"
    state = _state("cuda")
    layout = Layout.of(state, 1 << 20)
    buf = buckets.empty_buffer(layout, "cuda")
    buckets.pack(state, layout, buf)
    before = buckets.checksums(buf, layout)
    info = {"group": "solo", "rank": 0, "size": 1, "uid": NcclGroup.unique_id()}
    group = NcclGroup(info, 30.0, torch.device("cuda"))
    try:
        group.broadcast(buf, layout, time.monotonic() + 30)
    finally:
        group.close()
    assert buckets.checksums(buf, layout) == before


def test_gpu_learner_reaches_cpu_and_gpu_replicas_on_one_gpu() -> None:
    # One GPU: NCCL cannot put two ranks on it, so auto must fall back to tcp.
    cfg = WeightPlaneConfig(bucket_mb=4, heartbeat_interval_s=0.2, heartbeat_timeout_s=5)
    pub = WeightPublisher(cfg, SECRET, device="cuda")
    addr = pub.start()
    recs = [
        WeightReceiver(cfg, SECRET, addr, "cpu-replica"),
        WeightReceiver(cfg, SECRET, addr, "gpu-replica", device="cuda"),
    ]
    try:
        for r in recs:
            r.start()
        state = _state("cuda")
        pub.publish(1, state)
        assert pub.wait_delivered(1, 60, count=2)
        assert pub.reports[-1].backend == "tcp"
        want = peers.digest({k: v.cpu() for k, v in state.items()})
        for r in recs:
            got = r.take_newer(0, 10)
            assert got is not None and peers.digest(got[1]) == want
    finally:
        for r in recs:
            r.close()
        pub.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between ranks needs two GPUs")
def test_nccl_broadcast_between_two_gpus() -> None:
    cfg = WeightPlaneConfig(backend="nccl", bucket_mb=4)
    pub = WeightPublisher(cfg, SECRET, device="cuda:0")
    rec = WeightReceiver(cfg, SECRET, pub.start(), "gpu1", device="cuda:1")
    try:
        rec.start()
        state = _state("cuda:0")
        pub.publish(1, state)
        assert pub.wait_delivered(1, 60, count=1)
        assert pub.reports[-1].backend == "nccl"
        got = rec.take_newer(0, 10)
        assert got is not None
        assert all(torch.equal(got[1][k].cpu(), v.cpu()) for k, v in state.items())
    finally:
        rec.close()
        pub.close()
