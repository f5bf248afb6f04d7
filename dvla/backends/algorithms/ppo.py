"""``ppo``: Proximal Policy Optimisation with a learned critic and GAE.

GRPO needs several rollouts of the same (task, initial state) to have a baseline; PPO
learns one instead, a state-value head on the policy's features, so a group of one
rollout is enough and credit goes to the steps that earned it, not to the whole episode.

Data format. Trajectories are exactly GRPO's: observations, tokens, behaviour
log-probabilities, versions and rewards; the sampler records no values. At the start of
each update the learner evaluates the batch once with its current weights (no grad),
which gives both the proximal log-probabilities and the values V(s_t). So the samplers
and the data plane stay algorithm-agnostic, and a stale trajectory gets the current
critic's estimates rather than those of the critic that was live when it was acted.

Advantages. Generalised advantage estimation (Schulman et al., 2016) runs over each
episode's rewards: ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``,
``A_t = delta_t + gamma lambda A_{t+1}``, and the value target is ``A_t + V(s_t)``.
Every trajectory is a whole episode and the last step is terminal (``V(s_T) = 0``):
the format keeps no observation after the last action, so there is nothing to
bootstrap a time-limit end from, and so no ``bootstrap_truncated`` option. Time-limit
ends are treated as terminal, which matches what the simulators score: an episode that
ran out of steps is over and failed, and its return is what it earned. (A critic that
does not see the step count then predicts an average over the remaining time, which
makes its estimates near the limit coarser, nothing worse.)

Objective. The policy loss is GRPO's decoupled clipped objective (Hilton et al., 2022):
the ratio is taken per action token ``[N, D]`` against the proximal log-probabilities,
the step's advantage is broadcast over the D tokens, and each token is reweighted by the
truncated importance weight between the proximal and the behaviour policy
(:mod:`dvla.backends.algorithms.correction`). The value loss is the squared error to the
GAE targets, optionally clipped around the update-start values as in OpenAI's baselines,
and an entropy bonus keeps exploration alive. Value targets are not importance-corrected:
they come from the learner's own critic, and staleness is bounded by
``pipeline.max_staleness``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

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
from dvla.errors import ConfigError, TrainingError

#: Added to the advantages' std before normalising, so a batch of equal advantages is 0.
ADV_EPS = 1e-8
_MISSING = object()


class PPOOptions(BackendOptions):
    """Options of the ``ppo`` algorithm."""

    group_size: int = Field(
        1,
        ge=1,
        description="Rollouts per (task, initial state) the sampler hands out together; "
        "PPO needs no groups (the critic is the baseline), so 1 is enough.",
    )
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    gae_lambda: float = Field(
        0.95, ge=0, le=1, description="GAE lambda: 0 is one-step TD, 1 is Monte Carlo."
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip range.")
    value_clip: float | None = Field(
        None,
        gt=0,
        description="Clip the value prediction to this distance from its update-start "
        "value (pessimistic max of clipped and unclipped loss); None: plain squared error.",
    )
    value_coef: float = Field(0.5, ge=0, description="Weight of the value loss.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    epochs: int = Field(4, ge=1, description="Passes over each batch.")
    minibatch_steps: int | None = Field(
        None, ge=1, description="Steps per gradient step; default the whole batch."
    )
    norm_adv: bool = Field(
        True, description="Normalise advantages to zero mean, unit std over the batch."
    )
    is_cap: float = Field(
        2.0, ge=1.0, description="Truncation of the stale-sample importance weights."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm.")


def gae(rewards: np.ndarray, values: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """Generalised advantage estimates of one whole episode, its last step terminal.

    Computed in float64 so long episodes with gamma and lambda near 1 do not accumulate
    float32 rounding; the caller adds ``values`` back to get the value targets.

    Args:
        rewards: ``[T]`` rewards of the episode.
        values: ``[T]`` critic estimates V(s_t) of the observations acted on.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        float32 ``[T]`` advantages.

    Raises:
        ValueError: ``rewards`` and ``values`` differ in length.
    """
    r = np.asarray(rewards, np.float64)
    v = np.asarray(values, np.float64)
    if r.shape != v.shape or r.ndim != 1:
        raise ValueError(f"rewards {r.shape} and values {v.shape} must be equal 1-D shapes")
    adv = np.zeros_like(r)
    running, next_value = 0.0, 0.0  # the step after the last is terminal
    for t in range(len(r) - 1, -1, -1):
        delta = r[t] + gamma * next_value - v[t]
        running = delta + gamma * lam * running
        adv[t] = running
        next_value = v[t]
    return adv.astype(np.float32)


def explained_variance(pred: np.ndarray, target: np.ndarray) -> float:
    """``1 - Var(target - pred) / Var(target)``: 1 perfect, 0 no better than the mean.

    Returns 0.0 when the targets do not vary (nothing to explain).
    """
    var = float(np.var(target))
    return 0.0 if var == 0.0 else float(1.0 - np.var(target - pred) / var)


class PPO(Algorithm):
    """The ``ppo`` algorithm backend."""

    Options = PPOOptions
    needs_values = True

    def __init__(self, options: Any, policy: Policy, optimizer: torch.optim.Optimizer) -> None:
        """Check what can be checked of the value head before any data arrives.

        A policy built without :meth:`~dvla.backends.base.Policy.enable_value_head`, or
        one whose head was added after the optimizer was built (so the critic would never
        train), fails here in one line instead of after the first rollouts. A model that
        keeps its head elsewhere is checked at the first update.

        Raises:
            ConfigError: the policy has no value head, or the optimizer does not train it.
        """
        super().__init__(options, policy, optimizer)
        self.o: PPOOptions = options
        head = getattr(policy, "value_head", _MISSING)
        if head is None:
            raise ConfigError(self._no_head_message())
        if isinstance(head, nn.Module):
            trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if any(id(p) not in trained for p in head.parameters()):
                raise ConfigError(
                    f"algorithm 'ppo': the value head of model '{type(policy).__name__}' is "
                    "not in the optimizer; call enable_value_head() before building it"
                )

    def _no_head_message(self) -> str:
        return (
            f"algorithm 'ppo' needs a value head but model '{type(self.policy).__name__}' "
            "has none; build the policy with build_policy (it calls enable_value_head())"
        )

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
        """Values and advantages once, then ``epochs`` passes of clipped PPO steps.

        Every trajectory is used: unlike GRPO there is no group whose rollouts all scored
        the same and carry no signal, since the critic's baseline differs from step to
        step.

        Raises:
            ConfigError: the policy returned no values (it has no value head).
            TrainingError: a reward, a value or the loss is NaN or infinite; raised
                before the optimizer steps on it.
        """
        o = self.o
        trajs: list[Trajectory] = [t for g in groups for t in g.trajectories]
        metrics: dict[str, float] = {"groups": float(len(groups))}
        if not trajs:
            metrics.update(loss=0.0, updated=0.0)
            return metrics
        bad = next((t for t in trajs if not np.isfinite(t.rewards).all()), None)
        if bad is not None:
            raise TrainingError(
                f"a reward of episode {bad.producer}/{bad.seq} is NaN or infinite at policy "
                f"version {learner_version}; check the simulator's reward"
            )
        flat = flatten(trajs, self.train_pool)
        inputs = self.policy.prepare(flat.obs)
        tokens = torch.from_numpy(flat.tokens)
        behaviour = torch.from_numpy(flat.logprobs)
        # One forward at the update start gives both the proximal log-probabilities and
        # the values the advantages are built on; eval mode, as the acting replicas run.
        self.policy.eval()
        with torch.no_grad():
            start = self.policy.evaluate(inputs, tokens)
        if start.values is None:
            raise ConfigError(self._no_head_message())
        if not torch.isfinite(start.values).all():
            raise TrainingError(
                f"the value head predicted NaN or infinity at policy version {learner_version}; "
                "lower the learning rate or check rewards and observations"
            )
        prox = start.logprobs
        old_values = start.values.detach().float().reshape(-1)
        values_np = old_values.cpu().numpy().astype(np.float64)

        # GAE per episode, on the learner's current critic.
        bounds = np.cumsum([0] + [t.length for t in trajs])
        adv_np = np.concatenate(
            [
                gae(t.rewards, values_np[a:b], o.gamma, o.gae_lambda)
                for t, a, b in zip(trajs, bounds[:-1], bounds[1:], strict=True)
            ]
        ).astype(np.float64)
        returns_np = adv_np + values_np
        adv_std = float(adv_np.std())
        if o.norm_adv:
            adv_np = (adv_np - adv_np.mean()) / (adv_std + ADV_EPS)
        dev = old_values.device
        adv = torch.from_numpy(adv_np.astype(np.float32)).to(dev).unsqueeze(-1)  # [N, 1]
        returns = torch.from_numpy(returns_np.astype(np.float32)).to(dev)  # [N]
        weights = importance_weights(
            prox, behaviour.to(prox.device), o.is_cap, importance_correction
        )

        n = tokens.shape[0]
        mb = o.minibatch_steps or n
        stats: dict[str, list[float]] = {
            k: []
            for k in (
                "loss",
                "pg_loss",
                "value_loss",
                "entropy",
                "clip_frac",
                "approx_kl",
                "grad_norm",
            )
        }
        self.policy.train()
        for _ in range(o.epochs):
            order = torch.randperm(n) if mb < n else torch.arange(n)
            for first in range(0, n, mb):
                idx = order[first : first + mb]
                sub = {k: v[idx] for k, v in inputs.items()}
                out = self.policy.evaluate(sub, tokens[idx])
                if out.values is None:
                    raise ConfigError(self._no_head_message())
                log_ratio = out.logprobs - prox[idx]
                ratio = torch.exp(log_ratio)
                adv_mb = adv[idx]
                surr = clipped_surrogate(ratio, adv_mb, o.clip_eps)
                pg_loss = -(weights[idx] * surr).mean()
                value_loss = self._value_loss(out.values.float(), old_values[idx], returns[idx])
                entropy = out.entropy.mean()
                loss = pg_loss + o.value_coef * value_loss - o.entropy_coef * entropy
                gn = optimizer_step(
                    loss, self.policy.parameters(), self.optimizer, o.max_grad_norm, learner_version
                )
                with torch.no_grad():
                    stats["loss"].append(loss.item())
                    stats["pg_loss"].append(pg_loss.item())
                    stats["value_loss"].append(value_loss.item())
                    stats["entropy"].append(entropy.item())
                    stats["clip_frac"].append(clip_fraction(ratio, o.clip_eps))
                    # Schulman's low-variance estimator of KL(proximal || current).
                    stats["approx_kl"].append(((ratio - 1) - log_ratio).mean().item())
                    stats["grad_norm"].append(float(gn))
        self.policy.eval()
        metrics.update({k: float(np.mean(v)) for k, v in stats.items()})
        metrics.update(
            updated=1.0,
            train_steps=float(n),
            explained_variance=explained_variance(values_np, returns_np),
            value_mean=float(values_np.mean()),
            return_mean=float(returns_np.mean()),
            adv_std=adv_std,
        )
        metrics.update(correction_metrics(weights))
        metrics.update(staleness_metrics(learner_version, flat.versions))
        return metrics

    def _value_loss(
        self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor
    ) -> torch.Tensor:
        """Half the squared error to the targets, so its gradient is the plain residual.

        With ``value_clip`` the prediction is also clipped to ``old +- value_clip`` and the
        larger of the two errors counts, so one update cannot move the critic far from
        where the advantages were computed (the critic shares the policy's trunk here).
        """
        err = (values - returns).pow(2)
        if self.o.value_clip is not None:
            clipped = old_values + (values - old_values).clamp(
                -self.o.value_clip, self.o.value_clip
            )
            err = torch.maximum(err, (clipped - returns).pow(2))
        return 0.5 * err.mean()
