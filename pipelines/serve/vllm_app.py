"""Ray Serve on the vLLM engine: our FastAPI ingress over an in-replica ``AsyncLLM``.

Why our own ingress rather than Ray Serve LLM's ``build_openai_app``: the API contract is ours and
the tests hold it -- OpenAI error bodies with our ``param``/``code`` for every bad input (checked
before the engine sees the request, by the same ``ChatEncoder`` the HF ``Predictor`` uses), the API
key checked before the body is read, the ``gamma`` field, ``usage.visual_tokens``, and images fetched
by us under the URL allow-list (vLLM's server would fetch http(s) URLs itself). Serve LLM would need
each of those re-plumbed through vLLM's OpenAI server, plus the instruction ids computed from our
template. What we keep from the vLLM side is what matters for throughput: continuous batching, the
paged KV cache with prefix caching, the multimodal caches, structured outputs and logprobs. Each
replica owns one engine (its engine-core process), so Serve autoscaling and rolling updates work as
they do for the HF app; on GPUs a replica asks for ``num_gpus=1`` (or more, with tensor parallelism).

Routes, auth, error bodies, streaming and rollout semantics are those of ``pipelines.serve.app``.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the ingress methods.
import asyncio
import dataclasses
import hashlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram

from pipelines.serve import openai as oai
from pipelines.serve import timings
from pipelines.serve.ingress import (ServeArgs, authorize, default_model_id, error_response, install_error_handlers,
                                     server_error)
from slime.config import from_dict
from slime.errors import InputError
from slime.predictor import ChatRequest, ChatResult

logger = logging.getLogger("ray.serve")

api = FastAPI(title="slime-ray (vLLM)", docs_url=None, redoc_url=None)
install_error_handlers(api)


@dataclass
class Choice:
    text: str
    finish_reason: str
    logprobs: dict | None = None


def _logprobs(chat, completion, k: int) -> dict:
    """vLLM sample logprobs -> OpenAI ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    tok = chat.tokenizer
    n = len(chat.completion_ids(completion.token_ids))

    def entry(token_id: int, lp) -> dict:
        text = lp.decoded_token if lp.decoded_token is not None else tok.decode([token_id])
        return {"token": text, "logprob": float(lp.logprob), "bytes": list(text.encode())}

    content = []
    for token_id, alts in list(zip(completion.token_ids, completion.logprobs or []))[:n]:
        item = entry(token_id, alts[token_id])
        ranked = sorted(alts.items(), key=lambda kv: kv[1].rank or 0)
        item["top_logprobs"] = [entry(t, lp) for t, lp in ranked if lp.rank is not None][:k]
        content.append(item)
    return {"content": content}


