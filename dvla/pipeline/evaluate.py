"""Greedy evaluation of a policy on a fixed, reproducible set of episodes.

Two callers: the coordinator scores the policy it just trained (:func:`evaluate`), and
``dvla eval`` scores saved weights (:func:`run_eval`): a run's ``policy.pt``, a policy
export (``dvla export``, a run's ``policy/``), a training checkpoint or a run directory.
Both run the same episodes for the same count and seed, so a number from one can be
checked against the other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvla import logs, registry
from dvla.backends.base import Policy, Simulator
from dvla.cluster.checkpoint import FORMAT, CheckpointError, CheckpointStore, load_error_line
from dvla.config import PipelineFile
from dvla.data import ActionBatch, Trajectory
from dvla.errors import ConfigError
from dvla.pipeline.policy import (
    WEIGHTS_FILE,
    build_policy,
    is_export,
    load_weights,
    read_export,
)
from dvla.pipeline.sample import EnvShard, EpisodeSource, start_simulator

log = logs.get(__name__)

#: Evaluation simulators are seeded apart from the training ones (the coordinator's final
#: evaluation uses the same offset), so ``dvla eval`` of a run's policy repeats that score.
EVAL_SEED_OFFSET = 10_000
#: Widest instruction shown in the table; LIBERO's run to 100+ characters.
INSTRUCTION_WIDTH = 60


class _FixedEpisodes(EpisodeSource):
    """Episode k runs task k mod tasks, initial state (k div tasks) mod its count.

    Each episode is its own group, so a finished trajectory's ``group_id`` is k.
    """

    def __init__(self, num_init: list[int], episodes: int) -> None:
        super().__init__(num_init, 1, 0, limited=True)
        self._k = 0
        self._n = episodes

    def take(self, n: int) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        tasks = len(self._num_init)
        while len(out) < n and self._k < self._n:
            task = self._k % tasks
            init = (self._k // tasks) % self._num_init[task]
            out.append((self._k, task, init))
            self._k += 1
        return out


def evaluate(
    policy: Policy,
    sim: Simulator,
    sim_name: str,
    episodes: int,
    *,
    on_episode: Callable[[Trajectory], None] | None = None,
) -> dict[str, Any]:
    """Run ``episodes`` greedy episodes; blocking.

    Args:
        policy: The policy to score; put in eval mode.
        sim: Simulator whose ``num_envs`` environments run the episodes in parallel.
        sim_name: Backend name, for error messages.
        episodes: How many; episode k runs task k mod T (see :class:`_FixedEpisodes`).
        on_episode: Called with each finished trajectory (its ``group_id`` is the episode
            index k), e.g. to write a video or log progress. Whole trajectories rather
            than frames per step, because a trajectory already holds every frame.

    Returns:
        ``success_rate``, ``episodes``, the mean episode length, ``episodes_broken``
        (episodes rerun because an environment died) and ``per_task``:
        task id -> ``instruction``, ``episodes``, ``successes``, ``success_rate``, for
        every task that ran at least one episode, in task order.
    """
    spec = sim.spec
    source = _FixedEpisodes([t.num_init_states for t in spec.tasks], episodes)
    shard = EnvShard("eval", sim, sim_name, source)
    shard.refill()
    successes: list[bool] = []
    lengths: list[int] = []
    runs = np.zeros(len(spec.tasks), np.int64)
    wins = np.zeros(len(spec.tasks), np.int64)
    policy.eval()
    while shard.has_active:
        assert shard.obs is not None
        with torch.no_grad():
            actions, tokens, logp = policy.act(policy.prepare(shard.obs), deterministic=True)
        finished, _ = shard.advance(ActionBatch(actions.astype(np.float32), tokens, logp, 0))
        for t in finished:
            successes.append(t.success)
            lengths.append(t.length)
            runs[t.task_id] += 1
            wins[t.task_id] += int(t.success)
            if on_episode is not None:
                on_episode(t)
    per_task = {
        task: {
            "instruction": spec.tasks[task].instruction,
            "episodes": int(runs[task]),
            "successes": int(wins[task]),
            "success_rate": float(wins[task] / runs[task]),
        }
        for task in range(len(spec.tasks))
        if runs[task]
    }
    return {
        "success_rate": float(np.mean(successes)) if successes else 0.0,
        "episodes": len(successes),
        "mean_length": float(np.mean(lengths)) if lengths else 0.0,
        "episodes_broken": shard.broken,
        "per_task": per_task,
    }


# --------------------------------------------------------------------------- dvla eval
def read_weights(path: Path) -> tuple[Path, Mapping[str, torch.Tensor]]:
    """The policy weights saved at ``path``, and the file they came from.

    ``path`` may be a state-dict file (a run's ``policy.pt``), a training checkpoint
    (``ckpt-NNNNNNNNN.pt``, recognised by its format tag and validated, digest included,
    by :class:`CheckpointStore`) or a run directory, which stands for its ``policy.pt``.
    Everything is read weights-only: a checkpoint may come from anywhere.

    Raises:
        ConfigError: nothing there, unreadable, or neither kind of file.
    """
    if is_export(path):
        return path / WEIGHTS_FILE, read_export(path)[1]
    if path.is_dir():
        if not (path / "policy.pt").is_file():
            raise ConfigError(
                f"--checkpoint {path}: directory has no policy.pt (expected a run directory, "
                "a policy export, a policy.pt or a ckpt-*.pt file)"
            )
        path = path / "policy.pt"
    elif not path.exists():
        raise ConfigError(f"--checkpoint {path}: no such file or directory")
    try:
        # mmap: telling the two kinds apart must not read a multi-gigabyte file twice.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError as err:
        raise ConfigError(f"--checkpoint {path}: cannot read it ({err.strerror or err})") from None
    except Exception as err:
        why = load_error_line(err)
        raise ConfigError(
            f"--checkpoint {path}: not a policy state dict or dvla checkpoint ({why})"
        ) from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        try:
            state = CheckpointStore(path.parent, 1).load(path)
        except CheckpointError as err:
            raise ConfigError(f"--checkpoint {err}") from None
        return path, state.model
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ConfigError(
            f"--checkpoint {path}: not a policy state dict or dvla checkpoint "
            f"(holds a {type(obj).__name__}, not names -> tensors)"
        )
    return path, obj


def run_eval(
    cfg: PipelineFile,
    source: str,
    checkpoint: Path,
    episodes: int,
    envs: int,
    on_episode: Callable[[Trajectory], None] | None = None,
) -> dict[str, Any]:
    """Score the weights at ``checkpoint`` on ``cfg``'s simulator: ``dvla eval``'s work.

    The weights are read before any environment starts, so a wrong path fails in a
    second rather than after LIBERO's start-up; the model is built exactly as a run
    builds it, so any file the run wrote loads.

    Returns:
        :func:`evaluate`'s result plus ``checkpoint`` (the file read), ``simulator`` and
        ``suite`` (the simulator's ``suite`` option, or None).

    Raises:
        ConfigError: bad counts or weights that do not fit the configured model.
        SimulatorError: the simulator failed to start or raised.
    """
    if episodes < 1:
        raise ConfigError(f"--episodes must be at least 1, got {episodes}")
    if envs < 1:
        raise ConfigError(f"--envs must be at least 1, got {envs}")
    path, state = read_weights(checkpoint)
    sim_cls, sim_opts = registry.build_options("simulator", cfg.simulator, source)
    spec = sim_cls.describe(sim_opts)
    policy: Policy | None = None
    if spec is not None:
        # Model files and weights are checked before any environment starts.
        policy = build_policy(cfg, spec, source)
        load_weights(policy, state, f"--checkpoint {path}", cfg.model.name)
    sim = start_simulator(sim_cls, sim_opts, cfg.simulator.name, envs, cfg.seed + EVAL_SEED_OFFSET)
    try:
        if policy is None:
            policy = build_policy(cfg, sim.spec, source)
            load_weights(policy, state, f"--checkpoint {path}", cfg.model.name)
        del state
        log.info(
            "evaluating",
            checkpoint=str(path),
            simulator=cfg.simulator.name,
            episodes=episodes,
            envs=envs,
        )
        result = evaluate(policy, sim, cfg.simulator.name, episodes, on_episode=on_episode)
    finally:
        sim.close()
    suite = getattr(sim_opts, "suite", None)
    return {
        "checkpoint": str(path),
        "simulator": cfg.simulator.name,
        "suite": None if suite is None else str(suite),
        **result,
    }


def format_table(result: Mapping[str, Any]) -> str:
    """:func:`run_eval`'s result as a table: one row per task, then the total."""
    w = INSTRUCTION_WIDTH
    lines = [f"{'task':>4}  {'instruction':<{w}}  {'episodes':>8}  {'successes':>9}  {'rate':>6}"]
    per_task: Mapping[int, Mapping[str, Any]] = result["per_task"]
    for task, row in per_task.items():
        lines.append(
            f"{task:>4}  {_clip(row['instruction'], w):<{w}}  {row['episodes']:>8}  "
            f"{row['successes']:>9}  {row['success_rate']:>6.1%}"
        )
    label = result["simulator"] + (f" {result['suite']}" if result.get("suite") else "")
    total = sum(int(row["successes"]) for row in per_task.values())
    lines.append(
        f"{'all':>4}  {_clip(label, w):<{w}}  {result['episodes']:>8}  {total:>9}  "
        f"{result['success_rate']:>6.1%}"
    )
    return "\n".join(lines) + "\n"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
