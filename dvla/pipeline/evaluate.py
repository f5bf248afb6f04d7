"""Greedy evaluation of a policy on a fixed, reproducible set of episodes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dvla.backends.base import Policy, Simulator
from dvla.data import ActionBatch
from dvla.pipeline.sample import EnvShard, EpisodeSource


class _FixedEpisodes(EpisodeSource):
    """Episode k runs task k mod tasks, initial state (k div tasks) mod its count."""

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


def evaluate(policy: Policy, sim: Simulator, sim_name: str, episodes: int) -> dict[str, Any]:
    """Run ``episodes`` greedy episodes; blocking.

    Returns:
        ``success_rate``, ``episodes`` and the mean episode length.
    """
    spec = sim.spec
    source = _FixedEpisodes([t.num_init_states for t in spec.tasks], episodes)
    shard = EnvShard("eval", sim, sim_name, source)
    shard.refill()
    successes, lengths = [], []
    policy.eval()
    while shard.has_active:
        assert shard.obs is not None
        with torch.no_grad():
            actions, tokens, logp = policy.act(policy.prepare(shard.obs), deterministic=True)
        finished, _ = shard.advance(ActionBatch(actions.astype(np.float32), tokens, logp, 0))
        for t in finished:
            successes.append(t.success)
            lengths.append(t.length)
    return {
        "success_rate": float(np.mean(successes)) if successes else 0.0,
        "episodes": len(successes),
        "mean_length": float(np.mean(lengths)) if lengths else 0.0,
    }
