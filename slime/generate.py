"""Batched generation with a KV cache: greedy or nucleus sampling, per-request stop strings,
max_new_tokens and seeds, and an optional per-token callback for streaming.

The prompt (left-padded) is embedded once by ``SlimeModel.prepare_inputs`` (visual tokens spliced in),
prefilled, then decoded one token per step from the cache.

Shape legend: B batch · T prompt length · V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import time

import torch


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class GenerationOutput:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" | "length"
    finished_at: float = 0.0  # time.perf_counter() when this sequence's last token was decided


def _sample(logits: torch.Tensor, p: GenerationParams, gen: torch.Generator | None) -> int:
    """One row of logits [V] -> next sampled token id (temperature > 0; greedy rows take the argmax)."""
    probs = (logits.float() / p.temperature).softmax(-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > p.top_p  # drop tokens once the mass before them > top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


# What a byte-level tokenizer decodes the bytes of a not yet finished UTF-8 character to. Trailing ones are
# held back while generating (the next token may complete the character) and dropped when generation ends,
# as vLLM's incremental detokenizer does: the served engine and this reference give the same text.
UNFINISHED = "\ufffd"


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might be the start of a stop string or an unfinished character (not
    yet safe to stream)."""
    keep = len(text) - len(text.rstrip(UNFINISHED))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


@torch.no_grad()
def generate(model, tokenizer, batch: dict[str, torch.Tensor], params: list[GenerationParams], *,
             mode: str = "both", gamma=None, eos_ids: set[int] | None = None,
             on_text: Callable[[int, str], None] | None = None) -> list[GenerationOutput]:
    """Generate for a left-padded batch (from ``SlimeProcessor.pad_for_generation``)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    size = batch["input_ids"].shape[0]
    if len(params) != size:
        raise ValueError(f"{len(params)} generation params for a batch of {size}")
    eos_ids = set(eos_ids or ()) | {tokenizer.eos_token_id}
    gens = []
    for p in params:
        g = None
        if p.seed is not None:
            g = torch.Generator(device="cpu").manual_seed(p.seed)
        gens.append(g)
    embeds, attn, pos, _ = model.prepare_inputs(
        batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("tile_mask"),
        batch.get("grid"), batch.get("instruction_mask"), batch.get("has_image"), batch.get("vision_features"),
        mode, gamma)
    out = model.llm(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]  # [B, V]
    next_pos = pos[:, -1] + 1  # [B]
    results = [GenerationOutput() for _ in range(size)]
    streamed = [0] * size
    active = [p.max_new_tokens > 0 for p in params]
    for _step in range(max((p.max_new_tokens for p in params), default=0)):
        if not any(active):
            break
        tokens = []
        greedy = logits.argmax(-1).tolist()  # one device sync per step for every greedy row
        for b in range(size):
            if not active[b]:
                tokens.append(tokenizer.pad_token_id or 0)
                continue
            p = params[b]
            tok = greedy[b] if p.temperature <= 0 else _sample(logits[b].cpu(), p, gens[b])
            tokens.append(tok)
            res = results[b]
            if tok in eos_ids:
                res.finish_reason, active[b] = "stop", False
            else:
                res.token_ids.append(tok)
                res.text = tokenizer.decode(res.token_ids, skip_special_tokens=True)
                hit = min((res.text.find(s) for s in p.stop if s and s in res.text), default=-1)
                if hit >= 0:
                    res.text, res.finish_reason, active[b] = res.text[:hit], "stop", False
                elif len(res.token_ids) >= p.max_new_tokens:
                    active[b] = False
            if not active[b]:
                res.text, res.finished_at = res.text.rstrip(UNFINISHED), time.perf_counter()
            if on_text is not None:
                safe = len(res.text) if not active[b] else len(res.text) - _held_back(res.text, p.stop)
                if safe > streamed[b]:
                    on_text(b, res.text[streamed[b]:safe])
                    streamed[b] = safe
        if not any(active):
            break
        step_ids = torch.tensor(tokens, device=device)[:, None]
        attn = torch.cat([attn, torch.ones(size, 1, dtype=attn.dtype, device=device)], dim=1)
        out = model.llm(input_ids=step_ids, attention_mask=attn, position_ids=next_pos[:, None],
                        past_key_values=past, use_cache=True)
        past, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    return results
