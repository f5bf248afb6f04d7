"""dvla-coordinator and dvla-worker as real processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dvla.cluster.checkpoint import CheckpointStore, state_digest
from dvla.cluster.protocol import CLUSTER_PROTOCOL, Resources
from dvla.cluster.worker import Worker
from dvla.testing import aio
from dvla.testing.cluster import SECRET, Cluster
from dvla.transport.auth import Secret

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy-processes.yaml"
FAST = [
    "run.eval_episodes=0",
    "pipeline.num_envs=24",
    "pipeline.shards=3",
    "pipeline.sample_processes=3",
    "cluster.heartbeat_interval_s=0.2",
    "cluster.heartbeat_timeout_s=0.5",
    "cluster.heartbeat_misses=2",
    "cluster.restart_backoff_s=0.2",
    # Room for every slot on one 2-core worker, so any survivor can take them all.
    "cluster.placement.cpus_per_process=0.5",
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made: list[Cluster] = []

    def make(*sets: str) -> Cluster:
        c = Cluster(tmp_path, CONFIG, [*FAST, *sets])
        made.append(c)
        return c

    c = make()
    c.make = make  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        for c in made:
            c.close()


def _balanced(acc: dict[str, Any]) -> bool:
    used = acc["consumed"] + acc["dropped_stale"] + acc["discarded"]
    return bool(acc["produced"] == used + acc["discarded_dead_worker"] + acc["in_flight"])


def _placed_on(st: dict[str, Any], healthy: int) -> bool:
    live = [w for w in st["workers"] if w["state"] == "healthy"]
    return st["slots"]["pending"] == 0 and len(live) == healthy


def test_three_workers_learn(cluster: Cluster) -> None:
    """A coordinator and three workers train the toy task to a rising success rate."""
    cluster.sets += [
        "cluster.placement.processes_per_worker=1",
        "run.target_success=0.3",
        "run.success_window=128",
        "run.max_wall_seconds=150",
    ]
    coordinator = cluster.start_coordinator()
    for name in ("a", "b", "c"):
        cluster.start_worker(name)
    st = cluster.wait_status(lambda s: _placed_on(s, 3), 60, "three workers with a slot each")
    assert sorted(len(w["slots"]) for w in st["workers"]) == [1, 1, 1]
    assert coordinator.wait(170) == 0, cluster.tail("coordinator.err")
    summary = cluster.summary()
    assert summary["stop_reason"] == "target_success", summary["stop_reason"]
    rows = [json.loads(x) for x in (cluster.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["success_rate"] < 0.25 <= summary["success_rate"]
    acc = summary["accounting"]
    assert _balanced(acc) and acc["in_flight"] == 0
    assert acc["consumed"] == summary["iterations"] * 8 * 8
    for proc in cluster.workers.values():  # told the run is over: they exit 0
        assert proc.wait(30) == 0


def test_dead_and_frozen_workers_are_replaced_and_nothing_is_counted_twice(
    cluster: Cluster,
) -> None:
    """SIGKILL one worker, SIGSTOP another: both declared dead, slots re-placed, exact books."""
    cluster.sets += [
        "cluster.placement.processes_per_worker=3",
        "run.target_success=null",
        "run.max_wall_seconds=150",
    ]
    cluster.start_coordinator()
    for name in ("a", "b", "c"):
        cluster.start_worker(name)
    cluster.wait_status(lambda s: _placed_on(s, 3) and s["iteration"] >= 3, 60, "a running run")
    victim = next(w for w in cluster.status()["workers"] if w["slots"])  # type: ignore[index]
    cluster.signal_worker(victim["name"], signal.SIGKILL)
    t0 = time.monotonic()
    st = cluster.wait_status(
        lambda s: any(w["id"] == victim["id"] and w["state"] == "dead" for w in s["workers"]),
        10,
        "the killed worker declared dead",
    )
    assert time.monotonic() - t0 < 5  # misses x timeout = 1 s, plus polling
    st = cluster.wait_status(lambda s: _placed_on(s, 2), 10, "its slot placed elsewhere")
    before = st["iteration"]
    frozen = next(w for w in st["workers"] if w["state"] == "healthy" and w["slots"])
    cluster.signal_worker(frozen["name"], signal.SIGSTOP)
    cluster.wait_status(
        lambda s: any(w["id"] == frozen["id"] and w["state"] == "dead" for w in s["workers"]),
        10,
        "the frozen worker declared dead",
    )
    cluster.wait_status(lambda s: _placed_on(s, 1), 10, "all slots on the last worker")
    cluster.signal_worker(frozen["name"], signal.SIGCONT)
    # It learns it was fenced and registers again, as a new worker.
    st = cluster.wait_status(
        lambda s: _placed_on(s, 2) and s["iteration"] >= before + 3, 60, "the thawed worker back"
    )
    names = [w["name"] for w in st["workers"] if w["state"] == "healthy"]
    assert frozen["name"] in names
    code, _ = cluster.http("/stop", "POST", token=SECRET)
    assert code == 202
    assert cluster.coordinator is not None and cluster.coordinator.wait(60) == 0
    summary = cluster.summary()
    acc = summary["accounting"]
    assert _balanced(acc) and acc["in_flight"] == 0, acc
    assert acc["consumed"] == summary["iterations"] * 8 * 8
    # Both lost workers' slots ran again elsewhere, each placement a new generation.
    assert st["generation"] >= 3 + 2


def test_a_coordinator_killed_with_sigkill_resumes_from_its_checkpoint(cluster: Cluster) -> None:
    cluster.sets += [
        "checkpoint.every_iterations=4",
        "run.target_success=null",
        "run.max_iterations=16",
        "run.max_wall_seconds=150",
    ]
    first = cluster.start_coordinator()
    cluster.start_worker("a")
    cluster.wait_status(lambda s: s["checkpoint"]["last_iteration"] >= 8, 90, "two checkpoints")
    first.kill()
    first.wait(10)
    store = CheckpointStore(cluster.run_dir / "checkpoints", 3)
    path, saved = store.latest()  # type: ignore[misc]
    second = cluster.start_coordinator("--resume")
    st = cluster.wait_status(lambda s: s["resumed"] is not None, 60, "the resumed coordinator")
    assert st["resumed"]["path"] == str(path)
    assert st["resumed"]["digest"] == state_digest(saved.model, saved.optimizer)
    assert st["iteration"] >= saved.iteration
    # The worker kept retrying and joined the new coordinator.
    assert second.wait(120) == 0, cluster.tail("coordinator.err")
    summary = cluster.summary()
    assert summary["iterations"] == 16 and summary["policy_version"] == 16
    assert _balanced(summary["accounting"])
    rows = [json.loads(x) for x in (cluster.run_dir / "metrics.jsonl").read_text().splitlines()]
    after = [r["iteration"] for r in rows[-(16 - saved.iteration) :]]
    assert after == list(range(saved.iteration + 1, 17))


def test_sigterm_drains_writes_a_final_checkpoint_and_exits_0(cluster: Cluster) -> None:
    cluster.sets += ["run.target_success=null", "run.max_wall_seconds=150"]
    coordinator = cluster.start_coordinator()
    cluster.start_worker("a")
    cluster.wait_status(lambda s: s["iteration"] >= 3, 90, "a running run")
    t0 = time.monotonic()
    coordinator.send_signal(signal.SIGTERM)
    assert coordinator.wait(30) == 0, cluster.tail("coordinator.err")
    assert time.monotonic() - t0 < 30
    summary = cluster.summary()
    assert summary["stop_reason"] == "signal SIGTERM"
    store = CheckpointStore(cluster.run_dir / "checkpoints", 3)
    found = store.latest()
    assert found is not None and found[1].iteration == summary["iterations"]
    assert cluster.workers["a"].wait(30) == 0


def test_bad_workers_and_requests_are_refused_and_the_coordinator_carries_on(
    cluster: Cluster,
) -> None:
    cluster.sets += [
        "run.target_success=null",
        "run.max_wall_seconds=150",
        "cluster.placement.gpus_per_process=0",
        "cluster.placement.memory_gb_per_process=1",
    ]
    cluster.start_coordinator()
    cluster.start_worker("good")
    cluster.wait_status(lambda s: s["iteration"] >= 1, 90, "a running run")
    bad = {**cluster.env, "DVLA_SECRET": "not-the-secret-at-all"}
    cases = {
        "wrong": (cluster.start_worker("wrong", env=bad), "authentication"),
        "nocpu": (cluster.start_worker("nocpu", "--cpus", "0"), "impossible resources"),
        "tiny": (cluster.start_worker("tiny", "--memory-gb", "0.1"), "placement needs"),
    }
    for name, (proc, words) in cases.items():
        assert proc.wait(30) == 2, name
        last = cluster.tail(f"worker-{name}.out", 1)
        assert last.startswith("error:") and words in last, (name, last)
    # A worker of another protocol version (run in this process, as the daemon would).
    old = Worker(
        f"tcp://{cluster.address}",
        Secret(SECRET.encode()),
        name="old",
        resources=Resources(2, 4.0, 0),
        log_dir=cluster.workdir / "worker-old",
        protocol_version=CLUSTER_PROTOCOL + 1,
    )
    assert aio.run(old.run(asyncio.Event()), 30) == 2
    assert f"speaks cluster protocol {CLUSTER_PROTOCOL + 1}" in old.exit_reason
    code, body = cluster.http("/stop", "POST")
    assert code == 401 and "error" in body
    code, body = cluster.http("/stop", "POST", token="wrong")
    assert code == 401
    st = cluster.wait_status(lambda s: s["state"] == "running", 5, "still running")
    assert st["refused_registrations"] >= 3  # wrong secret fails the handshake earlier
    assert [w["name"] for w in st["workers"]] == ["good"]
    code, text = cluster.http("/metrics")
    assert code == 200 and 'dvla_workers{state="healthy"} 1' in text
    code, _ = cluster.http("/stop", "POST", token=SECRET)
    assert code == 202
    assert cluster.coordinator is not None and cluster.coordinator.wait(60) == 0


@pytest.mark.chaos
@pytest.mark.slow
def test_chaos_random_worker_kills(cluster: Cluster) -> None:
    """Kill a random worker every few seconds for a minute; the books balance exactly."""
    cluster.sets += [
        "cluster.placement.processes_per_worker=3",
        "run.target_success=null",
        "run.max_wall_seconds=300",
    ]
    cluster.start_coordinator()
    names = [f"w{i}" for i in range(4)]
    for name in names:
        cluster.start_worker(name)
    cluster.wait_status(lambda s: s["iteration"] >= 2, 90, "a running run")
    rng = random.Random(0)
    end, kills, last = time.monotonic() + 60, 0, 0
    while time.monotonic() < end:
        time.sleep(rng.uniform(2, 5))
        name = rng.choice(names)
        cluster.signal_worker(name, rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGSTOP]))
        kills += 1
        time.sleep(1.5)
        cluster.signal_worker(name, signal.SIGCONT)
        cluster.workers[name].wait(5) if cluster.workers[name].poll() is not None else None
        if cluster.workers[name].poll() is not None:
            cluster.start_worker(name)  # elastic: a replacement joins the running pipeline
        st = cluster.wait_status(
            lambda s, seen=last: s["iteration"] > seen, 60, "progress after a kill"
        )
        last = st["iteration"]
        assert _balanced(st["accounting"]), st["accounting"]
    code, _ = cluster.http("/stop", "POST", token=SECRET)
    assert code == 202
    assert cluster.coordinator is not None and cluster.coordinator.wait(60) == 0
    acc = cluster.summary()["accounting"]
    assert kills >= 10 and _balanced(acc) and acc["in_flight"] == 0, acc
