"""TensorBoard scalars per learner iteration, when the ``tensorboard`` package is there.

TensorBoard is an optional extra (``pip install 'dvla[tensorboard]'``): ``metrics.jsonl``
already holds every figure, and the writer pulls in protobuf and grpc, which a cluster
image should not need just to train. ``run.tensorboard`` chooses: ``auto`` writes when
the package imports, ``true`` makes its absence an error before the run starts, ``false``
never writes.

The writer is fed the same row the coordinator appends to ``metrics.jsonl``, so the two
never disagree, and is best-effort: a failure to write (disk full, directory removed)
is logged once and turns TensorBoard off for the rest of the run; it never stops
training.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from dvla import logs
from dvla.errors import ConfigError

log = logs.get(__name__)

#: Subdirectory of the run directory that holds the event files.
SUBDIR = "tensorboard"
#: The event file is flushed at most this often (and once more on close): often enough
#: that a TensorBoard watching a live run is seconds behind, rarely enough that a run
#: with many short iterations does not write to disk after every one.
FLUSH_SECS = 5
#: Events buffered before a write blocks. Large, so that a slow disk stalls the
#: background writer thread rather than the event loop that calls ``add_scalar``.
MAX_QUEUE = 1000
#: Algorithm metrics that are bookkeeping rather than training signal, and the staleness
#: figures, which get their own ``staleness/`` tags.
_NOT_TRAIN = frozenset(
    {
        "iteration",
        "wall_s",
        "env_steps",
        "env_steps_per_s",
        "success_rate",
        "infer_mean_batch",
        "weight_sync_s",
        "staleness_mean",
        "staleness_max",
        "on_policy_share",
        "groups_dropped_stale",
        "version",
    }
)
#: The one-line error for ``run.tensorboard: true`` without the package.
MISSING = "run.tensorboard: true needs the tensorboard package (pip install tensorboard)"


Setting = Literal["auto"] | bool


class _Writer(Protocol):
    """The part of ``torch.utils.tensorboard.SummaryWriter`` used here (it is untyped)."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None: ...
    def close(self) -> None: ...


def missing_reason() -> str | None:
    """Why TensorBoard cannot be written here, or None when it can.

    Imports afresh each call (cheap once imported) so that a test, or a program that
    installs the package mid-session, sees the current state.
    """
    try:
        importlib.import_module("tensorboard")
        importlib.import_module("torch.utils.tensorboard")
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def check(setting: Setting) -> None:
    """Fail before the run starts when ``run.tensorboard: true`` cannot be honoured.

    Raises:
        ConfigError: ``setting`` is true and the tensorboard package does not import.
    """
    if setting is True and missing_reason() is not None:
        raise ConfigError(MISSING)


class TensorBoardLog:
    """Writes one set of scalars per iteration to ``<run dir>/tensorboard/``.

    Tags: ``rollout/`` (success rate, mean return over the same rolling window),
    ``throughput/``, ``lanes/<lane>_busy_share``, ``queues/`` (trajectory groups waiting
    for the learner, observation requests waiting for a forward), ``staleness/``,
    ``weights/sync_round_s`` (latest time for a version to reach inference) and
    ``train/<metric>`` for every numeric figure the algorithm reports.
    """

    def __init__(self, writer: _Writer, directory: Path) -> None:
        self._writer: _Writer | None = writer
        self.directory = directory
        self.rows = 0

    @classmethod
    def open(cls, setting: Setting, run_root: Path) -> TensorBoardLog | None:
        """The writer ``setting`` asks for, or None (off, unavailable, or failed to open).

        Raises:
            ConfigError: ``setting`` is true and the package is missing.
        """
        if setting is False:
            return None
        why = missing_reason()
        if why is not None:
            if setting is True:
                raise ConfigError(MISSING)
            log.debug(
                "tensorboard logging off: the tensorboard package does not import "
                "(pip install tensorboard, or the [tensorboard] extra)",
                reason=why,
            )
            return None
        from torch.utils.tensorboard import SummaryWriter

        directory = run_root / SUBDIR
        try:
            writer = cast(
                _Writer,
                SummaryWriter(str(directory), max_queue=MAX_QUEUE, flush_secs=FLUSH_SECS),
            )
        except Exception as err:  # an unwritable run directory must not stop training
            log.warning("tensorboard logging off: cannot open the event file", error=_line(err))
            return None
        log.debug("tensorboard logging", dir=str(directory))
        return cls(writer, directory)

    @property
    def active(self) -> bool:
        """False once closed or turned off by a write failure."""
        return self._writer is not None

    def write(self, row: Mapping[str, Any]) -> None:
        """Write the scalars of one ``metrics.jsonl`` row at step ``row["iteration"]``."""
        writer = self._writer
        if writer is None:
            return
        step = int(row["iteration"])
        try:
            for tag, value in scalars(row).items():
                writer.add_scalar(tag, value, step)
        except Exception as err:
            self._fail("write", err)
            return
        self.rows += 1

    def close(self) -> None:
        """Flush what is buffered and close the event file; idempotent."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as err:
            log.warning("tensorboard event file could not be closed", error=_line(err))

    def _fail(self, what: str, err: BaseException) -> None:
        log.warning(
            f"tensorboard logging off for the rest of the run: {what} failed",
            error=_line(err),
            dir=str(self.directory),
        )
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # already failing: the first error is the one reported
                log.debug("tensorboard close after a failure also failed", exc_info=True)


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard tag -> value for one ``metrics.jsonl`` row; missing figures are left out.

    A pure function of the row so that what TensorBoard shows is exactly what the JSON
    lines say, and so it can be tested without writing event files.
    """
    out: dict[str, float] = {}

    def put(tag: str, value: Any) -> None:
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(value):
            out[tag] = float(value)

    acc: Mapping[str, Any] = row.get("accounting") or {}
    put("rollout/success_rate", row.get("success_rate"))
    put("rollout/return_mean", acc.get("return_mean"))
    put("rollout/env_steps", row.get("env_steps"))
    put("throughput/env_steps_per_s", row.get("env_steps_per_s"))
    put("throughput/infer_mean_batch", row.get("infer_mean_batch"))
    lanes: Mapping[str, Mapping[str, Any]] = row.get("lanes") or {}
    for lane, figures in lanes.items():
        put(f"lanes/{lane}_busy_share", figures.get("share"))
    queues: Mapping[str, Any] = row.get("queues") or {}
    for name, depth in queues.items():
        put(f"queues/{name}", depth)
    put("staleness/mean", row.get("staleness_mean"))
    put("staleness/max", row.get("staleness_max"))
    put("staleness/on_policy_share", row.get("on_policy_share"))
    put("staleness/groups_dropped", row.get("groups_dropped_stale"))
    put("weights/sync_round_s", row.get("weight_sync_s"))
    put("weights/policy_version", row.get("version"))
    for key, value in row.items():
        if key not in _NOT_TRAIN and not isinstance(value, Mapping):
            put(f"train/{key}", value)
    return out


def _line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]
