"""What the staleness gate saves: the same strict-staleness run with and without it.

With ``pipeline.max_staleness: 0`` the learner may only train on on-policy data. Without
the gate, samplers keep acting with weights the learner is about to replace, and the
learner drops what they produce; with it, samplers start only groups the learner will be
able to use. Both runs do the same number of learner updates on the same config; the
figure that matters is *useful* throughput: environment steps the learner trained on
per second of wall time. The baseline (gate off) runs in the same invocation.

    python benchmarks/staleness_gate.py [--config FILE] [--iterations N] [--staleness S]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from dvla import logs
from dvla.cli import load_and_check
from dvla.pipeline import Coordinator
from dvla.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def run(
    config: str, gate: bool, iterations: int, staleness: int, sets: list[str]
) -> dict[str, Any]:
    overrides = [
        f"pipeline.staleness_gate={str(gate).lower()}",
        f"pipeline.max_staleness={staleness}",
        f"run.max_iterations={iterations}",
        "run.target_success=null",
        "run.eval_episodes=0",
        "run.max_wall_seconds=3600",
        "run.progress_interval_s=3600",
        "checkpoint.final=false",
        *sets,
    ]
    cfg = load_and_check(config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        rundir = RunDir(Path(tmp))
        try:
            co = Coordinator(cfg, rundir, source=config)
            summary = co.run()
            rows = [json.loads(x) for x in rundir.metrics_path.read_text().splitlines()]
        finally:
            rundir.close()
    trained_steps = sum(int(r.get("train_steps", 0)) for r in rows)
    acc = summary.accounting
    return {
        "gate": gate,
        "iterations": summary.iterations,
        "wall_s": summary.wall_s,
        "env_steps": summary.env_steps,
        "env_steps_per_s": summary.env_steps_per_s,
        "produced": acc["produced"],
        "consumed": acc["consumed"],
        "dropped_stale": acc["dropped_stale"],
        "wasted_share": acc["dropped_stale"] / max(acc["produced"], 1),
        "consumed_per_s": acc["consumed"] / summary.wall_s,
        "trained_steps": trained_steps,
        "staleness": summary.staleness,
        "gate_status": summary.staleness_gate,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "toy.yaml"))
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--staleness", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", metavar="FILE", help="Write the figures as JSON.")
    args = parser.parse_args(argv)
    logs.configure("warning")
    off = run(args.config, False, args.iterations, args.staleness, args.set)
    on = run(args.config, True, args.iterations, args.staleness, args.set)
    ratio = on["consumed_per_s"] / max(off["consumed_per_s"], 1e-9)
    out = {
        "config": args.config,
        "max_staleness": args.staleness,
        "gate_off": off,
        "gate_on": on,
        "useful_throughput_ratio": ratio,
    }
    w = sys.stdout.write
    w(f"config: {args.config}  max_staleness: {args.staleness}  updates: {args.iterations}\n")
    w(f"{'gate':<5} {'wall s':>7} {'produced':>9} {'dropped':>8} {'wasted':>7} {'used/s':>8}\n")
    for r in (off, on):
        w(
            f"{'on' if r['gate'] else 'off':<5} {r['wall_s']:>7.2f} {r['produced']:>9} "
            f"{r['dropped_stale']:>8} {r['wasted_share']:>7.1%} {r['consumed_per_s']:>8.1f}\n"
        )
    w(f"useful trajectories/s, gate on / gate off: {ratio:.2f}x\n")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
