"""What a run reports at its end, and the process-level plumbing a coordinator needs.

Kept apart from :mod:`dvla.pipeline.coordinator` so that module stays about building and
running lanes: here are the summary record, the event-loop factory, the choice of which
error a failed lane task group reports, and the drain watchdog.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from dvla import logs
from dvla.errors import DvlaError, LaneError

log = logs.get(__name__)


@dataclass
class RunSummary:
    """What a finished run reports (also written to ``summary.json``)."""

    name: str
    mode: str
    run_dir: str
    stop_reason: str
    iterations: int
    policy_version: int
    env_steps: int
    wall_s: float
    env_steps_per_s: float
    success_rate: float
    eval: dict[str, Any] | None
    lanes: dict[str, dict[str, float]]
    accounting: dict[str, float]
    infer_mean_batch: float
    staleness: dict[str, int] = field(default_factory=dict)
    weight_sync: dict[str, Any] = field(default_factory=dict)
    #: Achieved inference batching (see InferLane.report).
    infer: dict[str, Any] = field(default_factory=dict)
    #: Rollout and training memory pools: sizes and high-water marks.
    memory: dict[str, Any] = field(default_factory=dict)
    #: The staleness gate's open groups, capacity and how often it held samplers back.
    staleness_gate: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        ev = f" eval_success={self.eval['success_rate']:.3f}" if self.eval else ""
        return (
            f"done: {self.name} ({self.mode}) stop={self.stop_reason} "
            f"iterations={self.iterations} env_steps={self.env_steps} "
            f"steps/s={self.env_steps_per_s:.0f} success={self.success_rate:.3f}{ev} "
            f"run_dir={self.run_dir}"
        )


_WATCHDOG: list[threading.Timer] = []


def arm_watchdog(seconds: float) -> None:
    """End the process if a requested stop has not finished within ``seconds``.

    Every step of a drain has its own timeout, so this fires only if something hangs
    beyond them; exit code 3 says the stop was not clean.
    """
    if _WATCHDOG:
        return

    def fire() -> None:
        log.error("stop did not finish within drain_timeout_s; exiting", seconds=seconds)
        with contextlib.suppress(Exception):
            logs.close()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    _WATCHDOG.append(timer)


def loop_factory() -> Any:
    """Uvloop's loop where it exists (it is what the lanes are tuned on)."""
    if sys.platform != "win32":
        import uvloop

        return uvloop.new_event_loop
    return None


def first_error(eg: BaseExceptionGroup) -> BaseException:
    """The error to report from a lane task group: a user-facing one if any."""
    flat: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            flat.append(e)

    walk(eg)
    for e in flat:
        if isinstance(e, DvlaError):
            return e
    first = flat[0]
    if isinstance(first, Exception):
        err = LaneError(f"a lane failed: {type(first).__name__}: {first}")
        err.__cause__ = first
        return err
    return first
