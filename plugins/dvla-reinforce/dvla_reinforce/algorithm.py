"""``reinforce``: REINFORCE with a baseline (Williams, 1992), as a third-party plugin.

Written against dvla's public API only (:mod:`dvla.backends.base`, the shared helpers in
:mod:`dvla.backends.algorithms.batching` and :mod:`dvla.backends.algorithms.correction`,
:mod:`dvla.data`, :mod:`dvla.errors`), the way a package outside dvla would write one.

Estimator. Each step's return is its discounted reward-to-go
``G_t = r_t + gamma G_{t+1}`` over the rest of its episode, and its advantage is
``G_t - b``: every action token of the step shares it. The policy-gradient loss is
``-mean(w * A * log pi(token))`` over all action tokens, one optimizer step per batch:
REINFORCE has no ratio clipping, so reusing a batch for several epochs would no longer
be the policy gradient. The baseline ``b`` removes variance, not bias, as long as it
does not depend on the step's own action:

* ``batch-mean``: the mean reward-to-go over every step of the batch, the constant
  that best centres the batch (it includes the step's own return, a bias of order
  1/steps that is the usual price for a baseline with no extra rollouts or parameters).
* ``ema``: an exponential moving average of earlier batches' mean reward-to-go. The
  current batch is folded in only after its advantages are taken, so its baseline is
  independent of it; the first batch, with no history, uses its own mean. The average
  lives in the algorithm object and is not checkpointed: a resumed run starts it over.
* ``group-mean``: the leave-one-out mean of the other rollouts of the same group (RLOO,
  Kool et al., 2019): the rollouts of a group start from the same task and initial
  state, so the others' returns (discounted from their first step) estimate what that
  start is worth, without the rollout's own return in it. Needs ``group_size >= 2``.

``normalize`` divides the advantages by their root mean square over the batch's steps,
so the step size does not depend on the reward scale. With the batch-mean baseline that
is exactly the advantages' standard deviation; unlike the std, it cannot blow up when an
``ema`` baseline sits away from a batch whose returns all agree (every advantage equal,
std zero). Advantages are not re-centred: that would replace the chosen baseline by the
batch mean.

Staleness. In async mode a step may have been acted by an older policy than the one
being updated. Each token is then reweighted by the truncated importance ratio
``min(pi / pi_behaviour, is_cap)`` (:func:`dvla.backends.algorithms.correction.
importance_weights`): unbiased below the cap, bounded variance above it. The ratio's
numerator comes from the same forward pass that the gradient is taken through (its
detached log-probabilities): with one optimizer step per batch those are the weights at
the start of the update, so no extra forward is spent on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Self

import numpy as np
import torch
from dvla.backends.algorithms.batching import flatten
from dvla.backends.algorithms.correction import correction_metrics, importance_weights
from dvla.backends.base import Algorithm, Policy
from dvla.config import BackendOptions
from dvla.data import Trajectory, TrajectoryGroup
from dvla.errors import TrainingError
from pydantic import Field, model_validator

#: Advantages whose root mean square is at most this carry no signal (returns that
#: agree up to float rounding); they are treated as zero rather than scaled up to noise.
SIGNAL_EPS = 1e-8

Baseline = Literal["batch-mean", "ema", "group-mean"]


class ReinforceOptions(BackendOptions):
    """Options of the ``reinforce`` algorithm."""

    group_size: int = Field(
        1,
        ge=1,
        description="Rollouts per (task, initial state) the sampler hands out together; "
        "1 is enough except for the group-mean baseline, which needs at least 2.",
    )
    baseline: Baseline = Field(
        "batch-mean",
        description="batch-mean: mean reward-to-go of the batch's steps; ema: moving "
        "average of earlier batches' means; group-mean: leave-one-out mean of the other "
        "rollouts' returns in the group (needs group_size >= 2).",
    )
    ema_decay: float = Field(
        0.9, ge=0, lt=1, description="Weight of the history in the ema baseline."
    )
    gamma: float = Field(
        1.0, ge=0, le=1, description="Discount of the reward-to-go (1.0: the undiscounted rest)."
    )
    normalize: bool = Field(
        True, description="Divide the advantages by their root mean square over the batch."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    minibatch_steps: int | None = Field(
        None,
        ge=1,
        description="Steps per forward/backward pass; gradients accumulate into one "
        "optimizer step, so this bounds memory without changing the update. Default: "
        "the whole batch in one pass.",
    )
    is_cap: float = Field(
        2.0, ge=1.0, description="Truncation of the stale-sample importance weights."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm.")

    @model_validator(mode="after")
    def _group_mean_needs_groups(self) -> Self:
        """Reject group-mean with groups of one at load time, not at the first update."""
        if self.baseline == "group-mean" and self.group_size < 2:
            raise ValueError(
                f"baseline 'group-mean' needs group_size >= 2 (got {self.group_size}): "
                "a rollout alone in its group has no others to compare with"
            )
        return self


def reward_to_go(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """``G_t = r_t + gamma G_{t+1}`` for one whole episode, its last step terminal.

    Summed in float64 so long episodes with gamma near 1 do not accumulate float32
    rounding.

    Args:
        rewards: ``[T]`` rewards of the episode.
        gamma: discount factor in [0, 1].

    Returns:
        float64 ``[T]`` reward-to-go of every step.
    """
    r = np.asarray(rewards, np.float64)
    if gamma == 1.0:
        return np.cumsum(r[::-1])[::-1].copy()
    out = np.empty_like(r)
    running = 0.0
    for t in range(len(r) - 1, -1, -1):
        running = r[t] + gamma * running
        out[t] = running
    return out


def leave_one_out(returns: np.ndarray) -> np.ndarray:
    """For each entry, the mean of the others: the RLOO baseline of a group.

    Args:
        returns: ``[G]`` returns of one group, ``G >= 2``.

    Returns:
        float64 ``[G]``.

    Raises:
        ValueError: fewer than two returns.
    """
    r = np.asarray(returns, np.float64)
    if r.ndim != 1 or len(r) < 2:
        raise ValueError(f"leave-one-out needs at least 2 returns, got shape {r.shape}")
    out: np.ndarray = (r.sum() - r) / (len(r) - 1)
    return out


@dataclass
class Advantages:
    """Per-step quantities of one batch, in the order of its flattened steps."""

    trajectories: list[Trajectory]
    reward_to_go: np.ndarray  # float64 [N]
    baseline: np.ndarray  # float64 [N]: the baseline each step was compared with
    advantages: np.ndarray  # float32 [N], normalised when the option says so
    signal: bool  # False: every advantage is (numerically) zero


class Reinforce(Algorithm):
    """The ``reinforce`` algorithm backend."""

    Options = ReinforceOptions

    def __init__(self, options: Any, policy: Policy, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(options, policy, optimizer)
        self.o: ReinforceOptions = options
        #: The ema baseline's running value; None until the first batch.
        self.ema: float | None = None

    @property
    def group_size(self) -> int:
        return self.o.group_size

    def advantages(self, groups: list[TrajectoryGroup]) -> Advantages:
        """Reward-to-go, baseline and advantage of every step of ``groups``.

        Public so a test (or a curious user) can check the numbers by hand. In ``ema``
        mode it also folds this batch into the moving average, so call it once per batch.

        Raises:
            TrainingError: a reward is NaN or infinite, or a group-mean group holds
                fewer than two rollouts.
        """
        o = self.o
        trajs = [t for g in groups for t in g.trajectories]
        bad = next((t for t in trajs if not np.isfinite(t.rewards).all()), None)
        if bad is not None:
            raise TrainingError(
                f"a reward of episode {bad.producer}/{bad.seq} is NaN or infinite; "
                "check the simulator's reward"
            )
        if not trajs:
            empty = np.zeros(0, np.float64)
            return Advantages([], empty, empty, empty.astype(np.float32), False)
        rtg_parts = [reward_to_go(t.rewards, o.gamma) for t in trajs]
        rtg = np.concatenate(rtg_parts)
        if o.baseline == "group-mean":
            parts: list[np.ndarray] = []
            first = 0  # index in trajs of the group's first rollout
            for g in groups:
                size = len(g.trajectories)
                if size < 2:
                    raise TrainingError(
                        f"baseline 'group-mean' needs at least 2 rollouts per group, but "
                        f"group {g.group_id} has {size}"
                    )
                own = rtg_parts[first : first + size]
                loo = leave_one_out(np.array([part[0] for part in own]))
                parts.extend(np.full(len(part), b) for part, b in zip(own, loo, strict=True))
                first += size
            baseline = np.concatenate(parts)
        else:
            batch_mean = float(rtg.mean())
            b = batch_mean
            if o.baseline == "ema":
                b = batch_mean if self.ema is None else self.ema
                self.ema = (
                    batch_mean
                    if self.ema is None
                    else o.ema_decay * self.ema + (1 - o.ema_decay) * batch_mean
                )
            baseline = np.full(len(rtg), b)
        adv = rtg - baseline
        rms = math.sqrt(float(np.mean(adv * adv)))
        signal = rms > SIGNAL_EPS
        if not signal:
            adv = np.zeros_like(adv)
        elif o.normalize:
            adv = adv / rms
        return Advantages(trajs, rtg, baseline, adv.astype(np.float32), signal)

    def update(
        self,
        groups: list[TrajectoryGroup],
        learner_version: int,
        max_staleness: int,
        importance_correction: bool,
    ) -> dict[str, float]:
        """One policy-gradient step on every step of ``groups``.

        A batch without signal (every advantage zero) and without an entropy bonus is
        skipped (``updated`` 0): its gradient is zero, and an adaptive optimizer would
        still move the weights on its momentum, or turn rounding noise into a full step.

        Raises:
            TrainingError: a reward, the loss or the gradient is NaN or infinite; raised
                before the optimizer steps on it.
        """
        o = self.o
        a = self.advantages(groups)
        metrics: dict[str, float] = {"groups": float(len(groups))}
        if a.trajectories:
            metrics.update(
                baseline=float(a.baseline.mean()),
                return_mean=float(np.mean([t.ret for t in a.trajectories])),
            )
        if not a.trajectories or (not a.signal and o.entropy_coef == 0.0):
            metrics.update(loss=0.0, updated=0.0, train_steps=0.0)
            return metrics

        flat = flatten(a.trajectories, self.train_pool)
        inputs = self.policy.prepare(flat.obs)
        tokens = torch.from_numpy(flat.tokens)
        behaviour = torch.from_numpy(flat.logprobs)
        adv = torch.from_numpy(a.advantages).unsqueeze(-1)  # [N, 1], shared by D tokens
        n = tokens.shape[0]
        mb = o.minibatch_steps or n
        loss_sum = pg_sum = ent_sum = 0.0
        weights: list[torch.Tensor] = []
        self.policy.train()
        try:
            self.optimizer.zero_grad(set_to_none=True)
            for first in range(0, n, mb):
                sl = slice(first, first + mb)
                sub = {k: v[sl] for k, v in inputs.items()}
                out = self.policy.evaluate(sub, tokens[sl])
                logp = out.logprobs
                w = importance_weights(
                    logp.detach(), behaviour[sl].to(logp.device), o.is_cap, importance_correction
                )
                share = logp.shape[0] / n  # chunk means, weighted, sum to the batch mean
                pg_loss = -(w * adv[sl].to(logp.device) * logp).mean() * share
                entropy = out.entropy.mean() * share
                loss = pg_loss - o.entropy_coef * entropy
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss.item()} at policy version {learner_version}; "
                        "lower the learning rate or check rewards and observations"
                    )
                loss.backward()  # type: ignore[no-untyped-call]
                loss_sum += loss.item()
                pg_sum += pg_loss.item()
                ent_sum += entropy.item()
                weights.append(w.detach())
            gn = torch.nn.utils.clip_grad_norm_(
                self.policy.parameters(), o.max_grad_norm or math.inf
            )
            if not torch.isfinite(gn):
                raise TrainingError(
                    f"gradient norm became {float(gn)} at policy version {learner_version}; "
                    "lower the learning rate or check rewards and observations"
                )
            self.optimizer.step()
        finally:
            self.policy.eval()
        metrics.update(
            loss=loss_sum,
            pg_loss=pg_sum,
            entropy=ent_sum,
            grad_norm=float(gn),
            updated=1.0,
            train_steps=float(n),
        )
        metrics.update(correction_metrics(torch.cat(weights)))
        return metrics
