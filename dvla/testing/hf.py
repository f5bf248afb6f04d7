"""A tiny, randomly initialised PaliGemma checkpoint directory, built offline.

The ``hf-vla`` backend loads models only from local directories; tests and first-time
users need one that costs nothing to create and to run. :func:`make_tiny_vla` writes a
directory laid out exactly like a real checkpoint (``config.json``, ``model.safetensors``,
tokenizer and processor files, all through ``save_pretrained``), but with a model of a
few tens of thousands of parameters and a word-level tokenizer built with the
``tokenizers`` library, so nothing is downloaded. Create one from a shell with::

    python -m dvla.testing.hf runs/tiny-paligemma
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch

from dvla.backends.models.hf_vla_load import quiet, transformers_module
from dvla.backends.simulators.toy import COLORS

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")

#: Words of the default hf-vla prompt, the toy and fake simulators' instructions, and
#: common LIBERO instruction words; anything else becomes ``<unk>``.
_WORD_LIST = """
in what action should the robot take to out ? : . , '
pick up block fake task 0 1 2 3 4 5 6 7 8 9
put place open close turn on off push the a and of into onto top bottom
left right front back middle drawer cabinet bowl plate mug basket stove
microwave black white wine bottle cream cheese ketchup tomato sauce butter
milk orange juice alphabet soup salad dressing chocolate pudding box
it both near next caddy shelf rack book tray cup pot moka
"""
WORDS = (*_WORD_LIST.split(), *COLORS)


def _tokenizer(vocab_size: int) -> Any:
    """A fast tokenizer: lower-cased words, then ``<unusedN>`` fillers up to ``vocab_size``.

    The fillers give the vocabulary the tail of otherwise unused ids that the ``vocab``
    action head turns into action bins, as real VLM vocabularies have.
    """
    tf = transformers_module()
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = list(dict.fromkeys([*SPECIAL_TOKENS, *WORDS]))
    if vocab_size < len(words):
        raise ValueError(f"vocab_size must be at least {len(words)}, got {vocab_size}")
    vocab = {w: i for i, w in enumerate(words)}
    for i in range(len(words), vocab_size):
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def _image_processor(image_size: int, patch_size: int) -> Any:
    """SigLIP's image processor at ``image_size``: the PIL one where torchvision is absent."""
    tf = transformers_module()
    cls = None
    if importlib.util.find_spec("torchvision") is None:
        cls = getattr(tf, "SiglipImageProcessorPil", None)
    cls = cls or tf.SiglipImageProcessor
    proc = cls(size={"height": image_size, "width": image_size})
    proc.image_seq_length = (image_size // patch_size) ** 2
    return proc


def make_tiny_vla(
    directory: str | Path,
    *,
    vocab_size: int = 512,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a tiny PaliGemma (SigLIP vision tower + Gemma decoder) to ``directory``.

    Args:
        directory: created if missing; files in it are overwritten.
        vocab_size: rows of the embedding and language-model head; the ids past the
            words are unused fillers (the ``vocab`` action head needs ``action_bins`` of
            them at the end).
        image_size: side of the square model input (camera images are resized to it).
        patch_size: SigLIP patch side; the image becomes ``(image_size/patch_size)**2``
            tokens.
        hidden_size: width of the Gemma decoder (the SigLIP tower is half as wide).
        num_layers: layers of each of the two transformers.
        seed: seeds the weights, without touching torch's global random state.

    Returns:
        ``directory`` as a Path.

    Raises:
        ConfigError: transformers is not installed.
        ValueError: ``vocab_size`` is below the word list, or the sizes do not fit.
    """
    tf = transformers_module()
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(vocab_size)
    vision = tf.SiglipVisionConfig(
        hidden_size=max(hidden_size // 2, 8),
        intermediate_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = tf.GemmaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=max(hidden_size // 4, 4),
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = tf.PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=vocab_size,
        projection_dim=hidden_size,
        hidden_size=hidden_size,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.PaliGemmaForConditionalGeneration(config)
    processor = tf.PaliGemmaProcessor(
        image_processor=_image_processor(image_size, patch_size), tokenizer=tokenizer
    )
    with quiet():
        model.save_pretrained(str(out))
        processor.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m dvla.testing.hf DIR``: create a tiny model to try hf-vla configs with."""
    parser = argparse.ArgumentParser(
        prog="python -m dvla.testing.hf",
        description="Write a tiny random PaliGemma checkpoint for the hf-vla model backend.",
    )
    parser.add_argument("directory", type=Path, help="where to write the model")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_vla(
        args.directory, vocab_size=args.vocab_size, image_size=args.image_size, seed=args.seed
    )
    print(path)  # the CLI's whole output: where the model is
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
