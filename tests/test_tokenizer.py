"""The tiny offline tokenizer and the helpers used with real Vicuna/Llama-3 tokenizers."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from slime.tokenizer import EXTRA_SPECIAL, build_tiny_tokenizer, ensure_image_token, separator_id


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(1024)


def test_size_and_special_tokens(tok):
    assert len(tok) <= 1024
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    ids = tok.convert_tokens_to_ids(["<s>", "</s>", "<unk>", "<pad>", *EXTRA_SPECIAL])
    assert len(set(ids)) == 11 and max(ids) < len(tok)
    for special in EXTRA_SPECIAL:  # each special string is one token, not split into bytes
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]


@pytest.mark.parametrize("text", ["0123456789", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                                  "How many red circles are in the top left corner? 3", "naïve café ✓ 日本"])
def test_byte_level_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_corpus_words_are_compressed(tok):
    # Merges were learned: a common caption word is far fewer tokens than bytes.
    assert len(tok(" triangle", add_special_tokens=False)["input_ids"]) <= 2
    assert len(tok(" ASSISTANT:", add_special_tokens=False)["input_ids"]) <= 3


def test_deterministic(tok):
    assert build_tiny_tokenizer(1024).get_vocab() == tok.get_vocab()


def test_small_vocab_respected_and_too_small_rejected():
    assert len(build_tiny_tokenizer(400)) <= 400
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(100)


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\n<image>\nWhat colour is the star?<|im_end|></s>"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert len(loaded) == len(tok)
    assert loaded.convert_tokens_to_ids("<image>") == tok.convert_tokens_to_ids("<image>")
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                                 tok.pad_token_id)


def test_ensure_image_token_existing(tok):
    before = len(tok)
    assert ensure_image_token(tok) == tok.convert_tokens_to_ids("<image>")
    assert len(tok) == before


def test_ensure_image_token_adds_missing():
    raw = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, ",": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    real = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    assert "<image>" not in real.get_vocab()
    image_id = ensure_image_token(real)
    assert image_id == 3 and len(real) == 4
    assert real("hello <image>", add_special_tokens=False)["input_ids"] == [1, 3]
    assert ensure_image_token(real) == 3 and len(real) == 4  # idempotent


def test_separator_id(tok):
    assert separator_id(tok) == tok(",", add_special_tokens=False)["input_ids"][-1]
    assert tok.decode([separator_id(tok)]) == ","


def _same_tokenizer(a, b) -> None:
    texts = ["USER: <image>\nWhat colour is the big shape? ASSISTANT: blue</s>", "naïve café ✓ 日本 42",
             "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]
    assert type(a) is type(b) and len(a) == len(b) and a.chat_template == b.chat_template
    assert a.all_special_tokens == b.all_special_tokens and a.all_special_ids == b.all_special_ids
    for text in texts:
        assert a(text)["input_ids"] == b(text)["input_ids"], text
        assert a(text, add_special_tokens=False)["input_ids"] == b(text, add_special_tokens=False)["input_ids"]


def test_load_tokenizer_is_what_autotokenizer_loads(tok, tmp_path):
    """load_tokenizer skips transformers' auto classes only where they could not pick another class: same class,
    vocabulary, special tokens and ids as AutoTokenizer, for our tiny tokenizer and for a Llama-3-style release's
    tokenizer files (a checkpoint's tokenizer/ has no config.json); with a model config beside it, it is
    AutoTokenizer's own answer."""
    import shutil
    from pathlib import Path

    from slime.tokenizer import load_tokenizer

    tok.save_pretrained(tmp_path / "tiny")
    _same_tokenizer(load_tokenizer(tmp_path / "tiny"), AutoTokenizer.from_pretrained(str(tmp_path / "tiny")))
    release = Path(__file__).parent / "assets" / "upstream" / "bases" / "llama3-tiny"
    (tmp_path / "llama3").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(release / name, tmp_path / "llama3" / name)
    _same_tokenizer(load_tokenizer(tmp_path / "llama3"), AutoTokenizer.from_pretrained(str(tmp_path / "llama3")))
    _same_tokenizer(load_tokenizer(release), AutoTokenizer.from_pretrained(str(release)))
