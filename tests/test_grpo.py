from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from dvla.backends.algorithms.grpo import GRPO, GRPOOptions, group_advantages
from dvla.data import ObsBatch, Trajectory, TrajectoryGroup
from dvla.errors import TrainingError
from dvla.testing.fakes import FakePolicy, FakePolicyOptions, fake_spec, make_group

EPS = 1e-6


def build(
    policy_opts: dict[str, Any] | None = None, lr: float = 0.1, **grpo: Any
) -> tuple[GRPO, FakePolicy]:
    policy = FakePolicy(FakePolicyOptions(**(policy_opts or {})), fake_spec())
    opts = GRPOOptions(**{"group_size": 4, "adv_eps": EPS, "loss_agg": "token-mean", **grpo})
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    return GRPO(opts, policy, optimizer), policy


def params(policy: FakePolicy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.parameters()]


def same_params(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def current_logprobs(policy: FakePolicy, traj: Trajectory) -> np.ndarray:
    obs = ObsBatch(traj.images, traj.proprio, [traj.instruction] * traj.length)
    with torch.no_grad():
        out = policy.evaluate(policy.prepare(obs), torch.from_numpy(traj.tokens))
    return out.logprobs.numpy()


def set_behaviour(policy: FakePolicy, group: TrajectoryGroup, shift: float | list[float]) -> None:
    """Behaviour log-probs = current log-probs + shift (shift < 0: the policy moved away).

    ``shift`` is one value for every trajectory or one per trajectory.
    """
    shifts = shift if isinstance(shift, list) else [shift] * len(group.trajectories)
    for t, sh in zip(group.trajectories, shifts, strict=True):
        t.logprobs = (current_logprobs(policy, t) + sh).astype(np.float32)


def expected_pg_loss(
    returns: list[float],
    lengths: list[int],
    weight: float | list[float] = 1.0,
    agg: str = "token-mean",
) -> float:
    """The clipped loss at ratio 1: -mean of w * A, every action token of a rollout sharing A.

    token-mean averages over all tokens; sequence-mean averages each rollout's tokens first
    and then the rollouts, so each rollout weighs the same whatever its length.
    """
    r = np.array(returns, np.float64)
    adv = (r - r.mean()) / (r.std() + EPS)
    w = np.array(weight if isinstance(weight, list) else [weight] * len(returns))
    if agg == "token-mean":
        return float(-(w * adv * np.array(lengths)).sum() / sum(lengths))
    return float(-(w * adv).mean())


# --------------------------------------------------------------------- advantages


def test_group_advantages_by_hand() -> None:
    adv = group_advantages(np.array([1.0, 0.0, 0.0, 0.0]), 0.0)
    mean, std = 0.25, math.sqrt(3) / 4  # population std: sqrt(.25 * .75)
    assert adv.dtype == np.float32
    assert adv[0] == pytest.approx((1 - mean) / std)  # = sqrt(3)
    assert adv[0] == pytest.approx(math.sqrt(3))
    assert adv[1:] == pytest.approx([-mean / std] * 3)  # = -1/sqrt(3)
    assert adv.sum() == pytest.approx(0.0, abs=1e-6)


def test_group_advantages_eps_and_scale_invariance() -> None:
    adv = group_advantages(np.array([2.0, 0.0]), 1.0)  # mean 1, std 1, +eps 1 -> /2
    assert adv.tolist() == pytest.approx([0.5, -0.5])
    a = group_advantages(np.array([3.0, 1.0, 2.0]), 1e-9)
    b = group_advantages(np.array([30.0, 10.0, 20.0]), 1e-9)
    assert a == pytest.approx(b, rel=1e-5)


def test_uniform_group_has_zero_advantage() -> None:
    assert group_advantages(np.array([1.0, 1.0, 1.0]), EPS).tolist() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------- update


def test_all_uniform_groups_do_not_update() -> None:
    algo, policy = build()
    before = params(policy)
    groups = [make_group([1, 1, 1, 1], group_id=0), make_group([0, 0, 0, 0], group_id=1)]
    m = algo.update(groups, learner_version=0, max_staleness=2, importance_correction=True)
    assert m["updated"] == 0.0
    assert m["loss"] == 0.0
    assert m["groups"] == 2.0
    assert m["groups_with_signal"] == 0.0
    assert same_params(before, params(policy))


def test_uniform_group_contributes_nothing_to_a_mixed_batch() -> None:
    signal = [1.0, 0.0, 0.0, 0.0]
    algo_a, pol_a = build()
    m_a = algo_a.update([make_group(signal, group_id=0)], 0, 2, importance_correction=False)
    algo_b, pol_b = build()
    m_b = algo_b.update(
        [make_group([1, 1, 1, 1], group_id=7), make_group(signal, group_id=0)],
        0,
        2,
        importance_correction=False,
    )
    assert m_b["groups"] == 2.0
    assert m_b["groups_with_signal"] == 1.0
    assert m_b["train_steps"] == m_a["train_steps"] == 12.0  # 4 trajectories x 3 steps
    assert m_b["loss"] == pytest.approx(m_a["loss"], rel=1e-6)
    for x, y in zip(params(pol_a), params(pol_b), strict=True):
        torch.testing.assert_close(x, y)


def test_clipped_loss_of_first_step_by_hand() -> None:
    returns, lengths = [1.0, 0.0, 0.0, 0.0], [1, 3, 2, 2]
    algo, policy = build(loss_agg="token-mean")
    before = params(policy)
    group = make_group(returns, length=lengths)
    m = algo.update([group], learner_version=0, max_staleness=2, importance_correction=False)
    # ratio == 1 at the first step, so the clipped surrogate is just A on every token:
    # -(sqrt(3) * 1 - (3 + 2 + 2) / sqrt(3)) / 8 = 1 / (2 sqrt(3))
    expected = expected_pg_loss(returns, lengths)
    assert expected == pytest.approx(1 / (2 * math.sqrt(3)), rel=1e-4)
    assert m["updated"] == 1.0
    assert m["pg_loss"] == pytest.approx(expected, rel=1e-5)
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    assert m["clip_frac"] == 0.0
    assert m["kl"] == 0.0
    assert m["is_weight_mean"] == 1.0
    assert m["ess"] == pytest.approx(1.0)
    assert m["train_steps"] == float(sum(lengths))
    assert not same_params(before, params(policy))


def test_sequence_mean_weighs_rollouts_equally_whatever_their_length() -> None:
    # Without importance weights a group's advantages sum to zero, so with every rollout
    # weighing the same the first-step loss is zero even though the lengths differ...
    returns, lengths = [1.0, 0.0, 0.0, 0.0], [1, 3, 2, 2]
    algo, policy = build(loss_agg="sequence-mean")
    before = params(policy)
    m = algo.update([make_group(returns, length=lengths)], 0, 2, importance_correction=False)
    assert m["loss"] == pytest.approx(0.0, abs=1e-6)
    assert m["updated"] == 1.0
    # ... while the gradient is not: the update still moves the policy.
    assert not same_params(before, params(policy))


@pytest.mark.parametrize("agg", ["sequence-mean", "token-mean"])
def test_clipped_loss_with_per_rollout_importance_weights_by_hand(agg: str) -> None:
    returns, lengths = [1.0, 0.0, 0.0, 0.0], [1, 3, 2, 2]
    weights = [1.5, 1.0, 1.0, 1.0]
    algo, policy = build(loss_agg=agg, is_cap=2.0)
    group = make_group(returns, length=lengths)
    set_behaviour(policy, group, [-math.log(w) for w in weights])
    m = algo.update([group], learner_version=0, max_staleness=2, importance_correction=True)
    expected = expected_pg_loss(returns, lengths, weights, agg)
    if agg == "sequence-mean":
        # -(1.5 sqrt(3) - 3 / sqrt(3)) / 4 = -sqrt(3) / 8
        assert expected == pytest.approx(-math.sqrt(3) / 8, rel=1e-4)
    else:
        # -(1.5 sqrt(3) * 1 - 7 / sqrt(3)) / 8
        assert expected == pytest.approx(-(1.5 * math.sqrt(3) - 7 / math.sqrt(3)) / 8, rel=1e-4)
    assert m["pg_loss"] == pytest.approx(expected, rel=1e-4)
    assert m["is_weight_mean"] == pytest.approx((1.5 * 1 + 7) / 8, rel=1e-5)


def test_update_moves_probability_towards_the_advantaged_rollout() -> None:
    algo, policy = build(lr=0.5)
    group = make_group([1.0, 0.0, 0.0, 0.0], length=[2, 2, 2, 2])
    winner, loser = group.trajectories[0], group.trajectories[1]
    w0, l0 = current_logprobs(policy, winner).sum(), current_logprobs(policy, loser).sum()
    algo.update([group], 0, 2, importance_correction=False)
    assert current_logprobs(policy, winner).sum() > w0
    assert current_logprobs(policy, loser).sum() < l0


def test_entropy_bonus_of_a_uniform_policy_by_hand() -> None:
    # init_scale=0: all logits 0, so every dimension's entropy is log(bins).
    algo, _ = build(policy_opts={"init_scale": 0.0}, entropy_coef=0.5)
    returns, lengths = [1.0, 0.0, 0.0, 0.0], [1, 3, 2, 2]
    m = algo.update([make_group(returns, length=lengths)], 0, 2, importance_correction=False)
    assert m["entropy"] == pytest.approx(math.log(8), rel=1e-5)
    assert m["loss"] == pytest.approx(
        expected_pg_loss(returns, lengths) - 0.5 * math.log(8), rel=1e-5
    )


def test_kl_to_reference_is_zero_at_the_first_step() -> None:
    algo, _ = build(kl_coef=0.3)
    assert algo.reference is not None
    assert not any(p.requires_grad for p in algo.reference.parameters())
    returns, lengths = [0.0, 1.0, 1.0, 0.0], [3, 1, 2, 2]
    m = algo.update([make_group(returns, length=lengths)], 0, 2, importance_correction=False)
    assert m["kl"] == pytest.approx(0.0, abs=1e-7)
    assert m["loss"] == pytest.approx(expected_pg_loss(returns, lengths), rel=1e-5)


# --------------------------------------------------------------------- staleness


def test_fresh_samples_get_unit_importance_weight() -> None:
    algo, policy = build()
    returns, lengths = [1.0, 0.0, 0.0, 0.0], [1, 3, 2, 2]
    group = make_group(returns, length=lengths, version=3)
    set_behaviour(policy, group, 0.0)
    m = algo.update([group], learner_version=3, max_staleness=2, importance_correction=True)
    assert m["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["loss"] == pytest.approx(expected_pg_loss(returns, lengths), rel=1e-4)
    assert m["staleness_mean"] == 0.0


def test_importance_weight_below_cap_is_kept() -> None:
    algo, policy = build(is_cap=2.0)
    returns, lengths = [1.0, 0.0, 0.0, 0.0], [1, 3, 2, 2]
    group = make_group(returns, length=lengths)
    set_behaviour(policy, group, -math.log(1.5))  # proximal/behaviour = 1.5 < cap
    m = algo.update([group], learner_version=1, max_staleness=2, importance_correction=True)
    assert m["is_weight_mean"] == pytest.approx(1.5, rel=1e-5)
    assert m["loss"] == pytest.approx(expected_pg_loss(returns, lengths, 1.5), rel=1e-4)


def test_stale_importance_weights_are_truncated_at_is_cap() -> None:
    algo, policy = build(is_cap=2.0)
    returns, lengths = [1.0, 0.0, 0.0, 0.0], [1, 3, 2, 2]
    group = make_group(returns, length=lengths, version=0)
    set_behaviour(policy, group, -10.0)  # the behaviour policy was far less likely: e^10
    m = algo.update([group], learner_version=2, max_staleness=2, importance_correction=True)
    assert m["is_weight_mean"] == pytest.approx(2.0)
    assert m["ess"] == pytest.approx(1.0)  # all weights equal after truncation
    assert m["loss"] == pytest.approx(expected_pg_loss(returns, lengths, 2.0), rel=1e-4)
    assert m["staleness_mean"] == 2.0
    assert m["staleness_max"] == 2.0


def test_importance_correction_off_ignores_behaviour_logprobs() -> None:
    algo, policy = build(is_cap=2.0)
    returns, lengths = [1.0, 0.0, 0.0, 0.0], [1, 3, 2, 2]
    group = make_group(returns, length=lengths)
    set_behaviour(policy, group, -10.0)
    m = algo.update([group], learner_version=2, max_staleness=2, importance_correction=False)
    assert m["is_weight_mean"] == 1.0
    assert m["loss"] == pytest.approx(expected_pg_loss(returns, lengths), rel=1e-5)


def test_staleness_is_measured_per_step() -> None:
    algo, _ = build()
    groups = [
        make_group([1, 0, 0, 0], version=[1, 2, 3, 3], length=[2, 2, 2, 2]),
    ]
    m = algo.update(groups, learner_version=3, max_staleness=2, importance_correction=False)
    assert m["staleness_max"] == 2.0
    assert m["staleness_mean"] == pytest.approx((2 + 1 + 0 + 0) / 4)


# --------------------------------------------------------------------- divergence


def test_nan_loss_raises_training_error_before_stepping() -> None:
    algo, policy = build(policy_opts={"nan_logits": True})
    before = params(policy)
    with pytest.raises(TrainingError, match=r"loss became nan at policy version 4"):
        algo.update([make_group([1, 0, 0, 0])], 4, 2, importance_correction=True)
    assert same_params(before, params(policy))


def test_nan_loss_raises_without_importance_correction() -> None:
    algo, _ = build(policy_opts={"nan_logits": True})
    with pytest.raises(TrainingError):
        algo.update([make_group([0, 1, 0, 1])], 0, 2, importance_correction=False)


def test_group_size_comes_from_options() -> None:
    algo, _ = build(group_size=6)
    assert algo.group_size == 6
