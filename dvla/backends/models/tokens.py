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

import numpy as np
import torch

from dvla.backends.base import Policy, PolicyOutput


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

    Subclasses set ``self.actions`` (an :class:`ActionTokenizer`) and implement
    :meth:`logits`; sampling, greedy decoding, log-probabilities and entropy are the same
    for every such model, so they live here once.
    """

    actions: ActionTokenizer
    temperature: float = 1.0

    @abstractmethod
    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token logits ``[B, D, bins]``."""

    def _log_probs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.log_softmax(self.logits(inputs) / self.temperature, dim=-1)

    @torch.no_grad()
    def act(
        self,
        inputs: dict[str, torch.Tensor],
        *,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logp_all = self._log_probs(inputs)
        if deterministic:
            tokens = logp_all.argmax(-1)
        else:
            b, d, nb = logp_all.shape
            flat = logp_all.exp().view(b * d, nb).nan_to_num(nan=1.0, posinf=1.0)
            tokens = torch.multinomial(flat, 1, generator=generator).view(b, d)
        logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        tokens, logp = tokens.cpu(), logp.cpu()
        return self.actions.decode(tokens), tokens.numpy(), logp.numpy().astype(np.float32)

    def evaluate(self, inputs: dict[str, torch.Tensor], tokens: torch.Tensor) -> PolicyOutput:
        logp_all = self._log_probs(inputs)
        logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return PolicyOutput(logprobs=logp, entropy=entropy)
