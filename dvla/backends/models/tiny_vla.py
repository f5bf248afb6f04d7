"""``tiny-vla``: a small vision-language-action policy that trains in minutes on a CPU.

Image and instruction go in, one token per action dimension comes out. The layout is
the usual VLA one at toy scale: a conv image encoder conditioned on the instruction
(FiLM), instruction-to-pixel attention so language decides which part of the scene
matters and where it is, proprioception, and an action head whose logits over
``action_bins`` tokens per dimension are decoded to bin centres as OpenVLA does.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dvla.backends.base import SimulatorSpec
from dvla.backends.models.tokens import ActionTokenizer, HashedWordTokenizer, TokenPolicy
from dvla.config import BackendOptions
from dvla.data import ObsBatch


class TinyVLAOptions(BackendOptions):
    """Options of the ``tiny-vla`` model."""

    camera: str | None = Field(None, description="Camera to read; default the first one.")
    channels: tuple[int, int] = Field((16, 32), description="Conv widths of the encoder.")
    embed_dim: int = Field(32, ge=4, description="Instruction word-embedding size.")
    heads: int = Field(8, ge=1, description="Instruction-to-pixel attention heads.")
    attention_scale: float = Field(
        16.0, gt=0, description="Initial sharpness (logit multiplier) of the pixel attention."
    )
    hidden: int = Field(128, ge=8, description="Width of the fused MLP.")
    vocab_size: int = Field(512, ge=8, description="Hashed instruction vocabulary size.")
    max_instruction_words: int = Field(16, ge=1, description="Instruction words kept.")
    action_bins: int = Field(256, ge=2, description="Tokens per action dimension (OpenVLA: 256).")
    head: Literal["linear", "binned-gaussian"] = Field(
        "linear",
        description="linear: free logits per bin (OpenVLA); binned-gaussian: logits of a "
        "Gaussian evaluated at the bin centres, which learns faster from few samples.",
    )
    max_std: float = Field(
        1.0, gt=0, description="binned-gaussian: largest standard deviation, in action units."
    )
    init_std: float = Field(
        0.6, gt=0, description="binned-gaussian: initial standard deviation, in action units."
    )
    std_lr_scale: float = Field(
        5.0, gt=0, description="binned-gaussian: how much faster the spread learns than the mean."
    )
    min_std: float = Field(
        0.05, gt=0, description="binned-gaussian: smallest standard deviation, in action units."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")


class TinyVLA(TokenPolicy):
    """The ``tiny-vla`` model backend."""

    Options = TinyVLAOptions
    bin_centers: torch.Tensor

    def __init__(self, options: Any, spec: SimulatorSpec) -> None:
        super().__init__(options, spec)
        o: TinyVLAOptions = options
        self.o = o
        self.camera = self.pick_camera(o.camera)
        self.action_dim = spec.action_dim
        self.temperature = o.temperature
        self.feature_dim = o.hidden
        self.actions = ActionTokenizer(o.action_bins)
        self.words = HashedWordTokenizer(o.vocab_size, o.max_instruction_words)
        c1, c2 = o.channels
        self.conv1 = nn.Conv2d(5, c1, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.embed = nn.Embedding(o.vocab_size, o.embed_dim, padding_idx=0)
        self.film = nn.Linear(o.embed_dim, 2 * c2)
        self.query = nn.Linear(o.embed_dim, o.heads * c1)
        self.key = nn.Sequential(nn.Conv2d(3, c1, 1), nn.ReLU(), nn.Conv2d(c1, o.heads * c1, 1))
        # Sharp attention from the start: a block covers a few pixels of hundreds.
        self.att_scale = nn.Parameter(torch.tensor(float(np.log(o.attention_scale))))
        self.mlp = nn.Sequential(
            nn.Linear(o.heads * 2 + c2 + spec.proprio_dim + o.embed_dim, o.hidden),
            nn.ReLU(),
            nn.Linear(o.hidden, o.hidden),
            nn.ReLU(),
        )
        d = self.action_dim
        if o.head == "linear":
            self.head = nn.Linear(o.hidden, d * o.action_bins)
        else:
            self.head = nn.Linear(o.hidden, d)
            # State-independent spread, as in most continuous-control PPO: the mean must
            # learn to depend on the scene before the spread can collapse onto it.
            # Stored divided by std_lr_scale so the spread adapts that many times faster.
            self.log_std = nn.Parameter(
                torch.full((d,), float(np.log(o.init_std)) / o.std_lr_scale)
            )
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer(
            "bin_centers", torch.from_numpy(self.actions.centers.copy()), persistent=False
        )

    def prepare(self, obs: ObsBatch) -> dict[str, torch.Tensor]:
        img = obs.images.get(self.camera)
        if img is None:
            raise ValueError(f"observation has no camera '{self.camera}'")
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img)),
            "proprio": torch.from_numpy(np.ascontiguousarray(obs.proprio, dtype=np.float32)),
            "instruction": torch.from_numpy(self.words.encode(obs.instructions)),
        }

    def forward_heads(
        self, inputs: dict[str, torch.Tensor], tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token logits ``[B, D, bins]`` and the fused features; ``tokens`` is not needed."""
        img = inputs["image"].permute(0, 3, 1, 2).float().div_(255.0)
        b, _, h, w = img.shape
        dev = img.device
        ys = torch.linspace(-1, 1, h, device=dev).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=dev).view(1, 1, 1, w).expand(b, 1, h, w)
        x = torch.cat([img, xs, ys], dim=1)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        ids = inputs["instruction"]
        mask = (ids > 0).float().unsqueeze(-1)
        text = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        gamma, beta = self.film(text).chunk(2, dim=-1)
        x = F.relu(x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        # Language-to-pixel attention: each head matches the instruction against every
        # pixel's appearance and returns where it looked (x, y), so "where is the named
        # block" is one weighted average away and needs no position-specific weights.
        c = self.query.out_features // self.o.heads
        small = F.avg_pool2d(img, 2) if min(h, w) >= 16 else img
        sh, sw = small.shape[-2:]
        keys = self.key(small).view(b, self.o.heads, c, sh * sw)
        q = self.query(text).view(b, self.o.heads, c, 1)
        att = torch.softmax((keys * q).sum(2) * self.att_scale.exp(), dim=-1)  # [B, heads, P]
        gy, gx = torch.meshgrid(
            torch.linspace(-1, 1, sh, device=dev),
            torch.linspace(-1, 1, sw, device=dev),
            indexing="ij",
        )
        grid = torch.stack([gx.flatten(), gy.flatten()])  # [2, P]
        where = torch.einsum("bhp,kp->bhk", att, grid).flatten(1)
        feats = torch.cat([where, x.mean((2, 3)), inputs["proprio"], text], dim=1)
        hidden = self.mlp(feats)
        out = self.head(hidden)
        d, nb = self.action_dim, self.o.action_bins
        if self.o.head == "linear":
            return out.view(b, d, nb), hidden
        mean = torch.tanh(out).view(b, d)
        log_std = self.log_std.view(1, d) * self.o.std_lr_scale
        # Bounded: an unbounded std can run off to a flat distribution that no longer
        # passes gradient to the mean.
        std = log_std.exp().clamp(self.o.min_std, self.o.max_std).expand(b, d)
        z = (self.bin_centers.view(1, 1, nb) - mean.unsqueeze(-1)) / std.unsqueeze(-1)
        return -0.5 * z * z, hidden
