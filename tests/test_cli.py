from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dvla import registry
from dvla.cli import main
from dvla.daemons import coordinator_main, worker_main
from dvla.errors import ConfigError, PluginError
from dvla.testing.fakes import FakePolicy, FakeSimulator

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "configs" / "toy.yaml")


@pytest.fixture(autouse=True)
def _drop_dvla_log_handlers() -> Iterator[None]:
    """The CLI installs root log handlers bound to the captured stderr; remove them after."""
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dvla", False):
            root.removeHandler(h)
            h.close()


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `simulator: fake` and `model: fake` resolve to the test fakes."""
    real = registry.resolve

    def resolve(section: str, name: str) -> Any:
        if (section, name) == ("simulator", "fake"):
            return FakeSimulator
        if (section, name) == ("model", "fake"):
            return FakePolicy
        return real(section, name)

    monkeypatch.setattr(registry, "resolve", resolve)


def fake_pipeline(tmp_path: Path, *, mode: str = "sync", fail_on_step: int | None = None) -> Path:
    fail = f"  fail_on_step: {fail_on_step}\n" if fail_on_step is not None else ""
    text = f"""\
name: fakerun
seed: 1
run:
  max_iterations: 10
  max_wall_seconds: 60
  eval_episodes: 0
  progress_interval_s: 60
  log_level: error
pipeline:
  mode: {mode}
  num_envs: 2
  shards: 1
  groups_per_iteration: 1
  queue_groups: 2
  lane_timeout_s: 20
  infer:
    max_wait_ms: 0
simulator:
  name: fake
  episode_length: 3
{fail}model:
  name: fake
algorithm:
  name: grpo
  group_size: 2
optimizer:
  name: adamw
