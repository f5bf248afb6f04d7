"""What the cluster path costs, and how fast it recovers from a dead worker.

Two figures, each against a baseline measured in the same run:

1. Throughput: env steps/s of ``dvla-coordinator`` with three ``dvla-worker`` processes
   (one sampler process each) against ``dvla run`` hosting the same three sampler
   processes through its in-process worker. Ratio = cluster / embedded.
2. Recovery: a worker holding a slot is killed with SIGKILL; time until the coordinator
   declares it dead, against the configured bound (heartbeat_misses x
   heartbeat_timeout_s); then until its slot runs elsewhere and the learner updates again.

Usage: python benchmarks/cluster_recovery.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dvla.testing.cluster import Cluster

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy-processes.yaml"
TIMEOUT, MISSES = 0.5, 2
COMMON = [
    "run.eval_episodes=0",
    "run.target_success=null",
    "run.max_wall_seconds=600",
    "pipeline.num_envs=48",
    "pipeline.shards=3",
    "pipeline.sample_processes=3",
    "cluster.placement.cpus_per_process=0.5",
    "cluster.heartbeat_interval_s=0.2",
    f"cluster.heartbeat_timeout_s={TIMEOUT}",
    f"cluster.heartbeat_misses={MISSES}",
]


def embedded(work: Path, iterations: int) -> dict[str, Any]:
    run_dir = work / "embedded"
    sets = [*COMMON, f"run.max_iterations={iterations}"]
    args = [sys.executable, "-m", "dvla.cli", "run", str(CONFIG), "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"embedded run failed: {proc.stderr[-800:]}")
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary


def cluster_run(work: Path, iterations: int) -> tuple[dict[str, Any], dict[str, float]]:
    c = Cluster(work / "cluster", CONFIG, [*COMMON, f"run.max_iterations={iterations}"])
    c.workdir.mkdir()
    try:
        c.start_coordinator()
        for name in ("a", "b", "c"):
            c.start_worker(name)
        st = c.wait_status(
            lambda s: s["slots"]["pending"] == 0 and s["iteration"] >= 5, 120, "a running run"
        )
        victim = next(w for w in st["workers"] if w["slots"])
        t0 = time.monotonic()
        c.signal_worker(victim["name"], signal.SIGKILL)
        st = c.wait_status(
            lambda s: any(w["id"] == victim["id"] and w["state"] == "dead" for w in s["workers"]),
            30,
            "death",
        )
        dead = time.monotonic() - t0
        it = st["iteration"]
        c.wait_status(lambda s: s["slots"]["pending"] == 0, 30, "re-placement")
        placed = time.monotonic() - t0
        c.wait_status(lambda s: s["iteration"] > it, 30, "the next update")
        update = time.monotonic() - t0
        assert c.coordinator is not None
        if c.coordinator.wait(900) != 0:
            raise SystemExit(f"cluster run failed: {c.tail('coordinator.err')}")
        recovery = {"declared_dead_s": dead, "slot_placed_s": placed, "next_update_s": update}
        return c.summary(), recovery
    finally:
        c.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer iterations.")
    parser.add_argument("--json", metavar="FILE", help="Also write the figures here.")
    args = parser.parse_args()
    iterations = 30 if args.quick else 120
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = embedded(work, iterations)
        clus, rec = cluster_run(work, iterations)
    bound = TIMEOUT * MISSES
    out = {
        "iterations": iterations,
        "embedded_env_steps_per_s": round(base["env_steps_per_s"], 1),
        "cluster_env_steps_per_s": round(clus["env_steps_per_s"], 1),
        "throughput_ratio": round(clus["env_steps_per_s"] / base["env_steps_per_s"], 3),
        "detection_bound_s": bound,
        **{k: round(v, 3) for k, v in rec.items()},
        "detection_ratio": round(rec["declared_dead_s"] / bound, 3),
        "cluster_accounting": clus["accounting"],
    }
    print(
        f"throughput: cluster {out['cluster_env_steps_per_s']:.0f} steps/s vs embedded "
        f"{out['embedded_env_steps_per_s']:.0f} steps/s: ratio {out['throughput_ratio']:.2f}"
    )
    print(
        f"recovery: declared dead after {rec['declared_dead_s']:.2f} s (bound {bound:g} s, "
        f"ratio {out['detection_ratio']:.2f}); slot placed after {rec['slot_placed_s']:.2f} s; "
        f"next learner update after {rec['next_update_s']:.2f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
