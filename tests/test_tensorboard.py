"""TensorBoard scalars per iteration: written when the package is there, never required."""

from __future__ import annotations

import errno
import json
import logging
import math
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from dvla.cli import main
from dvla.pipeline.stats import Accounting
from dvla.pipeline.tensorboard import TensorBoardLog, scalars

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy.yaml")
ITERATIONS = 3
TINY = [
    "--set", f"run.max_iterations={ITERATIONS}",
    "--set", "run.target_success=null",
    "--set", "run.eval_episodes=0",
    "--set", "run.max_wall_seconds=120",
    "--set", "pipeline.num_envs=16",
]  # fmt: skip
PER_ITERATION = [
    "rollout/success_rate",
    "rollout/return_mean",
    "throughput/env_steps_per_s",
    "lanes/sample_busy_share",
    "lanes/infer_busy_share",
    "lanes/learn_busy_share",
    "lanes/sync_busy_share",
    "queues/trajectory_groups",
    "queues/infer_requests",
    "staleness/mean",
    "staleness/max",
    "train/loss",
    "train/pg_loss",
    "train/entropy",
    "train/ess",
    "weights/policy_version",
]


@pytest.fixture(autouse=True)
def _drop_dvla_log_handlers() -> Iterator[None]:
    """The CLI installs root log handlers bound to the captured stderr; remove them after."""
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dvla", False):
            root.removeHandler(h)
            h.close()


def _without_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import tensorboard`` and ``torch.utils.tensorboard`` fail as if not installed."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def _run(run_dir: Path, *extra: str) -> list[dict[str, Any]]:
    assert main(["run", TOY, "--run-dir", str(run_dir), *TINY, *extra]) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))
    return rows


