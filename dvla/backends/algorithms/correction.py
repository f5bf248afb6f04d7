"""Off-policy correction shared by algorithms: truncated importance weights and their ESS.

Asynchrony means a step may have been acted by an older policy (the behaviour policy)
than the learner's weights at the start of the update (the proximal policy). Each action
token is reweighted by ``min(pi_prox / pi_behaviour, cap)``: unbiased where the ratio is
below the cap, bounded variance everywhere (the truncation of V-trace and of Hilton et
al.'s decoupled PPO). The effective sample size says how much data those weights leave.
"""

from __future__ import annotations

import numpy as np
import torch


def importance_weights(
    proximal: torch.Tensor, behaviour: torch.Tensor, cap: float, enabled: bool
) -> torch.Tensor:
    """Per-token truncated ratios ``min(exp(prox - behaviour), cap)``; ones when disabled.

    Args:
        proximal: log-probabilities under the learner's weights before the update.
        behaviour: log-probabilities the acting policy recorded.
        cap: truncation (>= 1).
        enabled: ``pipeline.importance_correction``.
    """
    if not enabled:
        return torch.ones_like(proximal)
    return torch.exp(proximal - behaviour).clamp(max=cap)


def effective_sample_size(weights: torch.Tensor) -> float:
    """Kish's ESS as a fraction of the sample count, in (0, 1]: 1 when all weights agree."""
    w = weights.detach().flatten().double()
    denom = float(w.pow(2).sum()) * w.numel()
    return float(w.sum() ** 2 / denom) if denom > 0 else 0.0


def staleness_metrics(learner_version: int, versions: np.ndarray) -> dict[str, float]:
    """Per-step staleness of a training batch: mean, max and the share that was on-policy."""
    lag = learner_version - np.asarray(versions, np.int64)
    if lag.size == 0:
        return {"staleness_mean": 0.0, "staleness_max": 0.0, "on_policy_share": 1.0}
    return {
        "staleness_mean": float(lag.mean()),
        "staleness_max": float(lag.max()),
        "on_policy_share": float((lag == 0).mean()),
    }


def correction_metrics(weights: torch.Tensor) -> dict[str, float]:
    """Mean importance weight, ESS and the share of weights the cap truncated."""
    w = weights.detach().flatten().double()
    return {
        "is_weight_mean": float(w.mean()) if w.numel() else 1.0,
        "ess": effective_sample_size(weights),
    }
