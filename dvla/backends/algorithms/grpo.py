"""``grpo``: Group Relative Policy Optimisation for VLA rollouts.

G rollouts start from the same (task, initial state); each one's advantage is its return
minus the group mean, divided by the group standard deviation (plus eps), and every action
token of the rollout shares it, as SimpleVLA-RL and DeepSeek's GRPO do. Groups whose
rollouts all scored the same carry no signal and are skipped.

Asynchrony makes some samples stale: they were drawn by an older policy than the one
being updated. The objective is the decoupled clipped objective of Hilton et al. (2022):
the clipped ratio is taken against the learner's weights at the start of the update (the
proximal policy), and each token is reweighted by the truncated importance ratio between
the proximal and the behaviour policy, so stale data is corrected without letting one
rare token dominate.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from dvla.backends.algorithms.batching import flatten
from dvla.backends.algorithms.correction import (
    correction_metrics,
    importance_weights,
    staleness_metrics,
)
from dvla.backends.algorithms.objective import (
    clip_fraction,
    clipped_surrogate,
    optimizer_step,
)
from dvla.backends.base import Algorithm, Policy
from dvla.config import BackendOptions
from dvla.data import Trajectory, TrajectoryGroup


class GRPOOptions(BackendOptions):
    """Options of the ``grpo`` algorithm."""

    group_size: int = Field(8, ge=2, description="Rollouts per (task, initial state) group.")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip range.")
    adv_eps: float = Field(1e-6, gt=0, description="Added to the group std before dividing.")
    kl_coef: float = Field(
        0.0, ge=0, description="Weight of the KL penalty to the initial (reference) policy."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    epochs: int = Field(1, ge=1, description="Passes over each batch.")
    minibatch_steps: int | None = Field(
        None, ge=1, description="Steps per gradient step; default the whole batch."
    )
    loss_agg: Literal["sequence-mean", "token-mean"] = Field(
        "sequence-mean",
        description="sequence-mean: every rollout weighs the same, whatever its length (GRPO); "
        "token-mean: every action token weighs the same (Dr. GRPO).",
    )
    is_cap: float = Field(
        2.0, ge=1.0, description="Truncation of the stale-sample importance weights."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm.")


def group_advantages(returns: np.ndarray, eps: float) -> np.ndarray:
    """(R - mean) / (std + eps) within one group; population std, as in GRPO."""
    r = np.asarray(returns, np.float64)
    adv: np.ndarray = ((r - r.mean()) / (r.std() + eps)).astype(np.float32)
    return adv


class GRPO(Algorithm):
    """The ``grpo`` algorithm backend."""

    Options = GRPOOptions

    def __init__(self, options: Any, policy: Policy, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(options, policy, optimizer)
        self.o: GRPOOptions = options
        self.reference: Policy | None = None
        if self.o.kl_coef > 0:
            self.reference = copy.deepcopy(policy).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)

    @property
    def group_size(self) -> int:
        return self.o.group_size

    def update(
        self,
        groups: list[TrajectoryGroup],
        learner_version: int,
        max_staleness: int,
        importance_correction: bool,
    ) -> dict[str, float]:
        o = self.o
        trajs: list[Trajectory] = []
        advs: list[float] = []
        with_signal = 0
        for g in groups:
            group_adv = group_advantages(np.array([t.ret for t in g.trajectories]), o.adv_eps)
            if np.abs(group_adv).max() == 0.0:
                continue
            with_signal += 1
            trajs.extend(g.trajectories)
            advs.extend(group_adv.tolist())
        metrics: dict[str, float] = {
            "groups": float(len(groups)),
            "groups_with_signal": float(with_signal),
        }
        if not trajs:
            metrics.update(loss=0.0, updated=0.0)
            return metrics
        flat = flatten(trajs, self.train_pool)
        inputs = self.policy.prepare(flat.obs)
        tokens = torch.from_numpy(flat.tokens)
        adv = torch.from_numpy(np.asarray(advs, np.float32)[flat.traj_index]).unsqueeze(-1)
        lengths = np.bincount(flat.traj_index).astype(np.float32)
        if o.loss_agg == "sequence-mean":
            # Each step weighs 1/length, scaled so the weights still average to one.
            step_w = len(trajs) / lengths[flat.traj_index] / len(flat.traj_index)
            agg = torch.from_numpy((1.0 / step_w.mean() * step_w).astype(np.float32)).unsqueeze(-1)
        else:
            agg = torch.ones(len(flat.traj_index), 1)
        behaviour = torch.from_numpy(flat.logprobs)
        with torch.no_grad():
            prox = self.policy.evaluate(inputs, tokens).logprobs
            ref = self.reference.evaluate(inputs, tokens).logprobs if self.reference else None
        weights = importance_weights(prox, behaviour, o.is_cap, importance_correction)
        n = tokens.shape[0]
        mb = o.minibatch_steps or n
        stats: dict[str, list[float]] = {
            k: [] for k in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm")
        }
        self.policy.train()
        for _ in range(o.epochs):
            order = torch.randperm(n) if mb < n else torch.arange(n)
            for start in range(0, n, mb):
                idx = order[start : start + mb]
                sub = {k: v[idx] for k, v in inputs.items()}
                out = self.policy.evaluate(sub, tokens[idx])
                ratio = torch.exp(out.logprobs - prox[idx])
                adv_mb = adv[idx]
                surr = clipped_surrogate(ratio, adv_mb, o.clip_eps)
                pg_loss = -(agg[idx] * weights[idx] * surr).mean()
                loss = pg_loss - o.entropy_coef * out.entropy.mean()
                kl = torch.zeros(())
                if ref is not None:
                    d = ref[idx] - out.logprobs
                    kl = (torch.exp(d) - d - 1).mean()
                    loss = loss + o.kl_coef * kl
                gn = optimizer_step(
                    loss, self.policy.parameters(), self.optimizer, o.max_grad_norm, learner_version
                )
                stats["loss"].append(loss.item())
                stats["pg_loss"].append(pg_loss.item())
                stats["kl"].append(kl.item())
                stats["entropy"].append(out.entropy.mean().item())
                stats["clip_frac"].append(clip_fraction(ratio, o.clip_eps))
                stats["grad_norm"].append(float(gn))
        self.policy.eval()
        metrics.update({k: float(np.mean(v)) for k, v in stats.items()})
        metrics["updated"] = 1.0
        metrics.update(correction_metrics(weights))
        metrics.update(staleness_metrics(learner_version, flat.versions))
        metrics["train_steps"] = float(n)
        return metrics
