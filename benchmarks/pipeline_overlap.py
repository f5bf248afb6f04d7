"""Async versus sync on identical work: how much of the lane overlap does dvla achieve?

Runs one pipeline file twice, in ``sync`` mode (sample, infer, learn, sync one after
another, as colocated trainers do) and in ``async`` mode (the four lanes overlapping),
each for the same number of learner iterations, and prints env steps/s of both, their
ratio, every lane's busy time, and the overlap bound: the throughput the sync run's
per-step lane costs would allow if only the slowest lane, or the number of CPU cores,
limited it. The async run's share of that bound says how close the scheduler gets.

    python benchmarks/pipeline_overlap.py [--config FILE] [--iterations N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from dvla import logs
from dvla.cli import load_and_check
from dvla.pipeline import Coordinator
from dvla.rundir import RunDir

HERE = Path(__file__).resolve().parent


def run_mode(config: str, mode: str, iterations: int, sets: list[str]) -> dict[str, Any]:
    overrides = [
        f"pipeline.mode={mode}",
        f"run.max_iterations={iterations}",
        "run.target_success=null",
        "run.eval_episodes=0",
        "run.max_wall_seconds=3600",
        "run.progress_interval_s=3600",
        *sets,
    ]
    cfg = load_and_check(config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        rundir = RunDir(Path(tmp))
        try:
            summary = Coordinator(cfg, rundir, source=config).run()
        finally:
            rundir.close()
    return {
        "mode": mode,
        "iterations": summary.iterations,
        "env_steps": summary.env_steps,
        "wall_s": summary.wall_s,
        "env_steps_per_s": summary.env_steps_per_s,
        "success_rate": summary.success_rate,
        "lanes_busy_s": {k: v["busy_s"] for k, v in summary.lanes.items()},
        "infer_mean_batch": summary.infer_mean_batch,
    }


def overlap_bound(sync: dict[str, Any], cpus: int) -> dict[str, float]:
    """Throughput allowed by the sync run's per-step lane costs with perfect overlap."""
    per_step = {k: v / sync["env_steps"] for k, v in sync["lanes_busy_s"].items()}
    slowest = max(per_step.values())
    cpu_limited = sum(per_step.values()) / cpus
    return {
        "bound_env_steps_per_s": 1.0 / max(slowest, cpu_limited),
        "slowest_lane_s_per_step": slowest,
        "cpu_limited_s_per_step": cpu_limited,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "configs" / "balanced.yaml"))
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", metavar="FILE", help="Write the figures as JSON.")
    args = parser.parse_args(argv)
    logs.configure("warning")
    sync = run_mode(args.config, "sync", args.iterations, args.set)
    asyn = run_mode(args.config, "async", args.iterations, args.set)
    bound = overlap_bound(sync, args.cpus)
    ratio = asyn["env_steps_per_s"] / sync["env_steps_per_s"]
    share = asyn["env_steps_per_s"] / bound["bound_env_steps_per_s"]
    out = {
        "config": args.config,
        "cpus": args.cpus,
        "sync": sync,
        "async": asyn,
        **bound,
        "async_over_sync": ratio,
        "async_share_of_bound": share,
        "bound_over_sync": bound["bound_env_steps_per_s"] / sync["env_steps_per_s"],
    }
    w = sys.stdout.write
    w(f"config: {args.config}  cpus: {args.cpus}  iterations: {args.iterations}\n")
    w(f"{'mode':<6} {'env steps/s':>12} {'wall s':>8}  lane busy s (sample/infer/learn/sync)\n")
    for r in (sync, asyn):
        b = r["lanes_busy_s"]
        w(
            f"{r['mode']:<6} {r['env_steps_per_s']:>12.0f} {r['wall_s']:>8.2f}  "
            f"{b['sample']:.2f}/{b['infer']:.2f}/{b['learn']:.2f}/{b['sync']:.2f}\n"
        )
    w(
        f"overlap bound: {bound['bound_env_steps_per_s']:.0f} env steps/s "
        f"({out['bound_over_sync']:.2f}x sync)\n"
    )
    w(f"async / sync: {ratio:.2f}x   async / bound: {share:.1%}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
