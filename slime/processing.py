"""SlimeProcessor: record + image -> one fixed-shape sample of the processed-sample contract.

It renders the chat template (slime.templates), tokenizes segment by segment so label and
instruction masks are exact, expands the single ``<image>`` into ``count_visual_tokens(...)`` copies
of its id (the same count the model checks before scattering), and tiles + normalises the pixels.

Shapes: T max_length · M max tiles (1 global + crops, zero-padded) · S tile side.
    input_ids int64 [T] · attention_mask int64 [T] · labels int64 [T] · instruction_mask bool [T] (the
    text the selector scores against: the question, or the whole prompt with ``local.text='prompt'``)
    pixel_values float32 [M, 3, S, S] · tile_mask bool [M] · grid int64 [2] (cols, rows)
    image_size int64 [2] (w, h) · has_image bool [] · num_visual_tokens int64 []
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

from slime.config import ModelConfig, VisualMode
from slime.errors import ImageError, InputError, SampleTooLong
from slime.templates import IMAGE, Segment, normalize, render, split_rounds
from slime.tiling import count_visual_tokens, tile_image

IGNORE_INDEX = -100
_NORM = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
         "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> RGB image. Undecodable -> ImageError(invalid_image, 400); over ``max_pixels`` ->
    ImageError(image_too_large, 413), decided from the header before any pixel is decompressed."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or not data:
        raise ImageError("image data is empty or not bytes")
    try:
        # Our own limit governs; PIL's global MAX_IMAGE_PIXELS warning is silenced here rather than
        # changed process-wide, and its hard DecompressionBombError is mapped to 413 below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}",
                                 code="image_too_large", status=413)
            if w <= 0 or h <= 0:
                raise ImageError(f"image has an empty size {w}x{h}")
            img.load()
            return img.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is over the pixel limit: {e}", code="image_too_large", status=413) from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError...
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None


class SlimeProcessor:
    """One processor for training rows, evaluation and serving (``for_generation=True``)."""

    def __init__(self, cfg: ModelConfig, tokenizer) -> None:
        if IMAGE not in tokenizer.get_vocab():
            raise ValueError("tokenizer has no <image> token: call slime.tokenizer.ensure_image_token(tokenizer) "
                             "and resize the LLM embeddings before building the processor")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        pad = next((i for i in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
                    if i is not None), None)
        if pad is None:
            raise ValueError("tokenizer has no pad, unk or eos token to pad with")
        self.pad_token_id = pad
        # vicuna_v1/plain: the tokenizer's BOS is prepended (upstream tokenizer_image_token); llama3 writes
        # <|begin_of_text|> as text; chatml has none.
        # llama3_dc: Dense Connector's template writes <|begin_of_text|> and the tokenizer adds one more.
        self.bos_ids = ([tokenizer.bos_token_id] if cfg.template in ("plain", "vicuna_v1", "llama3_dc")
                        and tokenizer.bos_token_id is not None else [])
        mean, std = _NORM[cfg.vision.kind]
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.max_length, self.max_tiles, self.side = cfg.max_length, cfg.tiling.max_tiles, cfg.vision.image_size

    def decode_image(self, data: bytes) -> Image.Image:
        return decode_image(data, self.cfg.tiling.max_pixels)

    # ------------------------------------------------------------------ pixels

    def image_inputs(self, img: Image.Image | None) -> dict[str, np.ndarray]:
        m, s = self.max_tiles, self.side
        pixel_values = np.zeros((m, 3, s, s), np.float32)
        tile_mask = np.zeros(m, bool)
        if img is None:
            return dict(pixel_values=pixel_values, tile_mask=tile_mask, grid=np.zeros(2, np.int64),
                        image_size=np.zeros(2, np.int64))
        tiles, (cols, rows) = tile_image(img, self.cfg)  # uint8 [1+n, S, S, 3]
        n = tiles.shape[0]
        if n > m:
            raise ValueError(f"{n} tiles exceed tiling.max_tiles {m}")
        x = (tiles.astype(np.float32) / 255.0 - self.mean) / self.std  # [1+n, S, S, 3]
        pixel_values[:n] = x.transpose(0, 3, 1, 2)  # [1+n, 3, S, S]
        tile_mask[:n] = True
        return dict(pixel_values=pixel_values, tile_mask=tile_mask, grid=np.asarray([cols, rows], np.int64),
                    image_size=np.asarray(img.size, np.int64))

    # ------------------------------------------------------------------ text

    def _tokenize(self, segments: list[Segment], num_visual: int) -> tuple[list[int], list[int], list[bool]]:
        whole_prompt = self.cfg.local.text == "prompt"  # what the selector scores against (LocalConfig.text)
        ids, labels = list(self.bos_ids), [IGNORE_INDEX] * len(self.bos_ids)
        instr = [whole_prompt] * len(self.bos_ids)
        texts = [s for s in segments if s.text != IMAGE]
        encoded = {}
        # User/assistant content is tokenized with special tokens split: a "</s>" typed by a user is
        # text, not an end of turn (prompt injection), while template markup keeps its special ids.
        for literal in (False, True):
            group = [s for s in texts if s.literal == literal]
            if group:
                out = self.tokenizer([s.text for s in group], add_special_tokens=False,
                                     split_special_tokens=literal)["input_ids"]
                encoded.update({id(s): o for s, o in zip(group, out)})
        for prev, seg in zip(segments, segments[1:]):
            if seg.joined and prev.text != IMAGE:
                encoded[id(seg)] = self._continuation(prev, seg, encoded[id(prev)], encoded[id(seg)])
        for seg in segments:
            toks = [self.image_token_id] * num_visual if seg.text == IMAGE else encoded[id(seg)]
            supervised = seg.supervised and seg.text != IMAGE
            ids += toks
            labels += toks if supervised else [IGNORE_INDEX] * len(toks)
            scored = (not supervised and seg.text != IMAGE) if whole_prompt else seg.instruction
            instr += [scored] * len(toks)
        return ids, labels, instr

    def _continuation(self, prev: Segment, seg: Segment, prev_ids: list[int], own_ids: list[int]) -> list[int]:
        """``seg``'s ids as upstream gets them, tokenizing it in one string with the text before it (a
        SentencePiece tokenizer would otherwise add a word-start marker: "\nWhat" -> '<0x0A>', 'W', not
        '<0x0A>', '▁W'). Falls back to ``seg`` alone when the joint ids do not start with ``prev``'s."""
        joint = self.tokenizer(prev.text + seg.text, add_special_tokens=False,
                               split_special_tokens=seg.literal)["input_ids"]
        return joint[len(prev_ids):] if joint[:len(prev_ids)] == prev_ids else own_ids

    def encode(self, conversations: list[dict], image_size: tuple[int, int] | None, mode: VisualMode = "both",
               gamma: float | None = None, for_generation: bool = False) -> dict:
        """Template + tokenize + expand ``<image>``; padded numpy arrays, or unpadded lists when
        ``for_generation`` (then the sequence ends with the assistant header and has no labels)."""
        msgs = normalize(conversations)
        found, expected = sum(m["content"].count(IMAGE) for m in msgs), int(image_size is not None)
        if found != expected:
            raise InputError(f"conversation has {found} {IMAGE} placeholder(s) but {expected} image(s) were given",
                             param="messages", code="image_count_mismatch")
        num_visual = count_visual_tokens(*image_size, self.cfg, gamma, mode).total_tokens if expected else 0
        system, rounds = split_rounds(msgs)
        if not rounds:
            raise InputError("conversation has no user or assistant message", param="messages", code="invalid_messages")
        starts = range(len(rounds)) if self.cfg.overflow == "truncate_prompt" else range(1)
        full_length = None
        for start in starts:
            kept = [m for r in rounds[start:] for m in r]
            if expected and not any(IMAGE in m["content"] for m in kept):
                # The image belonged to a dropped round; it stays with the conversation (moved to the
                # first kept user turn) because the remaining questions are still about it.
                first = next((i for i, m in enumerate(kept) if m["role"] == "user"), None)
                if first is None:
                    break
                kept[first] = {"role": "user", "content": IMAGE + "\n" + kept[first]["content"]}
            ids, labels, instr = self._tokenize(render(self.cfg.template, system + kept, for_generation), num_visual)
            full_length = full_length or len(ids)
            if len(ids) <= self.max_length:
                break
        else:
            raise SampleTooLong(full_length, self.max_length)
        if len(ids) > self.max_length:
            raise SampleTooLong(full_length, self.max_length)
        if for_generation:
            return dict(input_ids=ids, attention_mask=[1] * len(ids), instruction_mask=instr,
                        num_visual_tokens=num_visual)
        if all(label == IGNORE_INDEX for label in labels):
            raise InputError("conversation has no assistant answer to learn from", param="messages", code="no_answer")
        pad = self.max_length - len(ids)
        return dict(input_ids=np.asarray(ids + [self.pad_token_id] * pad, np.int64),
                    attention_mask=np.asarray([1] * len(ids) + [0] * pad, np.int64),
                    labels=np.asarray(labels + [IGNORE_INDEX] * pad, np.int64),
                    instruction_mask=np.asarray(instr + [False] * pad, bool),
                    num_visual_tokens=np.asarray(num_visual, np.int64))

    # ------------------------------------------------------------------ samples

    def __call__(self, record: dict, image: Image.Image | None, mode: VisualMode = "both",
                 gamma: float | None = None, for_generation: bool = False) -> dict:
        """One sample of the contract from a LLaVA record (``conversations``) or ``messages``."""
        conversations = record.get("conversations", record.get("messages"))
        text = self.encode(conversations, image.size if image is not None else None, mode, gamma, for_generation)
        return {**text, **self.image_inputs(image), "has_image": np.asarray(image is not None),
                "num_visual_tokens": np.asarray(text["num_visual_tokens"], np.int64)}

    def pad_for_generation(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """Samples from ``__call__(..., for_generation=True)`` -> left-padded batch of tensors."""
        if not samples:
            raise ValueError("pad_for_generation needs at least one sample")
        width = max(len(s["input_ids"]) for s in samples)
        out = {"input_ids": [], "attention_mask": [], "instruction_mask": []}
        for s in samples:
            pad = width - len(s["input_ids"])
            out["input_ids"].append([self.pad_token_id] * pad + list(s["input_ids"]))
            out["attention_mask"].append([0] * pad + list(s["attention_mask"]))
            out["instruction_mask"].append([False] * pad + list(s["instruction_mask"]))
        batch = {"input_ids": torch.tensor(out["input_ids"], dtype=torch.int64),
                 "attention_mask": torch.tensor(out["attention_mask"], dtype=torch.int64),
                 "instruction_mask": torch.tensor(out["instruction_mask"], dtype=torch.bool)}
        for key, dtype in (("pixel_values", torch.float32), ("tile_mask", torch.bool), ("grid", torch.int64),
                           ("image_size", torch.int64), ("has_image", torch.bool), ("num_visual_tokens", torch.int64)):
            batch[key] = torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples]).to(dtype)
        return batch
