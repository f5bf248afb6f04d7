"""Liveness, placement and control-message checks, with a fake clock and no sockets."""

from __future__ import annotations

import pytest

from dvla.cluster import protocol
from dvla.cluster.membership import Membership, Slot, capacity, refusal
from dvla.cluster.protocol import Resources
from dvla.cluster.server import make_slots, worker_of
from dvla.config import ClusterConfig, PlacementConfig, parse_config
from dvla.transport.frames import FrameError


def _membership(n_slots: int = 3, **cluster: object) -> Membership:
    cfg = ClusterConfig.model_validate(
        {"heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 2.0, "heartbeat_misses": 3, **cluster}
    )
    return Membership(cfg, [Slot(i, [4], i) for i in range(n_slots)])


def test_a_silent_worker_is_late_then_dead_after_misses_times_timeout() -> None:
    m = _membership()
    w = m.add("a", "host-a", Resources(4, 8.0, 0), now=0.0)
    m.place()
    assert m.check(now=1.9) == [] and w.state == "healthy"
    assert m.check(now=2.1) == [] and w.state == "late"
    m.beat(w.id, now=3.0)
    assert w.state == "healthy"
    assert m.check(now=8.9) == [] and w.state == "late"  # 2 misses of 2 s since 3.0
    assert m.check(now=9.1) == [w] and w.state == "dead"
    assert m.pending() == m.slots  # its slots are free again
    assert m.beat(w.id, now=9.2) is None  # the dead stay dead


def test_placement_spreads_slots_and_respects_capacity() -> None:
    m = _membership(5, placement={"processes_per_worker": 2})
    a = m.add("a", "h", Resources(8, 32.0, 0), now=0.0)
    b = m.add("b", "h", Resources(8, 32.0, 0), now=0.0)
    placed = m.place()
    assert [w.id for w, _ in placed] == [a.id, b.id, a.id, b.id]
    assert len(m.pending()) == 1  # no room left: 2 per worker
    c = m.add("c", "h", Resources(1, 1.0, 0), now=0.0)
    assert [(w.id, s.index) for w, s in m.place()] == [(c.id, 4)]
    gens = sorted(s.generation for s in m.slots)
    assert gens == [0, 1, 2, 3, 4]  # every placement is a new generation


def test_a_dead_workers_slots_go_to_survivors_with_room() -> None:
    m = _membership(2)
    a = m.add("a", "h", Resources(2, 8.0, 0), now=0.0)
    m.place()
    b = m.add("b", "h", Resources(2, 8.0, 0), now=0.0)
    assert m.place() == []
    assert a.slots == {0, 1}
    m.beat(b.id, now=100.0)
    assert m.check(now=100.0) == [a]
    moved = m.place(eligible={b.id})
    assert sorted(s.index for _, s in moved) == [0, 1] and b.slots == {0, 1}
    assert all(s.generation >= 2 for s in m.slots)


def test_only_eligible_workers_get_slots() -> None:
    m = _membership(1)
    a = m.add("a", "h", Resources(2, 8.0, 0), now=0.0)
    assert m.place(eligible=set()) == []
    assert [w.id for w, _ in m.place(eligible={a.id})] == [a.id]


def test_capacity_and_refusal_follow_the_placement() -> None:
    place = PlacementConfig(cpus_per_process=2, memory_gb_per_process=3, gpus_per_process=0)
    assert capacity(Resources(8, 7.0, 0), place) == 2  # memory bound
    assert capacity(Resources(3, 100.0, 0), place) == 1  # cpu bound
    gpu = PlacementConfig(gpus_per_process=1)
    reason = refusal(Resources(64, 512.0, 0), gpu)
    assert reason is not None and "1 GPUs per sampler process" in reason and "0 GPUs" in reason
    assert refusal(Resources(64, 512.0, 2), gpu) is None


@pytest.mark.parametrize(
    ("claim", "words"),
    [
        ({"cpus": 0, "memory_gb": 4.0, "gpus": 0}, "cpus must be"),
        ({"cpus": 10**6, "memory_gb": 4.0, "gpus": 0}, "cpus must be"),
        ({"cpus": 4, "memory_gb": -1.0, "gpus": 0}, "memory_gb must be"),
        ({"cpus": 4, "memory_gb": float("nan"), "gpus": 0}, "memory_gb must be"),
        ({"cpus": 4, "memory_gb": 4.0, "gpus": -1}, "gpus must be"),
        ({"cpus": True, "memory_gb": 4.0, "gpus": 0}, "cpus must be"),
        ({"cpus": 4, "gpus": 0}, "memory_gb must be"),
    ],
)
def test_impossible_resources_are_rejected(claim: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Resources.from_wire(claim)


def test_control_messages_are_checked_field_by_field() -> None:
    ok = protocol.message("revoke", slot=2)
    assert ok == {"op": "revoke", "data": {"slot": 2}}
    with pytest.raises(FrameError, match="unknown control op"):
        protocol.parse("launch_missiles", {})
    with pytest.raises(FrameError, match="field 'slot' must be int"):
        protocol.parse("revoke", {"slot": "2"})
    with pytest.raises(FrameError, match="unknown field 'extra'"):
        protocol.parse("revoke", {"slot": 2, "extra": 1})
    with pytest.raises(FrameError, match="'started' is missing"):
        protocol.parse(
            "heartbeat", {"t": 1.0, "samplers": [{"slot": 0, "producer": "w1.s0", "pid": 1}]}
        )
    with pytest.raises(FrameError, match="shard_envs"):
        protocol.parse(
            "assign", {"slot": 0, "generation": 0, "slots": 1, "shard_envs": [0], "first_shard": 0}
        )


def test_slots_cover_every_env_once() -> None:
    cfg = parse_config(
        {
            "pipeline": {"num_envs": 10, "shards": 5, "sample_processes": 3},
            "simulator": {"name": "toy"},
            "model": {"name": "tiny-vla"},
            "algorithm": {"name": "grpo"},
            "optimizer": {"name": "adamw"},
        }
    )
    slots = make_slots(cfg)
    assert [len(s.shard_envs) for s in slots] == [2, 2, 1]
    assert sum(sum(s.shard_envs) for s in slots) == 10
    assert [s.first_shard for s in slots] == [0, 2, 4]
    assert worker_of("w12.s0.g3.r1") == "w12"


def test_only_samplers_of_this_coordinators_live_workers_may_deliver() -> None:
    from dvla.cluster.server import ClusterServer
    from dvla.pipeline.stats import Accounting

    cfg = parse_config(
        {
            "pipeline": {"num_envs": 4, "shards": 2, "sample_processes": 2},
            "simulator": {"name": "toy"},
            "model": {"name": "tiny-vla"},
            "algorithm": {"name": "grpo"},
            "optimizer": {"name": "adamw"},
        }
    )
    server = ClusterServer(cfg, 8, Accounting(), None)
    rec = server.membership.add("a", "h", Resources(2, 4.0, 0))
    assert rec.id.startswith(f"w{server.session[:4]}-")
    assert server.refuse_peer(f"{rec.id}.s0.g0.r0") is None
    # A sampler of the coordinator that ran before a restart has an id this one never gave.
    other = ClusterServer(cfg, 8, Accounting(), None)
    stale = other.membership.add("a", "h", Resources(2, 4.0, 0)).id
    reason = server.refuse_peer(f"{stale}.s0.g0.r0")
    assert reason is not None and "unknown producer" in reason
    server.fenced.add(rec.id)
    reason = server.refuse_peer(f"{rec.id}.s0.g0.r0")
    assert reason is not None and "declared dead" in reason
    # What a fenced producer still delivers is counted, never trained on.
    server.record_fenced_delivery(f"{rec.id}.s0.g0.r0", 8)
    acc = server.accounting
    assert acc.produced == acc.discarded_dead_worker == 8 and acc.in_flight() == 0
