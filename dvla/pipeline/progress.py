"""Live progress of ``dvla run`` and ``dvla eval``: a bar on a terminal, log lines elsewhere.

On a terminal a single tqdm line shows how far the run is toward whichever budget stops
it first, with success rate, env steps/s and policy version (``dvla eval``: episodes
done and the running success rate). Anywhere else (a file, a pipe, CI, Slurm) the output
is what it always was: a ``progress`` log line every ``run.progress_interval_s`` and one
``episode`` line per evaluated episode, because a redrawn line is noise in a log file.

While a bar is shown, dvla's console log handler writes through ``tqdm.write``, which
clears the bar, prints the line and redraws the bar, so log lines from any thread land
above the bar instead of being cut into it; the JSON log in the run directory still gets
every ``progress`` line. The bar is closed, and the handler restored, on every way out:
normal end, an exception, or a signal that ends the run.

``DVLA_PROGRESS`` overrides the choice: ``bar`` forces the bar (e.g. under a terminal
multiplexer that reports no TTY), ``lines`` forces log lines, ``auto`` (default) picks a
bar when stderr is a terminal and the console log level is ``info`` or ``debug``: a run
asked to be quiet (``warning``, ``error``) stays quiet.

tqdm rather than rich: it has no dependencies, redraws one line in place, which works
on any terminal, over ssh and in tmux, and ``tqdm.write`` gives the clear-print-redraw step
that log lines need, whereas rich's live display takes over ``sys.stderr`` and would
fight structlog's own console renderer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Literal, Self, TextIO

from tqdm import tqdm

from dvla import logs
from dvla.config import RunConfig
from dvla.data import Trajectory

log = logs.get(__name__)
#: Progress lines that go to the JSON log only, while the bar shows the same figures.
file_log = logs.get(f"{logs.FILE_ONLY}.progress")

ENV = "DVLA_PROGRESS"
Mode = Literal["auto", "bar", "lines"]
_MODES: tuple[Mode, ...] = ("auto", "bar", "lines")
#: Seconds of history behind the env steps/s the bar shows: long enough to smooth the
#: bursts of a learner update, short enough to follow a change of speed.
RATE_WINDOW_S = 5.0


def resolve_mode(mode: Mode | None = None) -> Mode:
    """``mode`` if given, else ``$DVLA_PROGRESS``, else ``auto``; a bad value means auto."""
    if mode is not None:
        return mode
    raw = os.environ.get(ENV, "auto").strip().lower() or "auto"
    for known in _MODES:
        if raw == known:
            return known
    log.warning(f"{ENV}={raw!r} is not one of auto, bar, lines; using auto")
    return "auto"


def wants_bar(file: TextIO, log_level: str, mode: Mode | None = None) -> bool:
    """Whether progress on ``file`` should be a live bar rather than log lines."""
    chosen = resolve_mode(mode)
    if chosen != "auto":
        return chosen == "bar"
    try:
        tty = file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return tty and log_level in ("debug", "info")


class _Lock:
    """A thread-only write lock for the bar.

    tqdm's default lock also creates a multiprocessing lock, which fixes the process's
    default start method as a side effect; the bar is drawn from one process only.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Tqdm(tqdm):  # type: ignore[type-arg]
    """tqdm without its monitor thread (we refresh it ourselves) and with :class:`_Lock`."""

    monitor_interval = 0
    _lock = _Lock()


