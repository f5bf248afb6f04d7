"""Flattening trajectory groups into one training batch, shared by algorithms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dvla.data import ObsBatch, Trajectory


@dataclass
class FlatBatch:
    """Every step of a list of trajectories, stacked."""

    obs: ObsBatch
    tokens: np.ndarray  # int64 [N, D]
    logprobs: np.ndarray  # float32 [N, D] behaviour log-probabilities
    versions: np.ndarray  # int64 [N]
    traj_index: np.ndarray  # int64 [N]: which trajectory each step came from


def flatten(trajs: list[Trajectory]) -> FlatBatch:
    """Stack the steps of ``trajs`` in order."""
    cams = list(trajs[0].images)
    instructions = [t.instruction for t in trajs for _ in range(t.length)]
    return FlatBatch(
        obs=ObsBatch(
            images={c: np.concatenate([t.images[c] for t in trajs]) for c in cams},
            proprio=np.concatenate([t.proprio for t in trajs]),
            instructions=instructions,
        ),
        tokens=np.concatenate([t.tokens for t in trajs]),
        logprobs=np.concatenate([t.logprobs for t in trajs]),
        versions=np.concatenate([t.versions for t in trajs]),
        traj_index=np.repeat(np.arange(len(trajs)), [t.length for t in trajs]),
    )
