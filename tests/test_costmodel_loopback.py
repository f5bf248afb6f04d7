"""The cost model against real relaying on loopback, with 2 to 4 processes.

Calibration: the per-stream rate of k concurrent raw socket copies (on one host every
"link" shares the same cores, and a pipelined chain of k hops does the same CPU work as
k concurrent copies) and the ping latency. Those become the links of a topology with one
GPU per "node"; each receiver process claims a node of its own, so the plan is a chain of
k inter-node hops. Stated tolerance: the measured round time is within 0.5x to 2.0x of
the model's prediction (the model ignores control messages and thread wake-ups).
"""

from __future__ import annotations

import statistics
import subprocess
import time

import pytest
import torch

from dvla.config import WeightPlaneConfig
from dvla.control.buckets import Layout
from dvla.control.plan import Member, build_plan, plan_time
from dvla.control.publisher import WeightPublisher
from dvla.control.topology import LinkSpec, Topology
from dvla.testing import weights as peers
from dvla.testing.rawcopy import ping_latency, raw_copy
from dvla.transport.auth import Secret

SECRET = Secret(b"cost-model-loopback-secret-01234")
MODEL_BYTES = 64 * 1024 * 1024
TOLERANCE = (0.5, 2.0)


@pytest.mark.parametrize("receivers", [1, 2, 3])
def test_chain_time_matches_the_model(receivers: int) -> None:
    state = {"w": torch.randn(MODEL_BYTES // 4)}
    total = Layout.of(state, 16 << 20).total
    cfg = WeightPlaneConfig(bucket_mb=16, heartbeat_interval_s=0.5, heartbeat_timeout_s=10)
    latency = ping_latency()
    rate = statistics.median(MODEL_BYTES / raw_copy(MODEL_BYTES, receivers) for _ in range(3))
    link = LinkSpec(bandwidth_gbps=rate * 8 / 1e9, latency_us=latency * 1e6)
    topo = Topology(nodes=receivers + 1, gpus_per_node=1, intra_node=link, inter_node=link)
    pub = WeightPublisher(cfg, SECRET, node="n0", topology=topo)
    procs: list[subprocess.Popen[str]] = []
    try:
        addr = pub.start()
        for i in range(receivers):
            p = peers.spawn(
                addr, f"r{i}", SECRET.value, cfg.model_dump(mode="json"), f"n{i + 1}", check=False
            )
            procs.append(p)
            assert "joined" in peers.read_line(p, 30)
        deadline = time.monotonic() + 30
        while len(pub.members()) < receivers:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        measured = []
        for v in range(7):
            state["w"][0] = v
            pub.publish(v, {"w": state["w"].clone()})
            assert pub.wait_delivered(v, 60, count=receivers)
            measured.append(pub.reports[-1].seconds)
        # The first rounds also connect and fault in fresh receive buffers.
        got = statistics.median(measured[3:])
    finally:
        pub.close()
        for p in procs:
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
    members = [Member(f"r{i}", f"n{i + 1}") for i in range(receivers)]
    plan = build_plan(Member("learner", "n0"), members, total, topo)
    assert plan.depth() == receivers  # a chain across the nodes
    node_of = {"learner": "n0", **{m.name: m.node for m in members}}
    predicted = plan_time(plan, node_of, topo, total)
    ratio = got / predicted
    assert TOLERANCE[0] <= ratio <= TOLERANCE[1], (
        f"measured {got:.4f} s vs predicted {predicted:.4f} s (ratio {ratio:.2f}) "
        f"at {rate / 2**30:.2f} GiB/s per stream"
    )
