"""Loading, checking and saving the files of the ``hf-vla`` model backend.

Everything that touches transformers, peft or the checkpoint directory lives here, so
:mod:`dvla.backends.models.hf_vla` stays about the policy itself. transformers and peft
are imported lazily (through :func:`transformers_module`): ``import dvla``, ``dvla
plugins`` and ``dvla validate`` must work without the ``[hf]`` extra, and mypy must not
type-check our calls against a library that is only partly annotated.

A directory this backend reads is a plain transformers model directory (``config.json``,
weights, processor and tokenizer files), plus, when dvla wrote it, ``dvla_action.json``
(the action layout the weights were trained for) and ``dvla_action_head.safetensors``
(the dedicated action head and value head, which transformers knows nothing about).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dvla.errors import ConfigError, ModelError

#: dvla's record of the action layout, beside transformers' own files.
ACTION_FILE = "dvla_action.json"
#: The action head and value head weights (safetensors), where the model has them.
HEAD_FILE = "dvla_action_head.safetensors"
#: Where :meth:`HFVLA.save_pretrained` puts the transformers directory in an export.
HF_DIR = "hf"
ACTION_FORMAT = "dvla-action/1"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Module names (last component) of vision encoders and their projectors, across the
#: image-text-to-text architectures transformers ships.
VISION_MODULES = frozenset(
    {"vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector"}
)


def transformers_module() -> Any:
    """The transformers package, or a one-line error saying how to get it.

    Raises:
        ConfigError: transformers is not installed.
    """
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ConfigError(
            "model 'hf-vla' needs transformers and peft: pip install 'dvla[hf]'"
        ) from None


def peft_module() -> Any:
    """The peft package, or a one-line error (only LoRA fine-tuning needs it).

    Raises:
        ConfigError: peft is not installed.
    """
    try:
        return importlib.import_module("peft")
    except ImportError:
        raise ConfigError("model.finetune: lora needs peft: pip install 'dvla[hf]'") from None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' progress bars, which would interleave with dvla's log lines."""
    logging = transformers_module().utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``, for wrapping library errors in one line."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read from a model directory."""

    path: Path
    model: Any  # a transformers PreTrainedModel
    processor: Any  # a transformers ProcessorMixin
    #: ``dvla_action.json``, when dvla wrote the directory.
    action: dict[str, Any] | None = None
    #: ``dvla_action_head.safetensors``: ``action_head.*`` and ``value_head.*`` tensors.
    heads: dict[str, torch.Tensor] = field(default_factory=dict)


