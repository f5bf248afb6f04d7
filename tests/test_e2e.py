"""End-to-end runs: every pipeline file in configs/, both modes, and learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dvla.cli import main

ROOT = Path(__file__).resolve().parents[1]
LIBERO = sorted((ROOT / "configs").glob("libero*.yaml"))
CONFIGS = sorted(set((ROOT / "configs").glob("*.yaml")) - set(LIBERO))
BENCH_CONFIGS = sorted((ROOT / "benchmarks" / "configs").glob("*.yaml"))


def _is_hf(path: Path) -> bool:
    """Whether the file's model is hf-vla (needs the [hf] extra and a model directory)."""
    doc = yaml.safe_load(path.read_text())
    return isinstance(doc, dict) and (doc.get("model") or {}).get("name") == "hf-vla"


# hf-vla configs skip with the `hf` marker's reason where transformers is missing.
RUNNABLE = [
    pytest.param(p, marks=pytest.mark.hf) if _is_hf(p) else p for p in CONFIGS + BENCH_CONFIGS
]

TINY = [
    "--set", "run.max_iterations=3",
    "--set", "run.target_success=null",
    "--set", "run.eval_episodes=6",
    "--set", "run.max_wall_seconds=120",
    "--set", "pipeline.num_envs=16",
]  # fmt: skip


# Real LIBERO environments cost seconds and about 2 GB each: two of them, one task,
# tiny images and three-step episodes, one learner update.
LIBERO_TINY = [
    "--set", "run.max_iterations=1",
    "--set", "run.eval_episodes=0",
    "--set", "run.max_wall_seconds=600",
    "--set", "pipeline.num_envs=2",
    "--set", "pipeline.shards=1",
    "--set", "pipeline.sample_processes=1",
    "--set", "pipeline.groups_per_iteration=1",
    "--set", "cluster.placement.cpus_per_process=1",
    "--set", "cluster.placement.memory_gb_per_process=4",
    "--set", "algorithm.group_size=2",
    "--set", "simulator.task_ids=[0]",
    "--set", "simulator.resolution=32",
    "--set", "simulator.render_quality=fast",
    "--set", "simulator.max_steps=3",
    "--set", "simulator.settle_steps=1",
]  # fmt: skip


def _run(
    path: Path, run_dir: Path, *extra: str, budget: list[str] = TINY, iterations: int = 3
) -> dict[str, object]:
    code = main(["run", str(path), "--run-dir", str(run_dir), *budget, *extra])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == summary["iterations"] == iterations
    assert (run_dir / "log.jsonl").stat().st_size > 0
    assert (run_dir / "config.yaml").exists()
    return summary


def test_configs_exist() -> None:
    assert any(p.name == "toy.yaml" for p in CONFIGS)
    suites = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
    assert {f"{s}_grpo.yaml" for s in suites} | {"libero_smoke.yaml"} == {p.name for p in LIBERO}


@pytest.mark.libero
@pytest.mark.parametrize("path", LIBERO, ids=lambda p: p.name)
def test_every_libero_config_runs_with_a_tiny_budget(path: Path, tmp_path: Path) -> None:
    summary = _run(path, tmp_path / "run", budget=LIBERO_TINY, iterations=1)
    acc = summary["accounting"]
    assert isinstance(acc, dict)
    assert acc["consumed"] == 2 and summary["env_steps"] >= 2
    assert 0.0 <= summary["success_rate"] <= 1.0  # type: ignore[operator]
    assert acc["produced"] == acc["consumed"] + acc["dropped_stale"] + acc["discarded"]


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
def test_every_config_runs_with_a_tiny_budget(path: Path, tmp_path: Path) -> None:
    extra: list[str] = []
    if _is_hf(path):
        # The config names a model directory the user creates first; make a tiny one here.
        from dvla.testing.hf import make_tiny_vla

        extra = ["--set", f"model.path={make_tiny_vla(tmp_path / 'tiny-paligemma')}"]
    summary = _run(path, tmp_path / "run", *extra)
    acc = summary["accounting"]
    assert isinstance(acc, dict)
    assert acc["consumed"] > 0
    assert summary["env_steps"] > 0
    assert summary["eval"]["episodes"] == 6  # type: ignore[index]
    # Every produced trajectory is accounted for once the run has stopped.
    assert acc["produced"] == acc["consumed"] + acc["dropped_stale"] + acc["discarded"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_modes_produce_the_same_kind_of_results(mode: str, tmp_path: Path) -> None:
    summary = _run(ROOT / "configs" / "toy.yaml", tmp_path / mode, "--set", f"pipeline.mode={mode}")
    assert summary["mode"] == mode
    assert summary["policy_version"] >= 1
    assert set(summary["lanes"]) == {"sample", "infer", "learn", "sync"}  # type: ignore[arg-type]
    for lane in ("sample", "infer", "learn"):
        assert summary["lanes"][lane]["busy_s"] > 0  # type: ignore[index]
    staleness = summary["staleness"]
    assert isinstance(staleness, dict)
    if mode == "sync":
        # Sample, infer, learn, sync in turn: every group is on-policy.
        assert set(staleness) == {"0"}


def test_max_staleness_zero_uses_only_on_policy_data(tmp_path: Path) -> None:
    summary = _run(
        ROOT / "configs" / "toy.yaml",
        tmp_path / "run",
        "--set", "pipeline.max_staleness=0",
        "--set", "pipeline.groups_per_iteration=2",
    )  # fmt: skip
    assert set(summary["staleness"]) <= {"0"}  # type: ignore[arg-type]


def test_toy_learns_on_a_small_budget(tmp_path: Path) -> None:
    """A clear rise over the random start (about 10%) in 300 updates, about a minute.

    Sync mode with a fixed seed is deterministic (no thread timing decides which policy
    version acts), so this checks the learning machinery without flakiness; the async
    run's time-to-target is the benchmark's and the slow test's business.
    """
    run_dir = tmp_path / "learn"
    code = main(
        [
            "run", str(ROOT / "configs" / "toy.yaml"), "--run-dir", str(run_dir),
            "--set", "seed=7",
            "--set", "pipeline.mode=sync",
            "--set", "run.max_iterations=300",
            "--set", "run.target_success=null",
            "--set", "run.eval_episodes=0",
        ]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 300
    start = rows[19]["success_rate"]  # the first ~600 episodes, near-random policy
    end = rows[-1]["success_rate"]  # the last 512 episodes
    assert start < 0.2, start
    assert end >= 0.35 and end >= 2.5 * start, (start, end)


@pytest.mark.slow
def test_toy_reaches_ninety_percent_within_five_minutes(tmp_path: Path) -> None:
    """The foundation's learning target, as `dvla run configs/toy.yaml` runs it."""
    run_dir = tmp_path / "full"
    assert main(["run", str(ROOT / "configs" / "toy.yaml"), "--run-dir", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "target_success"
    assert summary["wall_s"] <= 300
    assert summary["success_rate"] >= 0.9
