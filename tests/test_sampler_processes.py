"""The sample lane in its own processes, talking to the coordinator over the data plane."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def test_processes_learn_and_account_for_every_trajectory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "dvla.cli", "run", str(ROOT / "configs" / "toy-processes.yaml"),
         "--run-dir", str(run_dir), "--set", "run.max_iterations=12",
         "--set", "run.eval_episodes=0", "--set", "pipeline.num_envs=32"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = summary["accounting"]
    assert summary["iterations"] == 12
    assert acc["produced"] == acc["consumed"] + acc["dropped_stale"] + acc["discarded"]
    assert acc["consumed"] == 12 * 8 * 8  # groups_per_iteration x group_size, nothing twice
    # Busy time is reported by the sampler processes themselves.
    assert summary["lanes"]["sample"]["busy_s"] > 0
    logs = sorted(p.name for p in run_dir.glob("sampler*.log"))
    assert logs == ["sampler0.log", "sampler1.log"]
    assert "server stopping" in (run_dir / "sampler0.log").read_text()
    # The same path as the daemons: an in-process worker registered and got both slots.
    log = (run_dir / "log.jsonl").read_text()
    assert '"event": "worker joined"' in log and log.count('"event": "slot placed"') == 2


def test_a_killed_sampler_process_is_restarted_and_its_broken_episodes_counted(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvla.cli", "run", str(ROOT / "configs" / "toy-processes.yaml"),
         "--run-dir", str(run_dir), "--set", "run.max_wall_seconds=120",
         "--set", "run.target_success=null", "--set", "run.eval_episodes=0",
         "--set", "run.max_iterations=40", "--set", "cluster.restart_backoff_s=0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        # Wait for learner updates, so the samplers are mid-episode when one is killed.
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
            assert time.monotonic() < deadline, "the run never got going"
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        victim = min(_children(proc.pid))
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = summary["accounting"]
    assert summary["iterations"] == 40
    # The killed process had episodes under way: its worker read how many it had started
    # and the coordinator subtracted those it received.
    assert acc["episodes_lost"] > 0
    assert acc["produced"] == acc["consumed"] + acc["dropped_stale"] + acc["discarded"]
    log = (run_dir / "log.jsonl").read_text()
    assert '"sampler process crashed"' in log and '"code": -9' in log
    assert log.count('"event": "sampler process started"') == 3  # two, then one restart


def test_replicas_in_sampler_processes_follow_the_learner(tmp_path: Path) -> None:
    """Inference in the samplers: new versions arrive over the weight plane while they run."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "dvla.cli", "run", str(ROOT / "configs" / "toy-replicas.yaml"),
         "--run-dir", str(run_dir), "--set", "run.max_iterations=15",
         "--set", "run.eval_episodes=0", "--set", "pipeline.num_envs=32",
         "--set", "run.target_success=null"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    acc, ws = summary["accounting"], summary["weight_sync"]
    assert acc["produced"] == acc["consumed"] + acc["dropped_stale"] + acc["discarded"]
    assert ws["backend"] == "tcp" and ws["rounds"] >= 2 and ws["failed_rounds"] == 0
    # Version 0 is the learner's initial weights; both samplers applied later ones.
    versions = ws["sampler_versions"]
    assert len(versions) == 2 and min(versions.values()) >= 1, versions
    # Their infer lanes did the forwards, in batches across their own shards.
    assert summary["lanes"]["infer"]["busy_s"] > 0 and summary["infer_mean_batch"] > 1
    # Every consumed trajectory came from a version within the staleness bound.
    assert max(int(k) for k in summary["staleness"]) <= 4


def test_inference_in_samplers_needs_sampler_processes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dvla.cli", "validate", str(ROOT / "configs" / "toy.yaml"),
         "--set", "pipeline.inference=samplers"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "inference: samplers needs sample_processes >= 1" in lines[0]
