"""Observation staging: batches composed into reused rows of the rollout pool.

Stacking the observations of several shards (or of a shard's running and newly reset
environments) with ``np.concatenate`` allocates a new batch for every forward; composing
them into rows of a :class:`~dvla.pipeline.memory.BufferPool` reuses the same memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dvla.data import ObsBatch
from dvla.pipeline.memory import BufferPool


class ObsStage:
    """Rows that observation batches are composed into, instead of concatenated anew.

    With ``buffers=2`` consecutive results alternate between two sets of rows, so a batch
    may be composed from the previous result (a shard's observations plus newly reset
    environments) without reading rows it is overwriting. A result stays valid until
    ``buffers`` more compositions have been made.
    """

    def __init__(self, pool: BufferPool, key: str, capacity: int, buffers: int = 1) -> None:
        self.pool = pool
        self.key = key
        self.capacity = capacity
        self._buffers = buffers
        self._turn = 0

    def stack(self, parts: Sequence[ObsBatch]) -> ObsBatch:
        """:meth:`ObsBatch.concat` into these rows; a single part is passed through as is."""
        if len(parts) == 1:
            return parts[0]
        return self.compose([(obs, None) for obs in parts])

    def compose(self, parts: Sequence[tuple[ObsBatch, np.ndarray | None]]) -> ObsBatch:
        """The rows ``idx`` of each part (all rows where ``idx`` is None), in order."""
        self._turn = (self._turn + 1) % self._buffers
        key = f"{self.key}/{self._turn}"
        counts = [len(obs) if idx is None else len(idx) for obs, idx in parts]
        rows = sum(counts)
        first = parts[0][0]
        images = {
            cam: self._fill(f"{key}/image:{cam}", rows, [(o.images[cam], i) for o, i in parts])
            for cam, arr in first.images.items()
        }
        proprio = self._fill(f"{key}/proprio", rows, [(o.proprio, i) for o, i in parts])
        instructions = [
            s
            for obs, idx in parts
            for s in (obs.instructions if idx is None else [obs.instructions[int(j)] for j in idx])
        ]
        return ObsBatch(images, proprio, instructions)

    def _fill(
        self, key: str, rows: int, sources: list[tuple[np.ndarray, np.ndarray | None]]
    ) -> np.ndarray:
        ref = sources[0][0]
        out = self.pool.grow(key, rows, ref.shape[1:], ref.dtype, self.capacity)
        pos = 0
        for src, idx in sources:
            n = len(src) if idx is None else len(idx)
            if idx is None:
                out[pos : pos + n] = src
            else:
                # mode="clip" writes straight into ``out`` (the default buffers a copy).
                np.take(src, idx, axis=0, out=out[pos : pos + n], mode="clip")
            pos += n
        return out
