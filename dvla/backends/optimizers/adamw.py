"""``adamw``: torch's AdamW, configured from YAML."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field
from torch import nn

from dvla.backends.base import OptimizerFactory
from dvla.config import BackendOptions


class AdamWOptions(BackendOptions):
    """Options of the ``adamw`` optimizer."""

    lr: float = Field(3e-4, gt=0, description="Learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam moment decays.")
    eps: float = Field(1e-8, gt=0, description="Adam denominator epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")


class AdamW(OptimizerFactory):
    """The ``adamw`` optimizer backend."""

    Options = AdamWOptions

    def build(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        o: AdamWOptions = self.options
        return torch.optim.AdamW(
            [p for p in params if p.requires_grad],
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
        )