"""
    path = tmp_path / "fake.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------- plugins


def test_plugins_lists_builtins_with_their_package(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for group in registry.GROUPS.values():
        assert f"{group}:" in lines
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("  ")}
    assert rows["toy"][1] == "dvla"
    assert rows["toy"][2] == "0.1.0"
    assert "(dvla.backends.simulators.toy:ToySimulator)" in rows["toy"]
    assert rows["tiny-vla"][1] == rows["grpo"][1] == rows["adamw"][1] == "dvla"
    # toy is listed under the simulators group
    sims = lines.index("dvla.simulators:")
    models = lines.index("dvla.models:")
    assert any(line.split()[0] == "toy" for line in lines[sims + 1 : models])


def test_plugins_reports_a_duplicate_as_one_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken() -> Any:
        raise PluginError("dvla.simulators: backend name 'toy' is registered twice")

    monkeypatch.setattr(registry, "installed", broken)
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == ["error: dvla.simulators: backend name 'toy' is registered twice"]


# --------------------------------------------------------------------- validate


def test_validate_shipped_config_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", TOY]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{TOY}: ok (toy: simulator=toy model=tiny-vla")
    assert "mode=async" in out


def test_validate_applies_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", TOY, "--set", "pipeline.mode=sync"]) == 0
    assert "mode=sync" in capsys.readouterr().out


def test_malformed_file_exits_2_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrun: [1, 2\n", encoding="utf-8")
    assert main(["validate", str(bad)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {bad}:")
    assert "invalid YAML" in lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_schema_error_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = Path(TOY).read_text(encoding="utf-8").replace("max_staleness", "max_stalenes")
    path = tmp_path / "typo.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: {path}: pipeline.max_stalenes: unknown key"
    ]


def test_unknown_backend_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = Path(TOY).read_text(encoding="utf-8")
    text = text.replace("name: toy\n  image", "name: nope\n  image")
    path = tmp_path / "nope.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    from dvla import registry

    installed = ", ".join(sorted(registry.discover("dvla.simulators")))
    assert {"libero", "toy"} <= set(installed.split(", "))
    assert error_lines(err) == [
        f"error: dvla.simulators: no backend named 'nope' (installed: {installed})"
    ]
    assert "Traceback" not in err


def test_bad_set_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", TOY, "--set", "novalue"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty document"):
        main(["--debug", "validate", str(bad)])


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: dvla" in capsys.readouterr().err


# --------------------------------------------------------------------- run


def test_run_config_error_exits_2_without_creating_a_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    code = main(["run", TOY, "--run-dir", str(run_dir), "--set", "pipeline.num_envs=0"])
    assert code == 2
    assert len(error_lines(capsys.readouterr().err)) == 1
    assert not run_dir.exists()


@pytest.mark.usefixtures("fakes")
def test_run_with_fakes_writes_metrics_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    path = fake_pipeline(tmp_path)
    code = main(["run", str(path), "--run-dir", str(run_dir), "--set", "run.max_iterations=2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("done: fakerun (sync) stop=max_iterations iterations=2")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "max_iterations"
    assert summary["iterations"] == 2
    assert summary["env_steps"] == 12  # 2 iterations x 1 group x 2 episodes x 3 steps
    acc = summary["accounting"]
    assert acc["produced"] == acc["consumed"] + acc["dropped_stale"] + acc["discarded"]
    assert (run_dir / "config.yaml").exists()
    assert "run started" in (run_dir / "log.jsonl").read_text()


@pytest.mark.usefixtures("fakes")
def test_simulator_failure_exits_nonzero_and_keeps_what_was_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    # sync mode: each iteration is exactly 3 simulator steps, so step 7 fails in iteration 3
    path = fake_pipeline(tmp_path, fail_on_step=7)
    code = main(["run", str(path), "--run-dir", str(run_dir)])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err
    lines = error_lines(captured.err)
    assert len(lines) == 1
    assert lines[0].startswith("error: simulator 'fake' raised RuntimeError in step:")
    assert "fake simulator failure at step 7" in lines[0]
    assert captured.out == ""
    # what the run measured before the failure is still there
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[-1]["env_steps"] == 12
    events = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    names = [e.get("event") for e in events]
    assert "run started" in names
    failed = [e for e in events if e.get("event") == "run failed"]
    assert len(failed) == 1
    assert "simulator 'fake' raised RuntimeError" in failed[0]["error"]
    assert (run_dir / "config.yaml").exists()
    assert not (run_dir / "summary.json").exists()


@pytest.mark.usefixtures("fakes")
def test_simulator_failure_at_first_step_async(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    path = fake_pipeline(tmp_path, mode="async", fail_on_step=1)
    code = main(["run", str(path), "--run-dir", str(run_dir)])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err
    lines = error_lines(captured.err)
    assert len(lines) == 1
    assert "simulator 'fake' raised RuntimeError in step" in lines[0]
    assert (run_dir / "metrics.jsonl").exists()
    assert "run failed" in (run_dir / "log.jsonl").read_text()


@pytest.mark.usefixtures("fakes")
def test_diverging_loss_exits_nonzero_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    path = fake_pipeline(tmp_path)
    # NaN logits: rollouts still act (uniformly), the learner's loss is NaN. Groups of 8
    # one-step episodes that succeed when action[0] > 0 all but surely have signal.
    text = path.read_text(encoding="utf-8").replace(
        "model:\n  name: fake\n", "model:\n  name: fake\n  nan_logits: true\n"
    )
    path.write_text(text.replace("episode_length: 3", "episode_length: 1"), encoding="utf-8")
    sets = ["simulator.success_threshold=0", "algorithm.group_size=8", "pipeline.num_envs=8"]
    args = ["run", str(path), "--run-dir", str(run_dir)]
    for item in sets:
        args += ["--set", item]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 1, captured.out
    lines = error_lines(captured.err)
    assert len(lines) == 1
    assert lines[0].startswith("error: policy version 0 gave NaN or infinite action log-prob")
    assert "Traceback" not in captured.err
    assert (run_dir / "metrics.jsonl").read_text() == ""  # failed in the first update


@pytest.mark.usefixtures("fakes")
def test_coordinator_daemon_forwards_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    path = fake_pipeline(tmp_path)
    code = coordinator_main(
        ["--config", str(path), "--run-dir", str(run_dir), "--set", "run.max_iterations=1"]
    )
    assert code == 0
    assert "iterations=1" in capsys.readouterr().out
    assert (run_dir / "summary.json").exists()


# --------------------------------------------------------------------- worker


@pytest.mark.parametrize("bad", ["bad", "host:", ":123", "host:port"])
def test_worker_with_bad_coordinator_exits_2(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main(["--coordinator", bad]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [
        f"error: --coordinator {bad!r}: expected HOST:PORT, e.g. 10.0.0.1:7400"
    ]


def test_worker_without_a_secret_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DVLA_SECRET", raising=False)
    assert worker_main(["--coordinator", "localhost:7000", "--name", "w1"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == ["error: no shared secret: set DVLA_SECRET to the coordinator's secret"]


def test_worker_gives_up_on_a_missing_coordinator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVLA_SECRET", "some-secret-of-enough-length")
    code = worker_main(
        ["--coordinator", "127.0.0.1:9", "--give-up-s", "0.5", "--log-dir", str(tmp_path)]
    )
    assert code == 1
    lines = error_lines(capsys.readouterr().err)
    assert lines == ["error: no coordinator at tcp://127.0.0.1:9 for 0.5 s"]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--local-workers", "-1"], "--local-workers -1: must be 0 or more"),
        (["--listen", "nowhere"], "--listen 'nowhere': expected HOST:PORT"),
        (["--resume"], "--resume needs the run directory"),
    ],
)
def test_coordinator_daemon_bad_flags_exit_2(
    tmp_path: Path, flags: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = REPO / "configs" / "toy-processes.yaml"
    assert coordinator_main(["--config", str(path), *flags]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and words in lines[0], lines
