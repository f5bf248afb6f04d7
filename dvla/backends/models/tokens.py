"""Action and instruction tokenisers shared by model backends.

Actions are discretised per dimension into uniform bins over [-1, 1] as OpenVLA does:
a token is a bin index, its continuous value is the bin centre. Instructions use a
hashed word vocabulary so any sentence maps to ids without a tokenizer file, which keeps
the tiny model free of downloads; real VLA backends bring their own text tokenizer.
"""

from __future__ import annotations

import re
import zlib
from abc import abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn

from dvla.backends.base import Policy, PolicyOutput, SimulatorSpec
from dvla.errors import ConfigError


class ActionTokenizer:
    """Uniform per-dimension binning of continuous actions in [-1, 1]."""

    def __init__(self, bins: int = 256, low: float = -1.0, high: float = 1.0) -> None:
        if bins < 2:
            raise ValueError(f"need at least 2 action bins, got {bins}")
        self.bins = bins
        self.low = low
        self.high = high
        edges = np.linspace(low, high, bins + 1, dtype=np.float64)
        self.centers = ((edges[:-1] + edges[1:]) / 2).astype(np.float32)
        self._inner_edges = edges[1:-1]

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """Continuous actions -> int64 tokens (values outside the range are clipped)."""
        clipped = np.clip(actions, self.low, self.high)
        tokens: np.ndarray = np.digitize(clipped, self._inner_edges).astype(np.int64)
        return tokens

    def decode(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """Tokens -> continuous actions (bin centres)."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        values: np.ndarray = self.centers[tokens]
        return values


_WORD = re.compile(r"[a-z0-9]+")


class HashedWordTokenizer:
    """Lower-cased words hashed (CRC32) into ``vocab_size - 1`` buckets; id 0 is padding."""

    def __init__(self, vocab_size: int = 512, max_len: int = 16) -> None:
        self.vocab_size = vocab_size
        self.max_len = max_len
        self._cache: dict[str, np.ndarray] = {}

    def encode_one(self, text: str) -> np.ndarray:
        ids = self._cache.get(text)
        if ids is None:
            words = _WORD.findall(text.lower())[: self.max_len]
            ids = np.zeros(self.max_len, np.int64)
            for i, w in enumerate(words):
                ids[i] = 1 + zlib.crc32(w.encode()) % (self.vocab_size - 1)
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return ids

    def encode(self, texts: list[str]) -> np.ndarray:
        """``[B, max_len]`` int64 ids."""
        if not texts:
            return np.zeros((0, self.max_len), np.int64)
        return np.stack([self.encode_one(t) for t in texts])


class TokenPolicy(Policy):
    """A policy whose head gives logits over action tokens; acting and scoring follow.

    Subclasses set ``self.actions`` (an :class:`ActionTokenizer`) and ``feature_dim``,
    and implement :meth:`forward_heads`; sampling, greedy decoding, log-probabilities,
    entropy and the optional value head are the same for every such model, so they live
    here once. A model whose token logits depend on the tokens before them (an
    autoregressive language-model head) overrides :meth:`act` as well.
    """

    actions: ActionTokenizer
    temperature: float = 1.0
    #: Width of the features :meth:`forward_heads` returns (the value head's input).
    feature_dim: int = 0
    value_head: nn.Linear | None

    def __init__(self, options: Any, spec: SimulatorSpec) -> None:
        super().__init__(options, spec)
        # An instance attribute, not a class default: nn.Module finds registered
        # submodules only when ordinary lookup fails, so a class-level None would hide
        # the head enable_value_head() registers.
        self.value_head = None

    @abstractmethod
    def forward_heads(
        self, inputs: dict[str, torch.Tensor], tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token logits ``[B, D, bins]`` and features ``[B, feature_dim]``.

        Args:
            inputs: what :meth:`prepare` returned.
            tokens: the taken tokens ``[B, D]`` when scoring them (teacher forcing for
                autoregressive heads); None when acting.
        """

    def pick_camera(self, name: str | None) -> str:
        """The camera option's value, or the simulator's first camera; checked against the spec.

        Raises:
            ConfigError: the simulator has no such camera.
        """
        camera = name or next(iter(self.spec.cameras))
        if camera not in self.spec.cameras:
            raise ConfigError(
                f"model.camera: '{camera}' is not a camera of the simulator "
                f"(cameras: {', '.join(self.spec.cameras)})"
            )
        return camera

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token logits ``[B, D, bins]`` of a model whose dimensions are independent."""
        return self.forward_heads(inputs, None)[0]

    def enable_value_head(self) -> None:
        if self.value_head is not None:
            return
        if self.feature_dim <= 0:
            super().enable_value_head()
        head = nn.Linear(self.feature_dim, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        ref = next(self.parameters(), None)
        if ref is not None:
            head = head.to(device=ref.device)
        self.value_head = head

    @torch.no_grad()
    def act(
        self,
        inputs: dict[str, torch.Tensor],
        *,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logp_all = torch.log_softmax(self.logits(inputs).float() / self.temperature, dim=-1)
        tokens = sample_tokens(logp_all, deterministic, generator)
        logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        tokens, logp = tokens.cpu(), logp.cpu()
        return self.actions.decode(tokens), tokens.numpy(), logp.numpy().astype(np.float32)

    def evaluate(self, inputs: dict[str, torch.Tensor], tokens: torch.Tensor) -> PolicyOutput:
        logits, features = self.forward_heads(inputs, tokens)
        logp_all = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        values = None
        if self.value_head is not None:
            values = self.value_head(features.to(self.value_head.weight.dtype)).squeeze(-1)
            values = values.float()
        return PolicyOutput(logprobs=logp, entropy=entropy, values=values)


def sample_tokens(
    logp_all: torch.Tensor, deterministic: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per ``[..., bins]`` row of log-probabilities: sampled, or the most likely."""
    if deterministic:
        return logp_all.argmax(-1)
    nb = logp_all.shape[-1]
    flat = logp_all.exp().reshape(-1, nb).nan_to_num(nan=1.0, posinf=1.0)
    if generator is not None and generator.device != flat.device:
        flat_cpu = flat.cpu()
        return (
            torch.multinomial(flat_cpu, 1, generator=generator)
            .view(logp_all.shape[:-1])
            .to(logp_all.device)
        )
    return torch.multinomial(flat, 1, generator=generator).view(logp_all.shape[:-1])
