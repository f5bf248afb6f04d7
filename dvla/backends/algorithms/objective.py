"""Pieces of a policy-gradient update that every algorithm spells the same way.

The clipped surrogate and the guarded optimizer step are where algorithms most easily
drift apart by accident (a missing finiteness check, clipping after the step); keeping
one copy means GRPO, PPO and third-party algorithms fail and clip identically.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dvla.errors import TrainingError


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """PPO's pessimistic objective ``min(r A, clip(r, 1 - eps, 1 + eps) A)`` per token."""
    return torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)


def clip_fraction(ratio: torch.Tensor, clip_eps: float) -> float:
    """Share of tokens whose ratio left the clip range (a step-size diagnostic)."""
    return float(((ratio - 1).abs() > clip_eps).float().mean().item())


def optimizer_step(
    loss: torch.Tensor,
    params: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None,
    learner_version: int,
) -> float:
    """Backpropagate ``loss``, clip gradients and step; return the gradient norm.

    Raises:
        TrainingError: the loss is NaN or infinite, before any weight changes.
    """
    if not torch.isfinite(loss):
        raise TrainingError(
            f"loss became {loss.item()} at policy version {learner_version}; "
            "lower the learning rate or check rewards and observations"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    norm = (
        torch.nn.utils.clip_grad_norm_(list(params), max_grad_norm)
        if max_grad_norm
        else torch.zeros(())
    )
    optimizer.step()
    return float(norm)
