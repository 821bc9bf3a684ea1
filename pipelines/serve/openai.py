"""The OpenAI chat-completions wire format for the Serve app: request schema, validation, image
loading, error bodies and SSE chunks. No Ray here, so all of it is unit-testable.

Everything the caller gets wrong becomes a ``slime.errors.InputError`` (message, param, code, status)
and leaves as ``{"error": {"message", "type": "invalid_request_error", "param", "code"}}`` — never a
500. The request is parsed by hand from bytes (not by a FastAPI body parameter) so the API key is
checked before the body and the body's size is capped before it is decoded.

Defaults that differ from OpenAI's: ``temperature`` 0 (greedy, reproducible answers; OpenAI's is 1.0) and
``max_tokens`` ``RequestLimits.default_max_tokens``. Finish reasons are the engine's own (``stop``, ``length``,
and ``abort`` when vLLM aborted the request).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slime.errors import ImageError, InputError
from slime.predictor import RequestLimits
from slime.processing import decode_image

IMAGE_TOKEN = "<image>"  # the processor's placeholder; user text may not smuggle it in
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
URL_SCHEMES = ("data", "http", "https", "s3")

# strict=True: "0.5" or true for a number is a client bug worth a 400, not something to coerce.
StrictNum = Annotated[float, Field(strict=True)]


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


# Fields a client may send that change nothing about the answer: accepted and ignored.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})


class ChatCompletionRequest(BaseModel):
    """The OpenAI fields we honour, plus ``gamma`` (kept local-token fraction). Any other field
    (``tools``, ``logit_bias``, ...) is a 400 naming it: silently ignoring it would hand the client an
    answer to a different request than the one it sent."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    temperature: Annotated[StrictNum, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictNum, Field(gt=0.0, le=1.0)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(strict=True)] | None = None
    n: Annotated[int, Field(strict=True)] | None = None
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None
    gamma: Annotated[StrictNum, Field(gt=0.0, le=1.0)] | None = None
    logprobs: Annotated[bool, Field(strict=True)] | None = None
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None


@dataclass
class ParsedChat:
    """A validated request: ``chat`` holds exactly ``slime.predictor.ChatRequest``'s fields."""

    chat: dict[str, Any]
    model: str | None
    stream: bool
    include_usage: bool
    images: list[tuple[str, str]] = field(default_factory=list)  # (url, param)
    # Engine options beyond ChatRequest: n, logprobs (None or the number of top alternatives), and
    # response_format as ("json_object", None) / ("json_schema", schema) / None.
    n: int = 1
    logprobs: int | None = None
    response_format: tuple[str, dict | None] | None = None


# --------------------------------------------------------------------------- errors


