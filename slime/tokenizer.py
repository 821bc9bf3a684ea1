"""Tokenizers: a tiny offline byte-level BPE for tests/the tiny preset, and helpers for real ones.

``build_tiny_tokenizer`` trains deterministically on an embedded corpus of image captions and Q&A
(colours, shapes, counts, positions, the chat-template strings), so the whole pipeline runs without
downloading anything. It is byte-level, so any text encodes and digits/letters round-trip exactly.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
EXTRA_SPECIAL = [IMAGE_TOKEN, "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|im_start|>", "<|im_end|>"]

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "gray", "pink", "brown"]
_SHAPES = ["circle", "square", "triangle", "star", "rectangle", "line", "dot"]
_COUNTS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_PLACES = ["left", "right", "top", "bottom", "center", "top left corner", "top right corner",
           "bottom left corner", "bottom right corner", "middle"]
_TEMPLATE_TEXT = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: user assistant system You are a helpful assistant.",
]


def _corpus() -> list[str]:
    """Deterministic caption/Q&A sentences; order is fixed so the learned merges are too."""
    lines = list(_TEMPLATE_TEXT)
    lines.append(" ".join(str(d) for d in range(100)))
    lines.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 . , ? ! : ; ' \" ( ) - \n")
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        lines += [f"a {colour} {shape}", f"There is a {colour} {shape} in the image.",
                  f"What colour is the {shape}? The {shape} is {colour}.",
                  f"How many {colour} {shape}s are there?"]
    for i, (count, place) in enumerate(itertools.product(_COUNTS, _PLACES)):
        shape, colour = _SHAPES[i % len(_SHAPES)], _COLOURS[i % len(_COLOURS)]
        lines += [f"Which shape is in the {place}? The {colour} {shape} is in the {place} of the image.",
                  f"how many shapes are there? {count} ({i % 10})",
                  f"What does the text say? The text says {count} {colour}.",
                  f"Describe the image. The image shows {count} {colour} {shape}s on the {place}."]
    return lines


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained offline; ``len(tok) <= vocab_size``. Special tokens get ids 0..10."""
    specials = [BOS, EOS, UNK, PAD, *EXTRA_SPECIAL]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(f"vocab_size must be >= {len(specials) + len(alphabet)} for a byte-level BPE, "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, additional_special_tokens=list(EXTRA_SPECIAL),
                                   model_max_length=1 << 30, padding_side="right")


# tokenizer_config.json class names that AutoTokenizer itself resolves to the `tokenizers` backend class
_BACKEND_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained(path)``, without importing transformers' auto classes when nothing there can
    choose another class: a directory with no ``config.json`` and no ``auto_map`` whose saved class is the plain
    `tokenizers` backend (what ``build_tiny_tokenizer`` and Llama-3-style models save; a checkpoint's ``tokenizer/``)
    loads straight into that class. The auto classes cost a process ~2 s of imports (measured: 2.4-2.6 s against
    4.2-4.7 s of CPU for torch + a tokenizer), paid by every data-pipeline preprocessing actor at start-up.
    Anything else (a model config beside it, sentencepiece classes, remote code) goes through AutoTokenizer."""
    path = Path(path)
    config = path / "tokenizer_config.json"
    saved = json.loads(config.read_text()) if config.exists() else {}
    if (not (path / "config.json").exists() and "auto_map" not in saved
            and saved.get("tokenizer_class") in _BACKEND_CLASSES and (path / "tokenizer.json").exists()):
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def ensure_image_token(tokenizer) -> int:
    """Add ``<image>`` as a special token if missing (real Vicuna/Llama-3 tokenizers) and return its id.

    Added after the vocabulary it has no LLM row and needs none: ``SlimeModel`` and the vLLM adapter
    overwrite its positions before the LLM reads them, and logits never cover it (so it is never sampled).
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        # add_tokens(special_tokens=True) exists under one name across transformers 4.x/5.x (the
        # replace_*_special_tokens keyword of add_special_tokens was renamed between them).
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def separator_id(tokenizer, text: str = ",") -> int:
    """Id whose embedding separates the global and local blocks (upstream: last id of tokenizer(","))."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"separator {text!r} tokenizes to nothing")
    return ids[-1]
