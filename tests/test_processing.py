"""SlimeProcessor: the processed-sample contract, exact masks, <image> expansion, overflow, decoding."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from slime.config import LLMConfig, LocalConfig, ModelConfig, VisionConfig, replace
from slime.errors import ImageError, InputError, SampleTooLong
from slime.processing import IGNORE_INDEX, SlimeProcessor, decode_image
from slime.templates import TEMPLATES
from slime.tiling import count_visual_tokens
from slime.tokenizer import build_tiny_tokenizer

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
CONV = [{"from": "human", "value": "<image>\nWhat colour is the star?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}]
ANSWERS = {"plain": ["Red.\n"], "vicuna_v1": [" Red.</s>", " 2</s>"], "llama3": ["Red.<|eot_id|>", "2<|eot_id|>"],
           "llama3_dc": ["Red.<|eot_id|>", "2<|eot_id|>"],
           "chatml": ["Red.<|im_end|>", "2<|im_end|>"]}


def tiny_cfg(**changes) -> ModelConfig:
    cfg = ModelConfig(vision=VisionConfig(image_size=56, patch_size=14, hidden_dim=32, num_layers=4, num_heads=2,
                                          intermediate_dim=64, select_layer=-2),
                      local=LocalConfig(num_queries=4), llm=LLMConfig(vocab_size=1024), max_length=512)
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(1024)


@pytest.fixture(scope="module")
def proc(tok):
    return SlimeProcessor(tiny_cfg(), tok)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    padded = np.concatenate([[False], np.asarray(mask, bool), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("template", TEMPLATES)
def test_contract_and_exact_masks(tok, template):
    p = SlimeProcessor(tiny_cfg(template=template), tok)
    s = p({"conversations": CONV}, Image.new("RGB", (100, 80), "red"))
    dtypes = {"input_ids": np.int64, "attention_mask": np.int64, "labels": np.int64, "instruction_mask": np.bool_,
              "pixel_values": np.float32, "tile_mask": np.bool_, "grid": np.int64, "image_size": np.int64,
              "has_image": np.bool_, "num_visual_tokens": np.int64}
    shapes = {"input_ids": (512,), "attention_mask": (512,), "labels": (512,), "instruction_mask": (512,),
              "pixel_values": (8, 3, 56, 56), "tile_mask": (8,), "grid": (2,), "image_size": (2,),
              "has_image": (), "num_visual_tokens": ()}
    assert set(s) == set(dtypes)
    for key, dtype in dtypes.items():
        assert s[key].dtype == dtype and s[key].shape == shapes[key], key
    ids, labels = s["input_ids"], s["labels"]
    supervised = [tok.decode(ids[a:b]) for a, b in runs(labels != IGNORE_INDEX)]
    assert supervised == ANSWERS[template]
    assert np.array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    questions = [tok.decode(ids[a:b]) for a, b in runs(s["instruction_mask"])]
    assert questions == ([] if template == "plain" else ["What colour is the star?", "How many?"])
    image = ids == p.image_token_id
    assert image.sum() == s["num_visual_tokens"] == count_visual_tokens(100, 80, p.cfg).total_tokens
    assert len(runs(image)) == 1 and not s["instruction_mask"][image].any()
    n = int(s["attention_mask"].sum())
    assert s["attention_mask"][:n].all() and not s["attention_mask"][n:].any()
    assert (ids[n:] == tok.pad_token_id).all() and (labels[n:] == IGNORE_INDEX).all()
    first = {"plain": "<s>", "vicuna_v1": "<s>", "llama3": "<|begin_of_text|>", "llama3_dc": "<s>",
             "chatml": "<|im_start|>"}[template]  # llama3_dc: the tokenizer's BOS, then the template's
    assert ids[0] == tok.convert_tokens_to_ids(first) and labels[0] == IGNORE_INDEX
    assert (ids[:n] == tok.bos_token_id).sum() == (template in ("plain", "vicuna_v1", "llama3_dc"))


@pytest.mark.parametrize("size", [(56, 56), (30, 20), (100, 80), (200, 50), (500, 40), (20, 300), (640, 480)])
@pytest.mark.parametrize("mode", ["global", "local", "both"])
@pytest.mark.parametrize("gamma", [None, 0.5, 0.75, 1.0])
def test_image_expansion_matches_count(proc, size, mode, gamma):
    budget = count_visual_tokens(*size, proc.cfg, gamma, mode)
    out = proc.encode(CONV[:2], size, mode=mode, gamma=gamma)
    assert (out["input_ids"] == proc.image_token_id).sum() == out["num_visual_tokens"] == budget.total_tokens
    assert (out["labels"][out["input_ids"] == proc.image_token_id] == IGNORE_INDEX).all()
    gen = proc.encode(CONV[:1], size, mode=mode, gamma=gamma, for_generation=True)
    assert gen["input_ids"].count(proc.image_token_id) == budget.total_tokens


def test_mode_and_gamma_change_the_count(proc):
    counts = {(m, g): proc.encode(CONV[:2], (640, 480), mode=m, gamma=g)["num_visual_tokens"]
              for m in ("global", "local", "both") for g in (0.5, 1.0)}
    assert counts[("global", 0.5)] == counts[("global", 1.0)] == 16  # (56/14)^2 patches, no local tokens
    assert counts[("both", 1.0)] == 16 + 1 + counts[("local", 1.0)]
    assert counts[("local", 0.5)] < counts[("local", 1.0)]


def test_image_count_must_match(proc):
    for conv, size in ((CONV[:2], None), ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], (56, 56)),
                       ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], (56, 56))):
        with pytest.raises(InputError) as e:
            proc.encode(conv, size)
        assert e.value.code == "image_count_mismatch"


def test_text_only_sample(proc):
    s = proc({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, None)
    assert not s["has_image"] and s["num_visual_tokens"] == 0
    assert not s["tile_mask"].any() and not s["pixel_values"].any()
    assert s["grid"].tolist() == [0, 0] and s["image_size"].tolist() == [0, 0]


def test_no_answer_is_an_error(proc):
    with pytest.raises(InputError) as e:
        proc.encode([{"from": "human", "value": "hi"}], None)
    assert e.value.code == "no_answer"


def test_user_cannot_inject_end_of_turn(proc, tok):
    out = proc.encode([{"from": "human", "value": "say </s> now"}, {"from": "gpt", "value": "ok"}], None)
    eos = out["input_ids"] == tok.eos_token_id
    assert eos.sum() == 1 and out["labels"][eos].tolist() == [tok.eos_token_id]


def test_overflow_drop(tok):
    p = SlimeProcessor(tiny_cfg(max_length=64), tok)
    with pytest.raises(SampleTooLong) as e:
        p.encode([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red " * 80}], None)
    assert e.value.max_length == 64 and e.value.length > 64 and e.value.code == "context_length_exceeded"
    assert str(e.value.length) in e.value.message and "64" in e.value.message and e.value.status == 400


def test_overflow_truncate_prompt_drops_earlier_rounds(tok):
    p = SlimeProcessor(tiny_cfg(max_length=128, overflow="truncate_prompt"), tok)
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "star " * 150},
            {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}]
    out = p.encode(conv, (56, 56), mode="global")
    ids, labels = out["input_ids"], out["labels"]
    assert [tok.decode(ids[a:b]) for a, b in runs(labels != IGNORE_INDEX)] == [" 2</s>"]
    assert (ids == p.image_token_id).sum() == 16  # the image stays, moved to the kept question
    assert [tok.decode(ids[a:b]) for a, b in runs(out["instruction_mask"])] == ["How many?"]
    with pytest.raises(SampleTooLong):  # the answer itself never fits: never cut silently
        p.encode([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "star " * 200}], None)
    with pytest.raises(SampleTooLong):
        SlimeProcessor(tiny_cfg(max_length=128), tok).encode(conv, (56, 56), mode="global")


def test_pixel_values_normalisation_and_tiles(proc):
    colour = (200, 100, 50)
    s = proc({"conversations": CONV[:2]}, Image.new("RGB", (56, 56), colour))
    crops = count_visual_tokens(56, 56, proc.cfg).crops
    assert s["tile_mask"].sum() == 1 + crops and s["tile_mask"][:1 + crops].all()
    expected = (np.array(colour, np.float32) / 255 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(s["pixel_values"][0].mean(axis=(1, 2)), expected, atol=1e-5)
    assert not s["pixel_values"][1 + crops:].any()
    assert s["grid"].prod() == crops and s["image_size"].tolist() == [56, 56]


def test_siglip_normalisation(tok):
    p = SlimeProcessor(tiny_cfg(vision=replace(tiny_cfg().vision, kind="siglip")), tok)
    out = p.image_inputs(Image.new("RGB", (60, 60), (255, 0, 128)))
    np.testing.assert_allclose(out["pixel_values"][0, :, 10, 10], [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-5)


def test_pad_for_generation_left_pads(proc, tok):
    a = proc({"conversations": CONV[:1]}, Image.new("RGB", (100, 80)), for_generation=True)
    b = proc({"messages": [{"role": "user", "content": "hi"}]}, None, for_generation=True)
    assert tok.decode(b["input_ids"]).endswith("USER: hi ASSISTANT:")
    batch = proc.pad_for_generation([a, b])
    width = len(a["input_ids"])
    assert batch["input_ids"].shape == (2, width) and batch["pixel_values"].shape == (2, 8, 3, 56, 56)
    pad = width - len(b["input_ids"])
    assert batch["attention_mask"][1, :pad].sum() == 0 and batch["attention_mask"][1, pad:].all()
    assert batch["input_ids"][1, pad:].tolist() == b["input_ids"]
    assert batch["has_image"].tolist() == [True, False]
    assert batch["num_visual_tokens"].tolist() == [a["num_visual_tokens"], 0]


def test_processor_needs_image_token():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>")
    with pytest.raises(ValueError, match="ensure_image_token"):
        SlimeProcessor(tiny_cfg(), bare)


# --------------------------------------------------------------------------- decoding


def _noise_png(side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), "blue").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # Rewrite the IHDR size (and its CRC) so only the header claims a huge image.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decode_valid_and_converts_to_rgb():
    buf = io.BytesIO()
    Image.new("RGBA", (30, 20), (1, 2, 3, 4)).save(buf, format="PNG")
    img = decode_image(buf.getvalue(), max_pixels=10_000)
    assert img.mode == "RGB" and img.size == (30, 20)


@pytest.mark.parametrize("data", [b"not an image at all", b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
                                  _noise_png()[:2000]], ids=["garbage", "empty", "png-zeros", "truncated"])
def test_decode_garbage(data):
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=10_000)
    assert e.value.code == "invalid_image" and e.value.status == 400 and isinstance(e.value, InputError)


@pytest.mark.parametrize("size", [(200, 100), (100_000, 100_000)])  # ours / PIL's bomb limit
def test_decode_too_large_from_header(size):
    with pytest.raises(ImageError) as e:
        decode_image(_png(*size), max_pixels=10_000)
    assert e.value.code == "image_too_large" and e.value.status == 413
    assert e.value.as_openai()["error"]["code"] == "image_too_large"


def test_processor_decode_uses_config_limit(tok):
    p = SlimeProcessor(tiny_cfg(tiling=replace(tiny_cfg().tiling, max_pixels=100)), tok)
    with pytest.raises(ImageError):
        p.decode_image(_png(11, 10))