def error_body(message: str, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _param(loc: tuple) -> str | None:
    """pydantic loc -> OpenAI param: ('messages', 0, 'content', 'list[ContentPart]', 1, 'type') ->
    'messages[0].content[1].type'. Union-branch labels ('str', 'list[...]') are dropped."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "none", "function-after"):
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def validation_error(errors: list[dict]) -> InputError:
    """Pydantic/FastAPI errors -> one InputError. A union field reports one error per branch
    (``str`` and ``list[ContentPart]``); the deepest location is the branch the client meant."""
    if not errors:
        return InputError("invalid request", code="invalid_request")
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    if err.get("type") == "json_invalid":
        return InputError(f"request body is not valid JSON: {err.get('msg')}", code="invalid_json")
    param = _param(tuple(err.get("loc", ())))
    code = "missing_required_parameter" if err.get("type") == "missing" else "invalid_value"
    where = f"{param}: " if param else ""
    return InputError(f"{where}{err.get('msg', 'invalid value')}", param=param, code=code)


def parse_body(raw: bytes, limits: RequestLimits) -> ChatCompletionRequest:
    if len(raw) > limits.max_request_bytes:
        raise InputError(f"request body is {len(raw)} bytes, limit {limits.max_request_bytes}",
                         code="request_too_large", status=413)
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


# --------------------------------------------------------------------------- request -> ChatRequest


def to_chat(req: ChatCompletionRequest, limits: RequestLimits) -> ParsedChat:
    """Check everything that needs no model and flatten content parts into the predictor's messages
    (text with one ``<image>`` placeholder per image part). Images are only collected as URLs here;
    ``load_image`` fetches and decodes them."""
    extra = sorted(set(req.model_extra or {}) - IGNORED_FIELDS)
    if extra:
        raise InputError(f"{extra[0]} is not supported by this server", param=extra[0], code="unsupported_parameter")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= limits.max_n:
        raise InputError(f"n must be between 1 and {limits.max_n}, got {n}", param="n", code="invalid_value")
    if n > 1 and req.stream:
        raise InputError("n > 1 is not supported with stream=true", param="n", code="unsupported_value")
    if n > 1 and not req.temperature:
        # This server decodes greedily unless asked (temperature defaults to 0, not OpenAI's 1.0): n greedy
        # choices would be n copies of one answer, which vLLM refuses.
        raise InputError(f"n={n} needs temperature > 0 (the default temperature here is 0: greedy decoding)",
                         param="n", code="invalid_value")
    if req.top_logprobs is not None and not req.logprobs:
        raise InputError("top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
    fmt = None
    if req.response_format is not None and req.response_format.type != "text":
        if req.response_format.type == "json_schema":
            if req.response_format.json_schema is None:
                raise InputError("response_format.json_schema is required for type json_schema",
                                 param="response_format.json_schema", code="missing_required_parameter")
            fmt = ("json_schema", req.response_format.json_schema.schema_)
        else:
            fmt = ("json_object", None)
    if not req.messages:
        raise InputError("messages must be a non-empty list", param="messages", code="invalid_messages")
    messages, urls = [], []
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise InputError(f"messages[{i}].role {m.role!r} is not one of {sorted(ROLES)}",
                             param=f"messages[{i}].role", code="invalid_role")
        role = ROLES[m.role]
        if m.content is None:
            raise InputError(f"messages[{i}].content is required", param=f"messages[{i}].content",
                             code="invalid_messages")
        parts = [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        texts = []
        for j, p in enumerate(parts):
            where = f"messages[{i}].content" + (f"[{j}]" if not isinstance(m.content, str) else "")
            if p.type == "text":
                if p.text is None:
                    raise InputError(f"{where}.text is required", param=f"{where}.text", code="invalid_messages")
                if IMAGE_TOKEN in p.text:
                    raise InputError(f"{where} contains the reserved token {IMAGE_TOKEN}; send images as "
                                     "image_url parts", param=where, code="invalid_messages")
                texts.append(p.text)
            else:
                if p.image_url is None:
                    raise InputError(f"{where}.image_url is required", param=f"{where}.image_url",
                                     code="invalid_messages")
                if role != "user":
                    raise InputError(f"images are only allowed in user messages ({where})", param=where,
                                     code="invalid_messages")
                check_url_scheme(p.image_url.url, limits.allowed_url_schemes, f"{where}.image_url.url")
                urls.append((p.image_url.url, f"{where}.image_url.url"))
                texts.append(IMAGE_TOKEN)
        messages.append({"role": role, "content": "\n".join(texts)})
    if not any(m["role"] == "user" for m in messages):
        raise InputError("messages must contain a user message", param="messages", code="invalid_messages")
    if len(urls) > limits.max_images:
        raise InputError(f"{len(urls)} images in the request, limit {limits.max_images}",
                         param="messages", code="too_many_images")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise InputError("set max_tokens or max_completion_tokens, not both", param="max_tokens",
                         code="invalid_value")
    max_tokens = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_new_tokens:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise InputError(f"{param} {max_tokens} exceeds the limit {limits.max_new_tokens}", param=param,
                         code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise InputError("stop must be up to 4 non-empty strings", param="stop", code="invalid_value")
    chat = dict(messages=messages, images=[], max_tokens=max_tokens,
                temperature=0.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p), stop=stop, seed=req.seed,
                gamma=None if req.gamma is None else float(req.gamma))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ParsedChat(chat=chat, model=req.model, stream=req.stream, include_usage=include_usage, images=urls, n=n,
                      logprobs=(req.top_logprobs or 0) if req.logprobs else None, response_format=fmt)


# --------------------------------------------------------------------------- images


def check_url_scheme(url: str, allowed: tuple[str, ...], param: str) -> str:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in allowed:
        raise InputError(f"image URL scheme {scheme or '(none)'!r} is not allowed (allowed: {list(allowed)})",
                         param=param, code="invalid_image_url")
    return scheme


def _decode_data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise ImageError("image data URL must look like data:image/<type>;base64,<data>", param=param,
                         code="invalid_image_url")
    try:
        # validate=True: reject junk characters instead of silently dropping them.
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URL is not valid base64", param=param, code="invalid_base64") from None


def _fetch(url: str, scheme: str, max_bytes: int, param: str) -> bytes:
    """http(s) or s3 image, read at most ``max_bytes`` + 1 bytes (only when allow-listed)."""
    try:
        if scheme in ("http", "https"):
            import httpx

            with httpx.stream("GET", url, timeout=10.0, follow_redirects=False) as r:
                r.raise_for_status()
                data = b""
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        break
        else:
            import fsspec

            with fsspec.open(url, "rb") as f:
                data = f.read(max_bytes + 1)
    except Exception as e:  # any network/storage failure is the URL's problem, not the server's
        raise ImageError(f"could not fetch image: {type(e).__name__}: {e}", param=param,
                         code="image_fetch_failed") from None
    return data


def load_image(url: str, limits: RequestLimits, param: str = "messages") -> Image.Image:
    """Fetch and decode one image URL (``decode_image`` checks the pixel limit on the header, before
    decoding, so a decompression bomb costs nothing)."""
    scheme = check_url_scheme(url, limits.allowed_url_schemes, param)
    data = _decode_data_url(url, param) if scheme == "data" else _fetch(url, scheme, limits.max_image_bytes, param)
    if len(data) > limits.max_image_bytes:
        raise ImageError(f"image is over {limits.max_image_bytes} bytes", param=param, code="image_too_large",
                         status=413)
    try:
        return decode_image(data, limits.max_image_pixels)
    except ImageError as e:
        e.param = param  # point at the offending content part, not a generic "image"
        raise


# --------------------------------------------------------------------------- responses


def models_body(model_id: str, adapters: list[str] = ()) -> dict:
    """GET /v1/models: the model this app serves, then its LoRA adapters (``parent`` = the base, as vLLM lists)."""
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "slime-ray"},
                                       *({"id": name, "object": "model", "created": 0, "owned_by": "slime-ray",
                                          "parent": model_id} for name in adapters)]}


async def read_chat(body: bytes, limits: RequestLimits, model_id: str | None,
                    marks: dict | None = None) -> tuple[ParsedChat, Any]:
    """Body -> (the parsed request, a ``slime.predictor.ChatRequest`` with its images loaded). Both engines'
    ingresses call this, so they reject the same requests the same way. ``model_id`` None: the caller resolves
    the request's ``model`` itself (an endpoint with adapters). ``marks`` (timings on): gets the monotonic
    times parsing ended (``decode_start``) and the images were decoded (``decoded``)."""
    import asyncio
    import time

    from slime.predictor import ChatRequest

    parsed = to_chat(parse_body(body, limits), limits)
    if model_id is not None and parsed.model not in (None, model_id):
        raise InputError(f"model {parsed.model!r} is not served here (serving {model_id!r})",
                         param="model", code="model_not_found", status=404)
    if marks is not None:
        marks["decode_start"] = time.monotonic()
    images = [await asyncio.to_thread(load_image, url, limits, param) for url, param in parsed.images]
    if marks is not None:
        marks["decoded"] = time.monotonic()
    return parsed, ChatRequest(**{**parsed.chat, "images": images})


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(result: Any) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "visual_tokens": result.visual_tokens}


def completion_body(rid: str, model: str, result: Any, fingerprint: str | None = None,
                    choices: list | None = None) -> dict:
    """``result`` carries the usage; ``choices`` (default ``[result]``) are the n answers, each with an
    optional ``logprobs`` attribute already in OpenAI's ``{"content": [...]}`` shape."""
    choices = choices or [result]
    body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason, "logprobs": getattr(c, "logprobs", None)}
                        for i, c in enumerate(choices)],
            "usage": usage(result)}
    return body


def chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          fingerprint: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


SSE_DONE = sse("[DONE]")
