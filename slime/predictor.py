"""Predictor: one object that turns chat requests (text + images) into answers. Evaluation, batch
inference (Ray Data) and Ray Serve all use it, so they cannot disagree on preprocessing or decoding.

Bad input raises ``slime.errors.InputError`` with an HTTP status and an OpenAI error code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import torch
from PIL import Image

from slime.config import VisualMode
from slime.errors import ImageError, InputError
from slime.generate import GenerationParams, generate
from slime.processing import SlimeProcessor
from slime.templates import stop_strings

IMAGE = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass
class ChatRequest:
    messages: list[dict]  # [{"role": "user"|"assistant"|"system", "content": str}]
    images: list[Image.Image] = field(default_factory=list)
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    gamma: float | None = None


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: int
    # this request's own: from its batch's start on the engine to its last token (not the batch's time / size)
    latency_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """What one request may ask for: the one limits record of every engine and of the HTTP layer
    (``pipelines.serve.openai`` reads the wire-format fields, ``ChatEncoder`` the model-side ones)."""

    max_images: int = 1  # SliME is a single-image model
    max_image_pixels: int = 16_000_000
    max_image_bytes: int = 20_000_000
    max_request_bytes: int = 32_000_000
    max_prompt_tokens: int | None = None  # incl. visual tokens; default: the model's max_length
    max_new_tokens: int = 1024  # cap on a request's max_tokens / max_completion_tokens
    default_max_tokens: int = 64  # when a request names none
    allowed_url_schemes: tuple[str, ...] = ("data",)  # http/https/s3 only deliberately (server-side fetches)
    max_n: int = 8  # choices per request


class ChatEncoder:
    """Validation, templating, tokenization and generation limits of a chat request, without a model.
    Every engine (this HF Predictor, the vLLM engine in ``pipelines.serve.engine``) encodes through it, so
    they cannot disagree on what a request means."""

    def __init__(self, cfg, tokenizer, *, limits: RequestLimits | None = None,
                 mode: VisualMode | None = None) -> None:
        # the model's own visual mode unless the caller says otherwise (a converted DC release: "global")
        self.cfg, self.tokenizer, self.mode = cfg, tokenizer, mode or cfg.visual_mode
        self.limits = limits or RequestLimits()
        self.processor = SlimeProcessor(cfg, tokenizer)
        self.stops = tuple(stop_strings(cfg.template))
        self.eos_ids = {i for s in self.stops if (i := tokenizer.convert_tokens_to_ids(s)) is not None
                        and i != tokenizer.unk_token_id}
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)

    # ------------------------------------------------------------------ validation + encoding

    def validate(self, req: ChatRequest) -> list[dict]:
        if not req.messages:
            raise InputError("messages must be a non-empty list", param="messages", code="invalid_messages")
        for i, m in enumerate(req.messages):
            if m.get("role") not in ROLES:
                raise InputError(f"messages[{i}].role {m.get('role')!r} is not one of {list(ROLES)}",
                                 param=f"messages[{i}].role", code="invalid_role")
            if not isinstance(m.get("content"), str):
                raise InputError(f"messages[{i}].content must be a string", param=f"messages[{i}].content",
                                 code="invalid_content")
        if not any(m["role"] == "user" for m in req.messages):
            raise InputError("messages need at least one user message", param="messages", code="invalid_messages")
        if len(req.images) > self.limits.max_images:
            raise InputError(f"{len(req.images)} images given; this model accepts at most {self.limits.max_images}",
                             param="messages", code="too_many_images")
        for img in req.images:
            if img.width * img.height > self.limits.max_image_pixels:
                raise ImageError(f"image is {img.width}x{img.height} = {img.width * img.height} pixels; the limit is "
                                 f"{self.limits.max_image_pixels}", code="image_too_large", status=413)
        if req.gamma is not None and not 0.0 < req.gamma <= 1.0:
            raise InputError(f"gamma must be in (0, 1], got {req.gamma}", param="gamma", code="invalid_gamma")
        if req.max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {req.max_tokens}", param="max_tokens", code="invalid_value")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise InputError("temperature must be >= 0 and top_p in (0, 1]", param="temperature", code="invalid_value")
        messages = [dict(m) for m in req.messages]
        placed = sum(m["content"].count(IMAGE) for m in messages)
        if req.images and placed == 0:  # OpenAI clients send images as parts: put the placeholder first
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[first]["content"] = IMAGE + "\n" + messages[first]["content"]
        return messages

    def encode(self, req: ChatRequest, pixels: bool = True) -> dict:
        """The processed sample; ``pixels=False`` skips tiling (an engine that tiles by itself)."""
        messages = self.validate(req)
        image = req.images[0] if req.images else None
        if pixels:
            sample = self.processor({"messages": messages}, image, mode=self.mode, gamma=req.gamma,
                                    for_generation=True)
        else:
            sample = self.processor.encode(messages, image.size if image is not None else None, self.mode, req.gamma,
                                           for_generation=True)
        limit = self.limits.max_prompt_tokens or self.cfg.max_length
        if len(sample["input_ids"]) + 1 > limit:
            raise InputError(f"prompt is {len(sample['input_ids'])} tokens (including "
                             f"{int(sample['num_visual_tokens'])} visual tokens); the limit is {limit}",
                             param="messages", code="context_length_exceeded")
        return sample

    def params(self, req: ChatRequest, prompt_len: int) -> GenerationParams:
        room = self.cfg.llm.max_position - prompt_len
        return GenerationParams(max_new_tokens=max(1, min(req.max_tokens, self.limits.max_new_tokens, room)),
                                temperature=req.temperature, top_p=req.top_p,
                                stop=tuple(req.stop) + self.stops, seed=req.seed)


class Predictor:
    def __init__(self, model, tokenizer, *, model_id: str = "slime", limits: RequestLimits | None = None,
                 mode: VisualMode | None = None) -> None:
        self.model = model.eval()
        self.mode = mode or model.cfg.visual_mode  # which visual tokens are fed (default: the model's own)
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.model_id = model_id
        self.encoder = ChatEncoder(self.cfg, tokenizer, limits=limits, mode=mode)
        self.limits, self.processor = self.encoder.limits, self.encoder.processor
        self.stops, self.eos_ids = self.encoder.stops, self.encoder.eos_ids
        self._lock = threading.Lock()  # one generate at a time per replica (the model is not re-entrant)
        self.last_result: ChatResult | None = None

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: str | None = None, model_id: str | None = None,
             limits: RequestLimits | None = None, mode: VisualMode | None = None) -> Predictor:
        from slime.lora import load_model

        model, tokenizer = load_model(path, device=device, dtype=dtype)  # an adapter: its base + PEFT (unmerged)
        return cls(model, tokenizer, model_id=model_id or str(path).rstrip("/").rsplit("/", 1)[-1], limits=limits,
                   mode=mode)

    def encode(self, req: ChatRequest) -> dict:
        return self.encoder.encode(req)

    def _params(self, req: ChatRequest, prompt_len: int) -> GenerationParams:
        return self.encoder.params(req, prompt_len)

    # ------------------------------------------------------------------ generation

    def generate(self, reqs: list[ChatRequest]) -> list[ChatResult]:
        """Batched generation; validation happens first so one bad request fails alone (InputError)."""
        samples = [self.encode(r) for r in reqs]
        return self._run(reqs, samples)

    def _run(self, reqs, samples, on_text=None) -> list[ChatResult]:
        start = time.perf_counter()
        batch = self.processor.pad_for_generation(samples)
        params = [self._params(r, len(s["input_ids"])) for r, s in zip(reqs, samples)]
        gammas = [r.gamma if r.gamma is not None else self.cfg.local.gamma for r in reqs]
        with self._lock:
            outs = generate(self.model, self.tokenizer, batch, params, mode=self.mode, gamma=gammas, eos_ids=self.eos_ids,
                            on_text=on_text)
        end = time.perf_counter()
        return [ChatResult(text=o.text, finish_reason=o.finish_reason, prompt_tokens=len(s["input_ids"]),
                           completion_tokens=len(o.token_ids), visual_tokens=int(s["num_visual_tokens"]),
                           latency_s=(o.finished_at or end) - start) for o, s in zip(outs, samples)]

    def stream(self, req: ChatRequest) -> Generator[str, None, ChatResult]:
        """Text deltas as they are generated; the generator's return value is the final ChatResult
        (``StopIteration.value``; also kept in ``last_result`` for single-threaded callers).
        Generation runs in a worker thread and hands deltas over a queue."""
        import queue

        sample = self.encode(req)
        q: queue.Queue = queue.Queue()
        done = object()
        box: dict = {}

        def work():
            try:
                box["result"] = self._run([req], [sample], on_text=lambda _b, text: q.put(text))[0]
            except BaseException as e:  # surfaced in the consumer thread
                box["error"] = e
            finally:
                q.put(done)

        threading.Thread(target=work, daemon=True).start()
        while (item := q.get()) is not done:
            yield item
        if "error" in box:
            raise box["error"]
        self.last_result = box["result"]
        return box["result"]  # per-stream result: concurrent streams never read each other's usage
