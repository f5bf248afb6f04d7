"""Taking a coordinator's training state for a checkpoint, and putting one back.

The state is captured on the event loop between two learner updates (copies of the model
and optimizer tensors, the RNG states, the counters), so it is consistent; writing it to
disk happens on a background thread, so a large model does not stall the lanes. A newer
save waits for the previous one: at most one write is in progress.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvla import __version__, logs
from dvla.cluster.checkpoint import (
    CheckpointStore,
    TrainingState,
    capture_rng,
    load_error_line,
    restore_rng,
    state_digest,
)
from dvla.errors import ConfigError
from dvla.pipeline.policy import load_weights

if TYPE_CHECKING:
    from dvla.pipeline.coordinator import Coordinator

log = logs.get(__name__)

#: Accounting counters carried across a restart.
COUNTERS = (
    "produced",
    "consumed",
    "dropped_stale",
    "discarded",
    "discarded_dead_worker",
    "episodes_lost",
    "episodes_broken",
    "env_steps",
    "episodes_success",
)


def capture(co: Coordinator) -> TrainingState:
    """A consistent copy of what the learner's next update depends on."""
    acc = co.accounting
    counters: dict[str, int | float] = {k: int(getattr(acc, k)) for k in COUNTERS}
    counters["in_flight"] = acc.in_flight()
    return TrainingState(
        iteration=co.learn.iteration,
        policy_version=co.learn.version,
        model={k: v.detach().clone() for k, v in co.policy.state_dict().items()},
        optimizer=copy.deepcopy(co.optimizer.state_dict()),
        rng=capture_rng(),
        counters=counters,
        cursor={"generation": co.generation()},
        meta={"name": co.cfg.name, "dvla": __version__, "created_unix": time.time()},
    )


def restore(co: Coordinator, state: TrainingState) -> str:
    """Put ``state`` back into a freshly built coordinator's learner; return its digest.

    Called before the weight publisher and inference replicas are made, so they start
    from the restored weights; the learn lane takes the iteration and version later.
    Trajectories that were in flight when the checkpoint was taken (queued, or waiting
    for the learner's batch) did not survive the restart: they are counted as discarded,
    so the accounting still balances.
    """
    where = f"--resume {co.resumed['path'] if co.resumed else '?'}"
    load_weights(co.policy, state.model, where, co.cfg.model.name)
    try:
        co.optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(
            f"{where}: optimizer state does not fit the configured "
            f"optimizer '{co.cfg.optimizer.name}': {load_error_line(err)}"
        ) from None
    restore_rng(state.rng)
    acc = co.accounting
    for key in COUNTERS:
        if key in state.counters:
            setattr(acc, key, int(state.counters[key]))
    acc.discarded += int(state.counters.get("in_flight", 0))
    return state_digest(co.policy.state_dict(), co.optimizer.state_dict())


class Checkpointer:
    """Periodic and final checkpoints of one run."""

    def __init__(self, store: CheckpointStore, every: int) -> None:
        self.store = store
        self.every = every
        self.last_path: Path | None = None
        self.last_iteration = -1
        self.written = 0
        self.failures = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def due(self, iteration: int) -> bool:
        return self.every > 0 and iteration % self.every == 0

    def save_async(self, state: TrainingState) -> None:
        """Write ``state`` on a background thread (after any write still in progress)."""
        self.wait(None)
        self._thread = threading.Thread(
            target=self._write, args=(state,), name="dvla-checkpoint", daemon=True
        )
        self._thread.start()

    def save(self, state: TrainingState, timeout: float | None) -> bool:
        """Write ``state`` and wait for it; False if it did not finish in ``timeout``."""
        self.save_async(state)
        return self.wait(timeout)

    def wait(self, timeout: float | None) -> bool:
        """Wait for the write in progress; False if it is still running after ``timeout``."""
        t = self._thread
        if t is None:
            return True
        t.join(timeout)
        if t.is_alive():
            return False
        self._thread = None
        return True

    def _write(self, state: TrainingState) -> None:
        t0 = time.perf_counter()
        try:
            path = self.store.save(state)
        except Exception as err:  # a full disk must not kill training; it is logged
            self.failures += 1
            log.error("checkpoint failed", iteration=state.iteration, error=str(err))
            return
        self.last_path, self.last_iteration = path, state.iteration
        self.written += 1
        log.info(
            "checkpoint written",
            path=str(path),
            iteration=state.iteration,
            seconds=round(time.perf_counter() - t0, 3),
        )

    def status(self) -> dict[str, Any]:
        return {
            "last_iteration": self.last_iteration,
            "path": str(self.last_path) if self.last_path else None,
            "written": self.written,
            "failures": self.failures,
            "every_iterations": self.every,
        }