class _BarStream:
    """A stream for a log handler that prints above the bar instead of through it."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def write(self, text: str) -> int:
        _Tqdm.write(text, file=self.file, end="")
        return len(text)

    def flush(self) -> None:
        self.file.flush()


class _LiveBar:
    """A tqdm bar plus everything that must be undone when it goes: one ``close`` for all.

    Redirects dvla's console log handlers that write to the bar's stream, and, where
    SIGTERM would otherwise kill the process on the spot (its default action), turns it
    into ``SystemExit`` so ``finally`` blocks run and close the bar and the simulators.
    """

    def __init__(self, file: TextIO, total: int, bar_format: str) -> None:
        self.file = file
        self.bar = _Tqdm(total=total, file=file, bar_format=bar_format, leave=True, mininterval=0.1)
        # Re-read the width at every redraw (the terminal may be resized), and never
        # trust a width of 0 (a pseudo-terminal nobody sized, e.g. under `script`): tqdm
        # would trim the line to nothing.
        self.bar.dynamic_ncols = _screen_shape  # type: ignore[assignment]
        self.bar.ncols, self.bar.nrows = _screen_shape(file)
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []
        for h in logging.getLogger().handlers:
            if (
                getattr(h, "_dvla", False)
                and isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)
                and h.stream is file
            ):
                self._handlers.append((h, h.setStream(_BarStream(file))))
        self._sigterm: Any = None
        if threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    self._sigterm = signal.signal(signal.SIGTERM, _terminate)
            except (ValueError, OSError):  # no signals here (e.g. an embedded interpreter)
                self._sigterm = None

    def close(self) -> None:
        """Draw the final state, end the line and put the log handlers back; idempotent."""
        handlers, self._handlers = self._handlers, []
        try:
            self.bar.close()
        finally:
            for h, stream in handlers:
                h.setStream(stream)
            if self._sigterm is not None:
                previous, self._sigterm = self._sigterm, None
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(signal.SIGTERM, previous)


def _screen_shape(fp: Any) -> tuple[int | None, int | None]:
    """Columns and rows of the terminal behind ``fp``; None where unknown or zero."""
    try:
        size = os.get_terminal_size(fp.fileno())
    except (AttributeError, ValueError, OSError):
        return None, None
    return size.columns or None, size.lines or None


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class _Reporter:
    """Shared context-manager plumbing of the run and eval reporters."""

    _live: _LiveBar | None = None
    closed = False

    def close(self) -> None:
        """Close the bar if one is shown; idempotent, safe on every exit path."""
        self.closed = True
        live, self._live = self._live, None
        if live is not None:
            live.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def bar_text(self) -> str:
        """What the bar shows now ("" without a bar): for tests and debugging."""
        return str(self._live.bar) if self._live is not None else ""


@dataclass
class RunSnapshot:
    """The figures a progress report shows, as of one moment of a run."""

    wall_s: float
    iteration: int
    version: int
    env_steps: int
    success: float
    busy: dict[str, float] = field(default_factory=dict)


class RunProgress(_Reporter):
    """Progress of ``dvla run``: feed :meth:`update` a few times a second.

    Args:
        run: The run section: budgets, target, report interval and console log level.
        start_steps: Env steps already counted when this process started (a resumed
            run), so the first rate is not inflated by the restored total.
        file: Where the bar goes; default ``sys.stderr`` as of construction (where the
            console log handler writes).
        mode: ``auto``, ``bar`` or ``lines``; default ``$DVLA_PROGRESS`` or ``auto``.
    """

    def __init__(
        self,
        run: RunConfig,
        *,
        start_steps: int = 0,
        file: TextIO | None = None,
        mode: Mode | None = None,
    ) -> None:
        self.run = run
        self.file = file if file is not None else sys.stderr
        self.bar = wants_bar(self.file, run.log_level, mode)
        self._last = (0.0, start_steps)
        self._next_report = run.progress_interval_s
        self._rate: deque[tuple[float, int]] = deque()
        #: ``progress`` lines written (to the console, or under a bar to the JSON log).
        self.reports = 0

    def fraction(self, snap: RunSnapshot) -> float:
        """How far the run is toward the budget that will stop it first, in [0, 1]."""
        run = self.run
        parts = [snap.iteration / run.max_iterations, snap.wall_s / run.max_wall_seconds]
        if run.max_env_steps is not None:
            parts.append(snap.env_steps / run.max_env_steps)
        return min(max(parts), 1.0)

    def text(self, snap: RunSnapshot, steps_per_s: float) -> str:
        """The bar's text: both budgets, success (and the target), speed, version."""
        run = self.run
        parts = [
            f"iter {snap.iteration}/{run.max_iterations}",
            f"{_clock(snap.wall_s)}/{_clock(run.max_wall_seconds)}",
        ]
        if run.max_env_steps is not None:
            parts.append(f"steps {snap.env_steps}/{run.max_env_steps}")
        target = f"/{run.target_success:g}" if run.target_success is not None else ""
        parts += [
            f"success {snap.success:.3f}{target}",
            f"{steps_per_s:.0f} steps/s",
            f"v{snap.version}",
        ]
        return "  ".join(parts)

    def update(self, snap: RunSnapshot) -> None:
        """Redraw the bar, and write the ``progress`` line when its interval is due."""
        if self.closed:
            return
        if snap.wall_s >= self._next_report:
            self._report(snap)
        if not self.bar:
            return
        if self._live is None:
            self._live = _LiveBar(self.file, 1000, "train {percentage:3.0f}%|{bar}| {desc}")
        self._draw(snap)

    def _draw(self, snap: RunSnapshot) -> None:
        assert self._live is not None
        self._rate.append((snap.wall_s, snap.env_steps))
        while len(self._rate) > 2 and snap.wall_s - self._rate[0][0] > RATE_WINDOW_S:
            self._rate.popleft()
        t0, s0 = self._rate[0]
        rate = (snap.env_steps - s0) / (snap.wall_s - t0) if snap.wall_s > t0 else 0.0
        bar = self._live.bar
        bar.set_description_str(self.text(snap, rate), refresh=False)
        bar.n = round(self.fraction(snap) * 1000)
        bar.refresh()

    def _report(self, snap: RunSnapshot) -> None:
        last_t, last_steps = self._last
        dt = max(snap.wall_s - last_t, 1e-9)
        # The same line, with the same figures, whether it reaches the console or (under
        # a bar) the JSON log only.
        (file_log if self.bar else log).info(
            "progress",
            iteration=snap.iteration,
            version=snap.version,
            steps_per_s=round((snap.env_steps - last_steps) / dt),
            success=round(snap.success, 3),
            busy=snap.busy,
        )
        self.reports += 1
        self._last = (snap.wall_s, snap.env_steps)
        self._next_report = snap.wall_s + self.run.progress_interval_s

    def finish(self, snap: RunSnapshot) -> None:
        """Draw ``snap`` as the bar's final state (no extra log line), then close."""
        try:
            if self._live is not None:
                self._draw(snap)
        finally:
            self.close()