def _read(directory: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------------ with the package
def test_a_run_writes_its_scalars_once_per_iteration(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    rows = _run(run_dir)
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    got = _read(run_dir / "tensorboard")
    steps = list(range(1, ITERATIONS + 1))
    for tag in PER_ITERATION:
        assert tag in got, sorted(got)
        assert [s for s, _ in got[tag]] == steps, tag
    values = {tag: [v for _, v in got[tag]] for tag in got}
    # The event file says what metrics.jsonl says (float32 in the event file).
    for row, success, ret, rate in zip(
        rows,
        values["rollout/success_rate"],
        values["rollout/return_mean"],
        values["throughput/env_steps_per_s"],
        strict=True,
    ):
        assert success == pytest.approx(row["success_rate"], rel=1e-6)
        assert ret == pytest.approx(row["accounting"]["return_mean"], abs=1e-4)
        assert rate == pytest.approx(row["env_steps_per_s"], rel=1e-6)
    assert all(0.0 <= v <= 1.0 for v in values["rollout/success_rate"])
    # On toy the reward is 1 exactly when the episode succeeds.
    assert values["rollout/return_mean"] == pytest.approx(values["rollout/success_rate"], abs=1e-3)
    assert all(v > 0 for v in values["throughput/env_steps_per_s"])
    for lane in ("sample", "infer", "learn", "sync"):
        assert all(0.0 <= v <= 1.0 for v in values[f"lanes/{lane}_busy_share"]), lane
    assert max(values["lanes/learn_busy_share"]) > 0
    assert all(0 <= v <= 8 for v in values["queues/trajectory_groups"])  # queue_groups: 8
    assert all(v >= 0 and v == int(v) for v in values["queues/infer_requests"])
    assert all(
        0 <= m <= x <= 4
        for m, x in zip(values["staleness/mean"], values["staleness/max"], strict=True)
    )
    assert values["weights/policy_version"] == [1.0, 2.0, 3.0]
    assert all(math.isfinite(v) for v in values["train/loss"])
    assert all(v > 0 for v in values["train/entropy"])
    # A version reaches inference after the update that made it, so whether iteration 1
    # already has a sync time depends on the lanes' timing; later ones always do.
    sync = got["weights/sync_round_s"]
    assert [s for s, _ in sync][-2:] == [2, 3]
    for step, seconds in sync:
        assert 0.0 < seconds < 60.0
        assert rows[step - 1]["weight_sync_s"] == pytest.approx(seconds, rel=1e-5)


def test_sync_mode_has_no_queues_but_everything_else(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    rows = _run(run_dir, "--set", "pipeline.mode=sync")
    got = _read(run_dir / "tensorboard")
    assert not any(tag.startswith("queues/") for tag in got)
    assert all(r["queues"] == {} for r in rows)
    # Sync mode applies each version after the update that made it, before the next.
    assert [s for s, _ in got["weights/sync_round_s"]] == [2, 3]
    assert [s for s, _ in got["rollout/success_rate"]] == [1, 2, 3]


def test_false_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run(run_dir, "--set", "run.tensorboard=false")
    assert not (run_dir / "tensorboard").exists()


# ------------------------------------------------------------------ without the package
def test_auto_runs_without_the_package_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_tensorboard(monkeypatch)
    run_dir = tmp_path / "run"
    _run(run_dir)  # run.tensorboard defaults to auto
    assert not (run_dir / "tensorboard").exists()
    events = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    off = [e for e in events if e["event"].startswith("tensorboard logging off")]
    assert len(off) == 1
    assert "pip install tensorboard" in off[0]["event"]
    assert "tensorboard" in off[0]["reason"]


def test_true_without_the_package_is_one_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _without_tensorboard(monkeypatch)
    run_dir = tmp_path / "run"
    code = main(["run", TOY, "--run-dir", str(run_dir), *TINY, "--set", "run.tensorboard=true"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "error: run.tensorboard: true needs the tensorboard package (pip install tensorboard)"
    ]
    # Refused before anything ran: no metrics, no event files.
    assert (run_dir / "metrics.jsonl").read_text() == ""
    assert not (run_dir / "tensorboard").exists()


def test_a_bad_setting_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", TOY, "--set", "run.tensorboard=sometimes"])
    assert code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and "run.tensorboard" in line


# ------------------------------------------------------------------ failures and mapping
class _FullDisk:
    """A writer whose disk fills up after ``ok`` scalars."""

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.written: list[tuple[str, float, int]] = []
        self.closed = 0

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        if len(self.written) >= self.ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written.append((tag, scalar_value, global_step))

    def close(self) -> None:
        self.closed += 1


def _row(iteration: int) -> dict[str, Any]:
    return {
        "iteration": iteration,
        "success_rate": 0.5,
        "env_steps_per_s": 100.0,
        "accounting": {"return_mean": 0.25, "produced": 10},
        "lanes": {"sample": {"busy_s": 1.0, "share": 0.25}},
        "queues": {"trajectory_groups": 3, "infer_requests": 0},
        "staleness_mean": 0.5,
        "staleness_max": 1.0,
        "weight_sync_s": None,
        "loss": 0.125,
        "entropy": float("nan"),
        "staleness_hist": {"0": 1},
        "version": 4.0,
    }


def test_a_write_failure_turns_tensorboard_off_without_stopping_anything(tmp_path: Path) -> None:
    writer = _FullDisk(ok=12)
    tb = TensorBoardLog(writer, tmp_path)
    with structlog.testing.capture_logs() as logged:
        tb.write(_row(1))  # 10 scalars: fits
        tb.write(_row(2))  # the disk fills up in the middle: logged, not raised
        tb.write(_row(3))  # off: nothing more is tried
        tb.close()
    assert tb.rows == 1 and not tb.active
    assert {step for _, _, step in writer.written} == {1, 2}
    assert writer.closed == 1
    warnings = [e for e in logged if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "tensorboard logging off" in warnings[0]["event"]
    assert "No space left on device" in warnings[0]["error"]


def test_scalars_of_a_row() -> None:
    got = scalars(_row(7))
    assert got == {
        "rollout/success_rate": 0.5,
        "rollout/return_mean": 0.25,
        "throughput/env_steps_per_s": 100.0,
        "lanes/sample_busy_share": 0.25,
        "queues/trajectory_groups": 3.0,
        "queues/infer_requests": 0.0,
        "staleness/mean": 0.5,
        "staleness/max": 1.0,
        "weights/policy_version": 4.0,
        "train/loss": 0.125,
    }  # no NaN entropy, no sync time yet, no nested dicts under train/


def test_accounting_keeps_a_rolling_mean_return_over_the_success_window() -> None:
    acc = Accounting(window=deque(maxlen=3))
    assert acc.return_mean() == 0.0
    for success, ret in [(True, 1.0), (False, 0.0), (True, 2.0), (True, 3.0)]:
        acc.record_episode(success, 5, ret)
    assert acc.returns.maxlen == 3
    assert acc.return_mean() == pytest.approx(5.0 / 3)  # the last three: 0, 2, 3
    acc.record_episode(False, 5)  # a caller that knows no return still counts the episode
    assert acc.produced == 5 and acc.env_steps == 25
    d = acc.as_dict()
    assert d["return_mean"] == pytest.approx(round(5.0 / 3, 4))
    for key in ("produced", "consumed", "dropped_stale", "discarded", "in_flight", "env_steps"):
        assert key in d
    assert d["success_rate"] == pytest.approx(round(2 / 3, 4))
