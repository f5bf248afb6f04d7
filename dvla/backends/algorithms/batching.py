"""Flattening trajectory groups into one training batch, shared by algorithms.

With a train pool the batch is written into grow-only buffers of that pool, reused from
one update to the next, instead of being concatenated into new arrays every update; the
pool's buffers are sized once to the largest batch and the steady state allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dvla.data import ObsBatch, Trajectory

if TYPE_CHECKING:
    from dvla.pipeline.memory import BufferPool


@dataclass
class FlatBatch:
    """Every step of a list of trajectories, stacked."""

    obs: ObsBatch
    tokens: np.ndarray  # int64 [N, D]
    logprobs: np.ndarray  # float32 [N, D] behaviour log-probabilities
    versions: np.ndarray  # int64 [N]
    traj_index: np.ndarray  # int64 [N]: which trajectory each step came from


def _stack(pool: BufferPool | None, key: str, parts: list[np.ndarray], rows: int) -> np.ndarray:
    """``np.concatenate(parts)``, written into the pool's buffer ``key`` when there is a pool."""
    if pool is None:
        return np.concatenate(parts)
    out = pool.grow(f"flat:{key}", rows, parts[0].shape[1:], parts[0].dtype, pool.min_rows)
    np.concatenate(parts, out=out)
    return out


def _traj_index(pool: BufferPool | None, lengths: list[int], rows: int) -> np.ndarray:
    """Which trajectory each of the ``rows`` steps came from (``np.repeat`` of the ids)."""
    if pool is None:
        return np.repeat(np.arange(len(lengths)), lengths)
    index = pool.grow("flat:traj_index", rows, (), np.int64, pool.min_rows)
    start = 0
    for k, length in enumerate(lengths):
        index[start : start + length] = k
        start += length
    return index


def flatten(trajs: list[Trajectory], pool: BufferPool | None = None) -> FlatBatch:
    """Stack the steps of ``trajs`` in order.

    Args:
        trajs: the trajectories, at least one.
        pool: write the arrays into this pool's reused buffers. The batch is then valid
            only until the next ``flatten`` into the same pool: the caller must be done
            with it (and with tensors viewing it) by then. Default: new arrays.
    """
    cams = list(trajs[0].images)
    instructions = [t.instruction for t in trajs for _ in range(t.length)]
    lengths = [t.length for t in trajs]
    n = sum(lengths)
    return FlatBatch(
        obs=ObsBatch(
            images={c: _stack(pool, f"image:{c}", [t.images[c] for t in trajs], n) for c in cams},
            proprio=_stack(pool, "proprio", [t.proprio for t in trajs], n),
            instructions=instructions,
        ),
        tokens=_stack(pool, "tokens", [t.tokens for t in trajs], n),
        logprobs=_stack(pool, "logprobs", [t.logprobs for t in trajs], n),
        versions=_stack(pool, "versions", [t.versions for t in trajs], n),
        traj_index=_traj_index(pool, lengths, n),
    )
