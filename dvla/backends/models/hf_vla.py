"""``hf-vla``: a Hugging Face image-text-to-text VLM as a VLA policy.

The model comes from a local directory only (``local_files_only``: a run must never
reach out to the Hub, and a cluster's nodes usually cannot). PaliGemma is the tested
architecture; any model ``AutoModelForImageTextToText`` and ``AutoProcessor`` load is
accepted. The prompt is the camera image and the instruction in a fixed template
(OpenVLA's by default); actions come out in one of two ways:

* ``action_head: vocab`` (OpenVLA): the ``action_bins`` bins of every action dimension
  are the *last* ``action_bins`` token ids of the language vocabulary, bin ``b`` being id
  ``vocab_size - action_bins + b``. The D dimensions are decoded autoregressively, one
  token each, with the language-model head restricted to those ids, so each step is a
  distribution over bins and the pretrained head is the initial policy. Acting decodes
  with a KV cache; scoring (:meth:`evaluate`) teacher-forces prompt and tokens through
  one forward, and both give the same log-probabilities.
* ``action_head: head``: a new linear head on the final hidden state of the prompt
  gives all ``D x bins`` logits in parallel (one forward per action, no decoding).

Either way the features for a value head are that same hidden state, at the last prompt
position. Batches are left-padded with position ids counted from the first real token,
so a row's result does not depend on what it was batched with.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dvla import logs
from dvla.backends.base import PolicyOutput, SimulatorSpec
from dvla.backends.models.hf_vla_load import (
    HEAD_FILE,
    HF_DIR,
    apply_lora,
    cache_keyword,
    forward_params,
    freeze_vision,
    load_checkpoint,
    quiet,
    resolve_device,
    write_action_meta,
)
from dvla.backends.models.tokens import ActionTokenizer, TokenPolicy, sample_tokens
from dvla.config import BackendOptions
from dvla.data import ObsBatch
from dvla.errors import ConfigError

log = logs.get(__name__)

DEFAULT_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
DEFAULT_BINS = 256
#: Processor outputs that mean the model computes its own (multi-axis) positions.
_OWN_POSITIONS = ("image_grid_thw", "video_grid_thw")


class HFVLAOptions(BackendOptions):
    """Options of the ``hf-vla`` model."""

    path: str = Field(
        description="Local directory of a transformers image-text-to-text model (config.json, "
        "weights, processor files), e.g. one `dvla export` wrote under hf/ or "
        "`python -m dvla.testing.hf DIR` made; read offline, never from the Hub."
    )
    action_head: Literal["vocab", "head"] | None = Field(
        None,
        description="vocab: the last action_bins token ids of the vocabulary are the bins, "
        "decoded one action dimension at a time (OpenVLA); head: a linear head on the "
        "prompt's last hidden state gives every dimension at once. Default: what the "
        "directory's dvla_action.json records, else vocab.",
    )
    action_bins: int | None = Field(
        None,
        ge=2,
        description="Tokens per action dimension. Default: dvla_action.json's, else 256.",
    )
    prompt: str = Field(
        DEFAULT_PROMPT,
        description="Text after the image; {instruction} is replaced by the task's instruction.",
    )
    camera: str | None = Field(None, description="Camera to read; default the first one.")
    finetune: Literal["full", "lora"] = Field(
        "full",
        description="full: train every weight; lora: train only LoRA adapters on the "
        "language model (and the dvla heads), through peft.",
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scale numerator (scale = alpha/r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        min_length=1,
        description="Linear layers of the language model that get adapters (last name part).",
    )
    freeze_vision: bool = Field(
        False, description="Freeze the vision tower and its projector (full fine-tuning)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight dtype of the VLM; the dvla heads stay float32."
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto: cuda if available, else cpu; or cpu, cuda, cuda:N.",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")


class HFVLA(TokenPolicy):
    """The ``hf-vla`` model backend."""

    Options = HFVLAOptions
    action_head: nn.Linear | None

    def __init__(self, options: Any, spec: SimulatorSpec) -> None:
        super().__init__(options, spec)
        o: HFVLAOptions = options
        self.o = o
        self.camera = self.pick_camera(o.camera)
        if "{instruction}" not in o.prompt:
            raise ConfigError("model.prompt: must contain {instruction}, or language is ignored")
        device = resolve_device(o.device)
        ckpt = load_checkpoint(o.path, o.dtype)
        self.path = ckpt.path
        head_mode, bins = self._action_layout(ckpt.action, spec.action_dim)
        self.head_mode: str = head_mode
        self.action_dim = spec.action_dim
        self.actions = ActionTokenizer(bins)
        self.temperature = o.temperature
        model = ckpt.model
        self.processor = ckpt.processor
        # Left padding keeps every row's last prompt token in the last column, which is
        # where acting reads the action logits and appends the next token.
        self.processor.tokenizer.padding_side = "left"
        text_cfg = model.config.get_text_config()
        self.feature_dim = int(text_cfg.hidden_size)
        self._softcap: float | None = getattr(text_cfg, "final_logit_softcapping", None)
        model_type = str(getattr(model.config, "model_type", ""))
        # PaliGemma's token_type_ids mark the causal suffix (1) after the bidirectional
        # prefix (0), and its positions count from 1; elsewhere they mark image tokens.
        self._suffix_type = 1 if model_type == "paligemma" else 0
        self._pos_offset = 1 if model_type == "paligemma" else 0
        base = model.base_model
        if base is model:
            raise ConfigError(
                f"model.path: {type(model).__name__} has no separate base model to read "
                "hidden states from"
            )
        self._cache_kw = cache_keyword(base)
        self._own_positions = "position_ids" not in forward_params(base)
        self.bin_offset = 0
        self.action_head = None
        if head_mode == "vocab":
            self.bin_offset = self._check_vocab(model, bins, spec)
        else:
            self.action_head = nn.Linear(self.feature_dim, spec.action_dim * bins)
            # Zero: the initial policy is uniform over bins until RL shapes it.
            nn.init.zeros_(self.action_head.weight)
            nn.init.zeros_(self.action_head.bias)
            self._load_head("action_head", self.action_head, ckpt.heads)
        self._saved_heads = ckpt.heads
        if o.freeze_vision:
            freeze_vision(model)
        if o.finetune == "lora":
            model = apply_lora(model, o)
        self.vlm: nn.Module = model.to(device)
        if self.action_head is not None:
            self.action_head.to(device)
        self.eval()
        log.info(
            "hf-vla loaded",
            path=str(self.path),
            model_type=model_type,
            action_head=head_mode,
            action_bins=bins,
            params=sum(p.numel() for p in self.parameters()),
            trainable=sum(p.numel() for p in self.parameters() if p.requires_grad),
            device=str(device),
        )

    # ------------------------------------------------------------------ construction
    def _action_layout(self, meta: dict[str, Any] | None, action_dim: int) -> tuple[str, int]:
        """The head mode and bin count, reconciled with the directory's ``dvla_action.json``.

        Raises:
            ConfigError: the directory was trained for another action layout.
        """
        o = self.o
        head: str = o.action_head or (meta["action_head"] if meta else "vocab")
        bins: int = o.action_bins or (meta["action_bins"] if meta else DEFAULT_BINS)
        if meta is None:
            return head, bins
        where = f"{self.path}/dvla_action.json"
        if meta["action_dim"] != action_dim:
            raise ConfigError(
                f"model.path: {where} records {meta['action_dim']}-dimensional actions but the "
                f"simulator's actions have {action_dim} dimensions"
            )
        if meta["action_bins"] != bins:
            raise ConfigError(
                f"model.action_bins: {bins}, but {where} records {meta['action_bins']} bins"
            )
        if meta["action_head"] != head:
            raise ConfigError(
                f"model.action_head: {head}, but {where} records {meta['action_head']}"
            )
        return head, bins

    def _check_vocab(self, model: Any, bins: int, spec: SimulatorSpec) -> int:
        """The first bin's token id, after checking no prompt or special token is a bin.

        Raises:
            ConfigError: the vocabulary cannot hold ``bins`` tokens beside the prompts'.
        """
        lm_head = model.get_output_embeddings()
        if not isinstance(lm_head, nn.Linear):
            raise ConfigError(
                f"model.action_head: vocab needs a linear language-model head, which "
                f"{type(model).__name__} lacks; use action_head: head"
            )
        vocab = int(lm_head.out_features)
        tok = self.processor.tokenizer
        texts = [self._prompt(t.instruction) for t in spec.tasks]
        used = {int(i) for ids in tok(texts)["input_ids"] for i in ids}
        used |= {int(i) for i in tok.all_special_ids}
        used.add(int(getattr(model.config, "image_token_id", None) or 0))
        used = {i for i in used if i < vocab}
        first = vocab - bins
        if first <= max(used):
            raise ConfigError(
                f"model.action_bins: a vocabulary of {vocab} tokens is too small for {bins} "
                f"action bins: the bins would be ids {max(first, 0)}..{vocab - 1}, but the "
                f"prompts and special tokens use ids up to {max(used)}"
            )
        return first

    @staticmethod
    def _load_head(name: str, head: nn.Linear, saved: dict[str, torch.Tensor]) -> None:
        """Copy ``name.weight``/``name.bias`` from the saved heads into ``head``, if there.

        Raises:
            ConfigError: the saved head has another shape (other action layout).
        """
        weight, bias = saved.get(f"{name}.weight"), saved.get(f"{name}.bias")
        if weight is None or bias is None:
            return
        if weight.shape != head.weight.shape or bias.shape != head.bias.shape:
            raise ConfigError(
                f"model.path: {HEAD_FILE}: {name} has shape {tuple(weight.shape)}, "
                f"this model needs {tuple(head.weight.shape)}"
            )
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)

    def enable_value_head(self) -> None:
        """Add the value head; a directory dvla saved with one restores its weights."""
        super().enable_value_head()
        assert self.value_head is not None
        self._load_head("value_head", self.value_head, self._saved_heads)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        """Where the VLM's weights, and so every input tensor, live."""
        return next(self.vlm.parameters()).device

    def _hf(self) -> Any:
        """The transformers model (under the peft wrapper when fine-tuning with LoRA)."""
        if self.o.finetune == "lora":
            return self.vlm.get_base_model()  # type: ignore[operator]
        return self.vlm

    def _prompt(self, instruction: str) -> str:
        text = self.o.prompt.replace("{instruction}", instruction)
        image_token = getattr(self.processor, "image_token", None)
        if image_token and image_token not in text:
            text = image_token + text
        return text

    def _bin_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Language-model logits of the bin token ids only (``[..., bins]``)."""
        head = self._hf().get_output_embeddings()
        lo, hi = self.bin_offset, self.bin_offset + self.actions.bins
        bias = head.bias[lo:hi] if head.bias is not None else None
        logits = F.linear(hidden, head.weight[lo:hi], bias)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _backbone(
        self, inputs: dict[str, torch.Tensor], extra: torch.Tensor | None, use_cache: bool
    ) -> tuple[torch.Tensor, Any]:
        """Final hidden states ``[B, L, H]`` of the prompt followed by ``extra`` token ids."""
        kw: dict[str, Any] = dict(inputs)
        if extra is not None and extra.shape[1] > 0:
            b, k = extra.shape
            kw["input_ids"] = torch.cat([kw["input_ids"], extra], 1)
            mask = kw["attention_mask"]
            kw["attention_mask"] = torch.cat([mask, mask.new_ones(b, k)], 1)
            if "token_type_ids" in kw:
                tt = kw["token_type_ids"]
                kw["token_type_ids"] = torch.cat([tt, tt.new_full((b, k), self._suffix_type)], 1)
            if "position_ids" in kw:
                pos = kw["position_ids"]
                step = torch.arange(1, k + 1, device=pos.device, dtype=pos.dtype)
                kw["position_ids"] = torch.cat([pos, pos[:, -1:] + step], 1)
        out = self._hf().base_model(**kw, use_cache=use_cache)
        return out.last_hidden_state, (out.get(self._cache_kw) if use_cache else None)

    # ------------------------------------------------------------------ Policy
    def prepare(self, obs: ObsBatch) -> dict[str, torch.Tensor]:
        """Image of the chosen camera and the prompt, through the model's own processor."""
        img = obs.images.get(self.camera)
        if img is None:
            raise ValueError(f"observation has no camera '{self.camera}'")
        texts = [self._prompt(s) for s in obs.instructions]
        # numpy out: PaliGemma's processor calls np.array on torch tensors otherwise.
        enc = self.processor(
            images=list(np.ascontiguousarray(img)),
            text=texts,
            return_tensors="np",
            padding="longest",
            input_data_format="channels_last",
        )
        dev, dtype = self.device, next(self.vlm.parameters()).dtype
        out: dict[str, torch.Tensor] = {}
        for key, value in enc.items():
            if key == "labels":
                continue
            t = torch.from_numpy(np.asarray(value))
            out[key] = t.to(dev, dtype) if t.is_floating_point() else t.to(dev)
        if not self._own_positions and not any(k in out for k in _OWN_POSITIONS):
            # Counted from each row's first real token, so left padding moves nothing.
            mask = out["attention_mask"]
            out["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0) + self._pos_offset
        return out

    def forward_heads(
        self, inputs: dict[str, torch.Tensor], tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bin logits ``[B, D, bins]`` and the last prompt position's hidden state.

        Args:
            inputs: what :meth:`prepare` returned.
            tokens: the taken bins ``[B, D]``; the vocab head needs them (teacher forcing:
                the logits of dimension d are read after the bins of dimensions < d).

        Raises:
            ValueError: vocab head without ``tokens`` (use :meth:`act` to sample).
        """
        d = self.action_dim
        if self.action_head is not None:
            hidden, _ = self._backbone(inputs, None, use_cache=False)
            features = hidden[:, -1]
            logits = self.action_head(features.float()).view(-1, d, self.actions.bins)
            return logits, features
        if tokens is None:
            raise ValueError("the vocab action head scores given tokens; act() samples them")
        prompt_len = inputs["input_ids"].shape[1]
        extra = tokens[:, : d - 1].to(self.device) + self.bin_offset
        hidden, _ = self._backbone(inputs, extra, use_cache=False)
        at = hidden[:, prompt_len - 1 : prompt_len - 1 + d]
        return self._bin_logits(at), hidden[:, prompt_len - 1]

    @torch.no_grad()
    def act(
        self,
        inputs: dict[str, torch.Tensor],
        *,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample one bin per dimension; the vocab head decodes them with a KV cache."""
        if self.action_head is not None:
            return super().act(inputs, deterministic=deterministic, generator=generator)
        hidden, cache = self._backbone(inputs, None, use_cache=True)
        h = hidden[:, -1]
        mask = inputs["attention_mask"]
        pos = inputs.get("position_ids")
        toks: list[torch.Tensor] = []
        logps: list[torch.Tensor] = []
        for dim in range(self.action_dim):
            logp_all = torch.log_softmax(self._bin_logits(h).float() / self.temperature, -1)
            tok = sample_tokens(logp_all, deterministic, generator)
            toks.append(tok)
            logps.append(logp_all.gather(-1, tok.unsqueeze(-1)).squeeze(-1))
            if dim + 1 == self.action_dim:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            kw: dict[str, Any] = {
                "input_ids": (tok + self.bin_offset).unsqueeze(-1),
                "attention_mask": mask,
                self._cache_kw: cache,
                "use_cache": True,
            }
            if pos is not None:
                kw["position_ids"] = pos[:, -1:] + dim + 1
            out = self._hf().base_model(**kw)
            h, cache = out.last_hidden_state[:, -1], out.get(self._cache_kw)
        tokens = torch.stack(toks, 1).cpu()
        logp = torch.stack(logps, 1).cpu()
        return self.actions.decode(tokens), tokens.numpy(), logp.numpy().astype(np.float32)

    def evaluate(self, inputs: dict[str, torch.Tensor], tokens: torch.Tensor) -> PolicyOutput:
        """As :class:`TokenPolicy`, with results on ``tokens``' device (the learner's CPU)."""
        out = super().evaluate(inputs, tokens.to(self.device))
        back = tokens.device
        return PolicyOutput(
            logprobs=out.logprobs.to(back),
            entropy=out.entropy.to(back),
            values=out.values.to(back) if out.values is not None else None,
        )

    def save_pretrained(self, directory: Path) -> list[str]:
        """Write ``directory/hf``: a transformers model directory with LoRA merged.

        The merge runs on a copy, so the policy keeps training with its adapters; the
        result loads with ``AutoModelForImageTextToText.from_pretrained`` and, with the
        action record and heads beside it, as ``path`` of another ``hf-vla`` model.
        """
        out = Path(directory) / HF_DIR
        out.mkdir(parents=True, exist_ok=True)
        model = self.vlm
        if self.o.finetune == "lora":
            model = copy.deepcopy(self.vlm).merge_and_unload()  # type: ignore[operator]
        with quiet():
            model.save_pretrained(str(out))  # type: ignore[operator]
            self.processor.save_pretrained(str(out))
        write_action_meta(out, self.action_dim, self.actions.bins, self.head_mode)
        heads: dict[str, torch.Tensor] = {}
        for name, head in (("action_head", self.action_head), ("value_head", self.value_head)):
            if head is not None:
                heads[f"{name}.weight"] = head.weight.detach().cpu().contiguous().clone()
                heads[f"{name}.bias"] = head.bias.detach().cpu().contiguous().clone()
        if heads:
            from safetensors.torch import save_file

            save_file(heads, str(out / HEAD_FILE))
        return [HF_DIR]