@serve.deployment(name="SlimeServer", health_check_period_s=5)
@serve.ingress(api)
class VllmServer:
    async def __init__(self, args: dict) -> None:
        from pipelines.serve.engine import VllmChat, adapter_meta, async_engine

        self._ready = False
        self.args = from_dict(ServeArgs, args)
        a = self.args
        self.limits = a.limits()
        limits = self.limits  # one record: the HTTP layer and the encoder check the same numbers
        # An adapter directory as the model: its base on the engine, the adapter answering under the model id
        meta = adapter_meta(a.model)
        self.default_adapter, adapters = None, dict(a.adapters)
        if meta:
            from slime.storage import local_copy

            name = a.model_id or default_model_id(a.model, local_copy(a.model))
            self.default_adapter = name
            adapters = {**a.adapters, name: a.model}
            a = self.args = dataclasses.replace(a, model=meta["base"]["uri"], model_id=name,
                                                mode=a.mode or meta.get("serving", {}).get("visual_mode"))
        self.chat = VllmChat(a.model, limits=limits, mode=a.mode)
        self.model_id = a.model_id or default_model_id(a.model, self.chat.local_dir)
        self.fingerprint = "fp_" + hashlib.sha256(a.model.encode()).hexdigest()[:12]
        self.m_requests = Counter("slime_requests", "chat requests by HTTP status", tag_keys=("status",))
        self.m_latency = Histogram("slime_request_latency_s", "chat request latency (s)",
                                   boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        self.m_visual = Counter("slime_visual_tokens", "visual tokens processed")
        start = time.perf_counter()
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
        # CPU: one more slot for the null adapter base requests travel through (pipelines/serve/adapters.py)
        lora = ({"enable_lora": True, "max_loras": a.max_loras + cpu, "max_lora_rank": a.max_lora_rank,
                 "max_cpu_loras": (a.max_cpu_loras or a.max_loras) + cpu} if adapters or a.lora_dir else {})
        # Encoding (template, tokenizer, tiling arithmetic) runs off the event loop, on one thread: the loop
        # keeps reading bodies and streaming outputs meanwhile, and the tokenizer is never used by two threads.
        self._encoder_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slime-encode")
        self.engine = async_engine(a.model, cpu_threads=a.cpu_threads, visual_mode=a.mode, enforce_eager=a.enforce_eager,
                                   max_num_seqs=a.max_num_seqs,
                                   **({"dtype": a.dtype} if a.dtype else {}),
                                   disable_log_stats=not timings.enabled(),  # vLLM's per-request timestamps
                                   tensor_parallel_size=a.tensor_parallel_size, **lora)
        self.adapters = None
        if lora:
            from pipelines.serve.adapters import ServedAdapters

            self.adapters = ServedAdapters(self.engine, a.model, self.chat.local_dir, adapters=adapters,
                                           lora_dir=a.lora_dir, max_lora_rank=a.max_lora_rank,
                                           mode=self.chat.encoder.mode, null_adapter=cpu)
            await self.adapters.start()
        # Warm-up: /healthz turns 200 only after one real generation (lazy init paid here).
        warm = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        await self._final(warm, 1, None, None, self._base_lora())
        self.engine_start_s = time.perf_counter() - start
        logger.info("vLLM engine for %s ready in %.1f s", a.model, self.engine_start_s)
        self._ready = True

    def check_health(self) -> None:
        if not self._ready:
            raise RuntimeError("model not loaded")
        if self.engine.errored:
            raise RuntimeError(f"vLLM engine died: {self.engine.dead_error}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        if not self._ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id, "fingerprint": self.fingerprint,
                             "engine": "vllm", "engine_start_s": round(self.engine_start_s, 2)})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        authorize(request, self.args.api_key)
        adapters = await asyncio.to_thread(self.adapters.names) if self.adapters else []
        return JSONResponse(oai.models_body(self.model_id, adapters))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        start, status = time.perf_counter(), 500
        marks = {"start": time.monotonic()} if timings.enabled() else None  # off by default: --breakdown only
        try:
            authorize(request, self.args.api_key)
            raw = await request.body()
            if marks is not None:
                marks["body"] = time.monotonic()
            parsed, req = await oai.read_chat(raw, self.limits, None if self.adapters else self.model_id, marks=marks)
            name, lora, req = await self._adapter(parsed.model, req)
            if parsed.stream:
                response = await self._stream(req, parsed.include_usage, parsed.logprobs, name, lora)
                status = 200
                return response
            usage, choices, metrics = await self._final(req, parsed.n, parsed.logprobs, parsed.response_format, lora,
                                                        marks=marks)
            if usage.visual_tokens:  # ray.util.metrics Counter.inc rejects 0
                self.m_visual.inc(usage.visual_tokens)
            status = 200
            body = oai.completion_body(oai.new_id(), name, usage, self.fingerprint, choices)
            if marks is not None:
                marks["end"] = time.monotonic()
                body["slime_timings"] = timings.request_breakdown(marks, metrics)
            return JSONResponse(body)
        except InputError as e:
            status = e.status
            return error_response(e)
        except Exception as e:  # anything unexpected: an OpenAI-style 500, the replica stays up
            logger.exception("chat completion failed")
            return server_error(e)
        finally:
            self.m_requests.inc(tags={"status": str(status)})
            self.m_latency.observe(time.perf_counter() - start)

    # ------------------------------------------------------------------ engine calls

    def _base_lora(self):
        return self.adapters.base_request() if self.adapters else None

    async def _adapter(self, model: str | None, req: ChatRequest):
        """-> (the name answered with, the LoRARequest or None, the request with the adapter's default gamma)."""
        if model in (None, self.model_id) and self.default_adapter is None:
            return self.model_id, self._base_lora(), req
        model = model or self.default_adapter
        lora, meta = await self.adapters.resolve(model)  # 404 unknown, 400 unservable
        gamma = meta.get("serving", {}).get("gamma")
        if req.gamma is None and gamma is not None:  # the gamma the adapter's phase trained at
            req = dataclasses.replace(req, gamma=float(gamma))
        return model, lora, req

    async def _submit(self, req: ChatRequest, n: int, logprobs: int | None, response_format, stream: bool, lora=None,
                      marks: dict | None = None):
        """Encode (InputError on bad input) and start the request -> (async output iterator, info)."""
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        prompt, info = await asyncio.get_running_loop().run_in_executor(self._encoder_thread, self.chat.prompt, req)
        if marks is not None:
            marks["encoded"] = time.monotonic()
        extra = {"n": n, "output_kind": RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY}
        if logprobs is not None:
            extra["logprobs"] = logprobs
        if response_format is not None:
            kind, schema = response_format
            extra["structured_outputs"] = (StructuredOutputsParams(json=schema) if kind == "json_schema"
                                           else StructuredOutputsParams(json_object=True))
        try:
            params = self.chat.sampling_params(req, info, **extra)
        except ValueError as e:  # vLLM's own checks on the combination of sampling settings
            raise InputError(f"the engine rejected the sampling settings: {e}", code="invalid_value") from None
        return self.engine.generate(prompt, params, request_id=uuid.uuid4().hex, lora_request=lora), info

    async def _final(self, req, n, logprobs, response_format, lora=None, marks: dict | None = None):
        """-> (usage, choices, vLLM's RequestStateStats or None)."""
        outputs, info = await self._submit(req, n, logprobs, response_format, stream=False, lora=lora, marks=marks)
        final = None
        try:
            async for out in outputs:
                final = out
        except ValueError as e:  # vLLM rejects what it cannot honour (e.g. an unsatisfiable schema)
            raise InputError(f"the engine rejected the request: {e}", code="invalid_value") from None
        if marks is not None:
            marks["final"] = time.monotonic()
        completions = sorted(final.outputs, key=lambda c: c.index)
        results = [self.chat.result(c, info) for c in completions]
        choices = [Choice(r.text, r.finish_reason, _logprobs(self.chat, c, logprobs) if logprobs is not None else None)
                   for r, c in zip(results, completions)]
        usage = ChatResult(text="", finish_reason="", prompt_tokens=info["prompt_tokens"],
                           completion_tokens=sum(r.completion_tokens for r in results),
                           visual_tokens=info["visual_tokens"])
        return usage, choices, getattr(final, "metrics", None)

    async def _stream(self, req: ChatRequest, include_usage: bool, logprobs: int | None, name: str,
                      lora=None) -> StreamingResponse:
        outputs, info = await self._submit(req, 1, logprobs, None, stream=True, lora=lora)
        rid, created = oai.new_id(), int(time.time())
        # Pull the first output before answering 200, so an engine-side rejection is still a 4xx.
        try:
            first = await outputs.__anext__()
        except StopAsyncIteration:
            first = None
        except ValueError as e:
            raise InputError(f"the engine rejected the request: {e}", code="invalid_value") from None

        def chunk(delta: dict, finish: str | None = None, lp: dict | None = None) -> str:
            body = oai.chunk(rid, name, created, delta, finish, self.fingerprint)
            body["choices"][0]["logprobs"] = lp
            return oai.sse(body)

        async def events():
            ids: list[int] = []
            finish = "length"
            try:
                yield chunk({"role": "assistant", "content": ""})
                out = first
                while out is not None:
                    c = out.outputs[0]
                    ids += list(c.token_ids)
                    lp = _logprobs(self.chat, c, logprobs) if logprobs is not None and c.logprobs else None
                    if c.text or lp:
                        yield chunk({"content": c.text}, None, lp)
                    if c.finish_reason is not None:
                        finish = c.finish_reason  # vLLM's own: stop, length or abort
                    out = await outputs.__anext__() if not out.finished else None
                yield chunk({}, finish)
                if include_usage:
                    n = len(self.chat.completion_ids(ids))
                    usage = ChatResult("", finish, info["prompt_tokens"], n, info["visual_tokens"])
                    yield oai.sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                   "model": name, "choices": [], "usage": oai.usage(usage)})
            except Exception as e:  # headers are sent: the error can only travel as an event
                logger.exception("stream failed")
                yield oai.sse(oai.error_body(f"internal error: {type(e).__name__}", type_="server_error"))
            finally:
                await outputs.aclose()  # also on client disconnect: vLLM aborts the request
            yield oai.SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