class EvalProgress(_Reporter):
    """Progress of an evaluation: call :meth:`on_episode` with each finished episode.

    Args:
        episodes: How many episodes the evaluation runs.
        label: The bar's first word, e.g. ``eval`` or ``final eval``.
        log_level: The console log level (``auto`` shows no bar when it is above info).
        log_lines: Without a bar, log one ``episode`` line per episode (``dvla eval``); a
            run's final evaluation never did, and keeps quiet.
        file: Where the bar goes; default ``sys.stderr`` as of construction.
        mode: ``auto``, ``bar`` or ``lines``; default ``$DVLA_PROGRESS`` or ``auto``.
    """

    def __init__(
        self,
        episodes: int,
        *,
        label: str = "eval",
        log_level: str = "info",
        log_lines: bool = True,
        file: TextIO | None = None,
        mode: Mode | None = None,
    ) -> None:
        self.episodes = episodes
        self.label = label
        self.log_lines = log_lines
        self.file = file if file is not None else sys.stderr
        self.bar = wants_bar(self.file, log_level, mode)
        self.done = 0
        self.successes = 0

    @property
    def success_rate(self) -> float:
        return self.successes / self.done if self.done else 0.0

    def on_episode(self, traj: Trajectory) -> None:
        """Count one finished episode and show it (bar, or an ``episode`` log line)."""
        if self.closed:
            return
        self.done += 1
        self.successes += int(traj.success)
        fields: dict[str, Any] = {
            "done": f"{self.done}/{self.episodes}",
            "episode": traj.group_id,
            "task": traj.task_id,
            "success": traj.success,
            "steps": traj.length,
        }
        if self.log_lines:
            # Under a bar the line still reaches the JSON log, where there is one.
            (file_log if self.bar else log).info("episode", **fields)
        if not self.bar:
            return
        if self._live is None:
            label = self.label.replace("{", "{{").replace("}", "}}")
            self._live = _LiveBar(
                self.file,
                self.episodes,
                label + " {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} episodes  {desc}"
                "  [{elapsed}<{remaining}]",
            )
        bar = self._live.bar
        bar.set_description_str(f"success {self.success_rate:.3f}", refresh=False)
        bar.update(1)


def _clock(seconds: float) -> str:
    """Seconds as m:ss or h:mm:ss, the way tqdm shows elapsed time."""
    s = int(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
