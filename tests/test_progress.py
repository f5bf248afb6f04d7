"""Progress of ``dvla run`` and ``dvla eval``: a bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import io
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from dvla import logs
from dvla.cli import main
from dvla.config import RunConfig
from dvla.errors import TrainingError
from dvla.pipeline import learn
from dvla.pipeline.progress import EvalProgress, RunProgress, RunSnapshot, wants_bar
from dvla.testing.fakes import make_trajectory

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy.yaml")
TINY = [
    "--set", "run.max_iterations=3",
    "--set", "run.target_success=null",
    "--set", "run.eval_episodes=0",
    "--set", "run.max_wall_seconds=120",
    "--set", "run.progress_interval_s=0.2",
    "--set", "run.tensorboard=false",
    "--set", "pipeline.num_envs=16",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No inherited DVLA_PROGRESS; dvla's root log handlers removed after each test."""
    monkeypatch.delenv("DVLA_PROGRESS", raising=False)
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dvla", False):
            root.removeHandler(h)
            h.close()


class _Terminal(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _snap(wall: float, iteration: int, steps: int, success: float = 0.5) -> RunSnapshot:
    return RunSnapshot(
        wall_s=wall,
        iteration=iteration,
        version=iteration,
        env_steps=steps,
        success=success,
        busy={"sample": 0.25},
    )


def _dvla_console(stream: io.StringIO) -> logging.StreamHandler[Any]:
    """A console handler like logs.configure's, on ``stream``."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._dvla = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    return handler


# ------------------------------------------------------------------ choosing
def test_the_bar_is_for_terminals_at_info_or_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    assert wants_bar(_Terminal(), "info")
    assert wants_bar(_Terminal(), "debug")
    assert not wants_bar(_Terminal(), "warning")  # a run asked to be quiet stays quiet
    assert not wants_bar(io.StringIO(), "info")  # a pipe or a file: log lines
    monkeypatch.setenv("DVLA_PROGRESS", "lines")
    assert not wants_bar(_Terminal(), "info")
    monkeypatch.setenv("DVLA_PROGRESS", "bar")
    assert wants_bar(io.StringIO(), "error")
    monkeypatch.setenv("DVLA_PROGRESS", "sometimes")  # unknown: auto, with a warning
    with structlog.testing.capture_logs() as logged:
        assert not wants_bar(io.StringIO(), "info")
    assert "DVLA_PROGRESS='sometimes'" in logged[0]["event"]


# ------------------------------------------------------------------ dvla run
def test_not_a_terminal_keeps_the_progress_lines() -> None:
    out = io.StringIO()
    run = RunConfig(max_iterations=10, progress_interval_s=2.0)
    with structlog.testing.capture_logs() as logged, RunProgress(run, file=out) as progress:
        for tick in range(1, 51):  # 5 s of 0.1 s ticks, 100 env steps per tick
            progress.update(_snap(tick / 10, tick // 10, tick * 100))
    assert out.getvalue() == ""  # no bar drawn
    lines = [e for e in logged if e["event"] == "progress"]
    assert len(lines) == progress.reports == 2  # at 2 s and 4 s
    assert lines[0] == {
        "event": "progress",
        "log_level": "info",
        "iteration": 2,
        "version": 2,
        "steps_per_s": 1000,
        "success": 0.5,
        "busy": {"sample": 0.25},
    }
    assert lines[1]["iteration"] == 4 and lines[1]["steps_per_s"] == 1000


def test_a_resumed_run_does_not_count_restored_steps_as_speed() -> None:
    run = RunConfig(progress_interval_s=1.0)
    with structlog.testing.capture_logs() as logged:
        progress = RunProgress(run, start_steps=1_000_000, file=io.StringIO())
        progress.update(_snap(1.0, 0, 1_000_500))
    assert [e["steps_per_s"] for e in logged] == [500]


def test_a_terminal_gets_a_bar_with_both_budgets() -> None:
    term = _Terminal()
    run = RunConfig(max_iterations=10, max_wall_seconds=100, target_success=0.9)
    with structlog.testing.capture_logs() as logged:
        progress = RunProgress(run, file=term)
        for tick in range(1, 31):
            progress.update(_snap(tick / 10, tick // 10, tick * 100, success=0.25))
        text = progress.bar_text
        progress.finish(_snap(3.0, 3, 3000, success=0.25))
    assert progress.bar
    assert "iter 3/10" in text and "0:03/1:40" in text
    assert "success 0.250/0.9" in text and "1000 steps/s" in text and "v3" in text
    assert "30%" in text  # iterations are closer to their budget than wall time
    drawn = term.getvalue()
    assert drawn.endswith("iter 3/10  0:03/1:40  success 0.250/0.9  1000 steps/s  v3\n")
    # The progress line still goes out, to the JSON log only (structlog's capture shows
    # the event; the file-only logger is what keeps it off the console).
    assert [e["iteration"] for e in logged if e["event"] == "progress"] == [2]


def test_the_wall_clock_moves_the_bar_when_it_stops_the_run_first() -> None:
    run = RunConfig(max_iterations=100_000, max_wall_seconds=10)
    progress = RunProgress(run, file=io.StringIO(), mode="bar")
    assert progress.fraction(_snap(5.0, 7, 0)) == pytest.approx(0.5)
    progress.update(_snap(5.0, 7, 0))
    assert " 50%|" in progress.bar_text and "iter 7/100000" in progress.bar_text
    progress.close()


def test_log_lines_print_above_the_bar_and_the_bar_is_closed_after_an_exception() -> None:
    term = _Terminal()
    console = _dvla_console(term)
    run = RunConfig(max_iterations=10)
    progress = RunProgress(run, file=term)
    with pytest.raises(RuntimeError, match="lane failed"), progress:
        progress.update(_snap(0.5, 1, 100))
        assert console.stream is not term  # redirected while the bar shows
        logging.getLogger("dvla.test").warning("checkpoint written")
        raise RuntimeError("lane failed")
    assert progress.closed
    assert console.stream is term  # put back
    drawn = term.getvalue()
    assert drawn.endswith("\n")  # the bar's line is ended: the next output starts clean
    # The log line cleared the bar, printed on a line of its own, and the bar came back.
    before, line, after = drawn.partition("checkpoint written\n")
    assert line
    assert before.endswith("\r") and "iter 1/10" in before
    assert "iter 1/10" in after
    progress.update(_snap(1.0, 2, 200))  # after close: ignored, nothing drawn
    assert term.getvalue() == drawn
    logging.getLogger().removeHandler(console)


def test_sigterm_closes_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_DFL)
    installed: dict[int, Any] = {}
    real_signal = signal.signal

    def fake_signal(sig: int, handler: Any) -> Any:
        # Record rather than install: pytest's own process must keep its handlers.
        if sig == signal.SIGTERM:
            previous = installed.get(sig, signal.SIG_DFL)
            installed[sig] = handler
            return previous
        return real_signal(sig, handler)

    monkeypatch.setattr(signal, "signal", fake_signal)
    term = _Terminal()
    progress = EvalProgress(4, file=term)
    with pytest.raises(SystemExit) as exited, progress:
        progress.on_episode(make_trajectory(1.0))
        handler = installed[signal.SIGTERM]
        assert callable(handler)
        handler(signal.SIGTERM, None)  # what the interpreter does on SIGTERM
    assert exited.value.code == 128 + signal.SIGTERM
    assert installed[signal.SIGTERM] == signal.SIG_DFL  # restored on close
    assert term.getvalue().endswith("\n")


def test_dvla_run_off_a_terminal_logs_progress_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert main(["run", TOY, "--run-dir", str(run_dir), *TINY]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "%|" not in err
    progress = [line for line in err.splitlines() if "] progress" in line]
    assert progress, err
    assert all("iteration=" in line and "steps_per_s=" in line for line in progress)


def test_dvla_run_on_a_forced_terminal_draws_the_bar_and_keeps_the_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVLA_PROGRESS", "bar")
    run_dir = tmp_path / "run"
    assert main(["run", TOY, "--run-dir", str(run_dir), *TINY]) == 0
    captured = capsys.readouterr()
    assert "train 100%|" in captured.err
    assert "iter 3/3" in captured.err and "success " in captured.err
    assert "] progress" not in captured.err  # the bar replaces the console lines ...
    events = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "progress" for e in events)  # ... not the JSON log's
    assert captured.out.startswith("done: toy")
    assert not any(type(h.stream).__name__ == "_BarStream" for h in _stream_handlers())


def test_dvla_run_failing_under_the_bar_closes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVLA_PROGRESS", "bar")
    real = learn.LearnLane._update
    calls = {"n": 0}

    def failing(self: learn.LearnLane, groups: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise TrainingError("the loss went NaN in update 2")
        return real(self, groups)

    monkeypatch.setattr(learn.LearnLane, "_update", failing)
    run_dir = tmp_path / "run"
    assert main(["run", TOY, "--run-dir", str(run_dir), *TINY]) == 1
    err = capsys.readouterr().err
    assert "train " in err and "iter 1/3" in err  # the bar was up
    assert "\nerror: the loss went NaN in update 2\n" in err  # on a line of its own
    assert not any(type(h.stream).__name__ == "_BarStream" for h in _stream_handlers())


def _stream_handlers() -> list[logging.StreamHandler[Any]]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]


# ------------------------------------------------------------------ dvla eval
def test_eval_progress_counts_episodes_on_a_bar() -> None:
    term = _Terminal()
    with structlog.testing.capture_logs() as logged, EvalProgress(4, file=term) as progress:
        for k, ret in enumerate([1.0, 0.0, 1.0]):
            progress.on_episode(make_trajectory(ret, group_id=k, task_id=k % 2))
        assert progress.done == 3 and progress.success_rate == pytest.approx(2 / 3)
        text = progress.bar_text
    assert "eval  75%|" in text and "3/4 episodes" in text and "success 0.667" in text
    assert term.getvalue().endswith("\n")
    # Each episode's line still goes to the JSON log (file-only under a bar).
    assert [e["done"] for e in logged if e["event"] == "episode"] == ["1/4", "2/4", "3/4"]


def test_eval_progress_off_a_terminal_logs_one_line_per_episode() -> None:
    out = io.StringIO()
    with structlog.testing.capture_logs() as logged, EvalProgress(2, file=out) as progress:
        progress.on_episode(make_trajectory(1.0, group_id=0, task_id=0, length=3))
        progress.on_episode(make_trajectory(0.0, group_id=1, task_id=1, length=5))
    assert out.getvalue() == ""
    assert logged == [
        {
            "event": "episode",
            "log_level": "info",
            "done": "1/2",
            "episode": 0,
            "task": 0,
            "success": True,
            "steps": 3,
        },
        {
            "event": "episode",
            "log_level": "info",
            "done": "2/2",
            "episode": 1,
            "task": 1,
            "success": False,
            "steps": 5,
        },
    ]
    assert progress.done == 2 and progress.success_rate == 0.5


@pytest.mark.parametrize("file", [io.StringIO, _Terminal])
def test_a_final_evaluation_logs_no_episode_lines(file: type[io.StringIO]) -> None:
    out = file()
    with structlog.testing.capture_logs() as logged:
        progress = EvalProgress(2, label="final eval", log_lines=False, file=out)
        progress.on_episode(make_trajectory(1.0))
        progress.close()
    assert logged == [] and progress.done == 1
    assert ("final eval  50%|" in out.getvalue()) == progress.bar


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("progress") / "run"
    quiet = ["--set", "run.max_iterations=1", "--set", "run.log_level=error"]
    code = main(["run", TOY, "--run-dir", str(run_dir), *TINY, *quiet])
    for h in list(logging.getLogger().handlers):
        if getattr(h, "_dvla", False):
            logging.getLogger().removeHandler(h)
    assert code == 0
    return run_dir / "policy.pt"


def test_dvla_eval_counts_episodes(
    policy_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["eval", TOY, "--checkpoint", str(policy_path), "--episodes", "7"]
    args += ["--set", "pipeline.num_envs=4"]
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    done = [line.split("done=")[1].split()[0] for line in err.splitlines() if "] episode" in line]
    assert done == [f"{k}/7" for k in range(1, 8)]

    monkeypatch.setenv("DVLA_PROGRESS", "bar")
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "eval 100%|" in captured.err and "7/7 episodes" in captured.err
    assert "] episode" not in captured.err  # the bar replaces the per-episode lines
    assert captured.out.splitlines()[-1].split()[:3] == ["all", "toy", "7"]


def test_under_a_bar_progress_lines_reach_the_json_log_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    console = io.StringIO()
    json_log = tmp_path / "log.jsonl"
    monkeypatch.setattr(sys, "stderr", console)
    logs.configure("info", json_log)
    progress = RunProgress(RunConfig(progress_interval_s=1.0), file=console, mode="bar")
    progress.update(_snap(1.0, 1, 100))
    progress.close()
    logs.close()
    assert "] progress" not in console.getvalue() and "iter 1/" in console.getvalue()
    events = [json.loads(x) for x in json_log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["progress"]
