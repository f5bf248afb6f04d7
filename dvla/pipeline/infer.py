"""The infer lane: batches observation requests from every shard into policy forwards.

Requests wait at most ``max_wait_ms`` for company and a forward takes at most
``max_batch`` observations, so latency stays bounded while batches grow with load. The
forward runs on the active inference replica, which the sync lane swaps atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np
import torch

from dvla.config import InferConfig
from dvla.data import ActionBatch, ObsBatch
from dvla.errors import LaneError, TrainingError
from dvla.pipeline.lane import Lane
from dvla.pipeline.memory import BufferPool, MemoryPools
from dvla.pipeline.staging import ObsStage
from dvla.pipeline.weights import ReplicaSet

Request = tuple[ObsBatch, "asyncio.Future[ActionBatch]"]


class InferLane(Lane):
    """Serves action requests from the sample lane."""

    def __init__(
        self,
        replicas: ReplicaSet,
        cfg: InferConfig,
        timeout_s: float,
        seed: int,
        memory: MemoryPools | None = None,
    ) -> None:
        super().__init__("infer", timeout_s)
        self.replicas = replicas
        self.cfg = cfg
        self.memory = memory
        # Requests are stacked into reused rows of the rollout pool. Forwards run one at a
        # time in this lane's thread and a policy's prepare() may keep views of the rows
        # (tiny-vla's torch.from_numpy) only until its forward returns, so one set suffices.
        pool = memory.rollout if memory is not None else BufferPool("rollout")
        self._stage = ObsStage(pool, "infer", cfg.max_batch)
        self._requests: asyncio.Queue[Request] = asyncio.Queue()
        self._gen = torch.Generator().manual_seed(seed)
        self.batches = 0
        self.observations = 0
        self.max_batch_seen = 0
        #: Forwards by batch size, bucketed to the next power of two: what batching
        #: actually achieved under the run's load, against ``max_batch``.
        self.size_hist: dict[int, int] = {}

    def _forward(self, obs: ObsBatch) -> ActionBatch:
        rep = self.replicas.active
        device = self.memory.inference() if self.memory else contextlib.nullcontext()
        with rep.lock, device:
            inputs = rep.policy.prepare(obs)
            actions, tokens, logprobs = rep.policy.act(inputs, generator=self._gen)
            version = rep.version
        if not np.isfinite(logprobs).all():
            raise TrainingError(
                f"policy version {version} gave NaN or infinite action log-probabilities; "
                "lower the learning rate or check observations"
            )
        self.batches += 1
        self.observations += len(obs)
        self.max_batch_seen = max(self.max_batch_seen, len(obs))
        bucket = 1 << max(0, len(obs) - 1).bit_length()
        self.size_hist[bucket] = self.size_hist.get(bucket, 0) + 1
        return ActionBatch(actions.astype(np.float32), tokens, logprobs, version)

    async def forward(self, obs: ObsBatch) -> ActionBatch:
        """One forward now, without batching (sync mode)."""
        return await self.blocking(self._forward, obs)

    async def request(self, obs: ObsBatch) -> ActionBatch:
        """Queue ``obs`` for the next batch and wait for its actions."""
        fut: asyncio.Future[ActionBatch] = asyncio.get_running_loop().create_future()
        self._requests.put_nowait((obs, fut))
        try:
            return await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise LaneError(
                f"infer lane: no actions within {self.timeout_s:g} s (pipeline.lane_timeout_s)"
            ) from None

    async def run(self, stop: asyncio.Event) -> None:
        """Async mode: batch and serve requests until stopped.

        A forward never exceeds ``max_batch`` observations (on a GPU that is the memory
        the inference pool was sized for): a request that would overflow the batch waits
        for the next one, and a single request larger than ``max_batch`` is split.
        """
        carry: Request | None = None
        while not stop.is_set():
            if carry is not None:
                first, carry = carry, None
            else:
                try:
                    first = await asyncio.wait_for(self._requests.get(), 0.25)
                except TimeoutError:
                    continue
            batch = [first]
            size = len(first[0])
            deadline = time.perf_counter() + self.cfg.max_wait_ms / 1000
            while size < self.cfg.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._requests.get(), remaining)
                except TimeoutError:
                    break
                if size + len(nxt[0]) > self.cfg.max_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                size += len(nxt[0])
            await self._serve(batch)
        # Requests queued before the stop still get their answer, so no shard is left
        # waiting for actions that never come.
        leftover = [carry] if carry is not None else []
        while not self._requests.empty():
            leftover.append(self._requests.get_nowait())
        if leftover:
            await self._serve(leftover)

    def _forward_chunked(self, obs: ObsBatch) -> ActionBatch:
        n, cap = len(obs), self.cfg.max_batch
        if n <= cap:
            return self._forward(obs)
        parts = [self._forward(obs.select(np.arange(i, min(i + cap, n)))) for i in range(0, n, cap)]
        return ActionBatch(
            np.concatenate([p.actions for p in parts]),
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.logprobs for p in parts]),
            min(p.version for p in parts),
        )

    async def _serve(self, batch: list[Request]) -> None:
        try:
            obs = self._stage.stack([r[0] for r in batch])
            act = await self.blocking(self._forward_chunked, obs)
        except Exception as err:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            raise
        start = 0
        for obs, fut in batch:
            n = len(obs)
            if not fut.done():
                fut.set_result(act.slice(start, start + n))
            start += n

    def mean_batch(self) -> float:
        return self.observations / self.batches if self.batches else 0.0

    def queued(self) -> int:
        """Observation requests waiting for a forward (a full queue means inference lags)."""
        return self._requests.qsize()

    def report(self) -> dict[str, Any]:
        """Achieved batching: forwards, mean and largest batch, and sizes by bucket."""
        return {
            "forwards": self.batches,
            "observations": self.observations,
            "mean_batch": round(self.mean_batch(), 3),
            "max_batch_seen": self.max_batch_seen,
            "batch_size_hist": {f"<={k}": v for k, v in sorted(self.size_hist.items())},
            "max_batch": self.cfg.max_batch,
            "max_wait_ms": self.cfg.max_wait_ms,
        }