def resolve_path(raw: str) -> Path:
    """The model directory, checked to exist and to look like a transformers model.

    Raises:
        ModelError: missing, not a directory, or without ``config.json``.
    """
    path = Path(raw).expanduser()
    if not path.exists():
        raise ModelError(f"model.path: {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"model.path: {path} is not a directory (want a model directory)")
    if not (path / "config.json").is_file():
        raise ModelError(f"model.path: {path} has no config.json: not a transformers model")
    return path


def read_action_meta(path: Path) -> dict[str, Any] | None:
    """``dvla_action.json`` of ``path``, or None where dvla did not write the directory.

    Raises:
        ModelError: the file exists but is not a valid record.
    """
    file = path / ACTION_FILE
    if not file.is_file():
        return None
    try:
        doc = json.loads(file.read_text())
        meta = {
            "action_dim": int(doc["action_dim"]),
            "action_bins": int(doc["action_bins"]),
            "action_head": str(doc["action_head"]),
        }
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{file}: unreadable action record ({first_line(err)})") from None
    if meta["action_head"] not in ("vocab", "head"):
        raise ModelError(f"{file}: unknown action_head {meta['action_head']!r}")
    return meta


def write_action_meta(path: Path, action_dim: int, action_bins: int, action_head: str) -> None:
    """Record the action layout, so a reload checks it against the simulator."""
    doc = {
        "format": ACTION_FORMAT,
        "action_dim": action_dim,
        "action_bins": action_bins,
        "action_head": action_head,
    }
    (path / ACTION_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def load_checkpoint(raw_path: str, dtype: str) -> Checkpoint:
    """Read model, processor and dvla's side files from a local directory, offline.

    The architecture is checked from ``config.json`` before any weight is read, so a
    directory holding another kind of model fails in milliseconds with its model type.

    Raises:
        ConfigError: transformers is missing.
        ModelError: the directory is missing, not an image-text-to-text model, or its
            files cannot be read.
    """
    tf = transformers_module()
    path = resolve_path(raw_path)
    try:
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise ModelError(f"model.path: {path}/config.json: {first_line(err)}") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        kind = getattr(config, "model_type", type(config).__name__)
        raise ModelError(
            f"model.path: {path} holds a '{kind}' model, not an image-text-to-text model "
            "(AutoModelForImageTextToText cannot load it)"
        )
    action = read_action_meta(path)
    # transformers 5 renamed torch_dtype to dtype and warns on the old name.
    major = int(str(tf.__version__).split(".")[0])
    dtype_kw = "dtype" if major >= 5 else "torch_dtype"
    try:
        with quiet():
            model = tf.AutoModelForImageTextToText.from_pretrained(
                str(path), local_files_only=True, **{dtype_kw: DTYPES[dtype]}
            )
            processor = tf.AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise ModelError(f"model.path: {path}: cannot load the model: {first_line(err)}") from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ModelError(
            f"model.path: {path}: the processor ({type(processor).__name__}) has no "
            "tokenizer and image processor"
        )
    heads: dict[str, torch.Tensor] = {}
    if (path / HEAD_FILE).is_file():
        from safetensors.torch import load_file

        try:
            heads = load_file(str(path / HEAD_FILE))
        except Exception as err:
            raise ModelError(f"{path / HEAD_FILE}: {first_line(err)}") from None
    return Checkpoint(path, model, processor, action, heads)


def module_names(model: nn.Module, last: frozenset[str]) -> list[str]:
    """Names of the outermost submodules whose last name component is in ``last``."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in last and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def language_model_prefix(model: nn.Module) -> str:
    """Name of the language model inside a VLM (``model.language_model`` for PaliGemma).

    Raises:
        ConfigError: the model has no submodule called ``language_model``.
    """
    names = module_names(model, frozenset({"language_model"}))
    if not names:
        raise ConfigError(
            f"model.finetune: lora: found no language_model in {type(model).__name__}"
        )
    return names[0]


def apply_lora(model: nn.Module, options: Any) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters on the language model's linear layers.

    Targets are resolved to full module names here, so the vision tower's layers of the
    same name (SigLIP has ``q_proj`` too) keep their weights frozen and untouched.

    Raises:
        ConfigError: peft missing, or none of ``lora_target_modules`` in the language model.
    """
    peft = peft_module()
    prefix = language_model_prefix(model)
    wanted = set(options.lora_target_modules)
    targets = [
        name
        for name, mod in model.named_modules()
        if name.startswith(prefix + ".")
        and name.rsplit(".", 1)[-1] in wanted
        and isinstance(mod, nn.Linear)
    ]
    if not targets:
        raise ConfigError(
            f"model.lora_target_modules: none of {sorted(wanted)} is a linear layer of "
            f"{prefix} in {type(model).__name__}"
        )
    config = peft.LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    with warnings.catch_warnings():
        # peft reads an attribute transformers 5 deprecated; nothing for a user to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        wrapped: nn.Module = peft.get_peft_model(model, config)
    return wrapped


def freeze_vision(model: nn.Module) -> int:
    """Stop gradients to the vision tower and projector; returns the parameters frozen.

    Raises:
        ConfigError: no vision module found under a known name.
    """
    names = module_names(model, VISION_MODULES)
    if not names:
        raise ConfigError(
            f"model.freeze_vision: found no vision tower in {type(model).__name__} "
            f"(looked for {', '.join(sorted(VISION_MODULES))})"
        )
    frozen = 0
    for name in names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def cache_keyword(module: nn.Module) -> str:
    """The keyword of the KV cache in ``module.forward`` (``cache`` since transformers 5)."""
    return "cache" if "cache" in forward_params(module) else "past_key_values"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda where available; a cuda device that is absent is a config error.

    Raises:
        ConfigError: cuda requested but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name} requested but torch sees no CUDA device")
    return torch.device(name)


def forward_params(module: nn.Module) -> set[str]:
    """Keyword names ``module.forward`` takes (to adapt to the architecture's signature)."""
    return set(inspect.signature(module.forward).parameters)
