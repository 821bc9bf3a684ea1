"""Ray Serve app: an OpenAI-compatible ``/v1/chat/completions`` on the vLLM engine (``engine="vllm"``:
``pipelines.serve.vllm_app``) or on one HF ``Predictor`` (``engine="hf"``, the reference path, described
here; it has no ``n`` > 1, ``logprobs`` or ``response_format``). ``engine="auto"`` (default) is vllm
whenever vLLM can run the model on this machine.

``build_app(ServeArgs | dict)`` is the only way to make the app (``serve run``/``serve deploy`` use
``import_path: pipelines.serve:build_app`` with ``args``). One FastAPI ingress deployment per replica:

    POST /v1/chat/completions   non-streaming requests are dynamically batched (``@serve.batch``)
                                into ``Predictor.generate``; ``stream: true`` goes through
                                ``Predictor.stream`` as OpenAI SSE chunks ending in ``data: [DONE]``
    GET  /v1/models             the one served model
    GET  /healthz               200 once the model is loaded and warmed up, else 503

Model rollout: ``serve.run(build_app(new_args), name=<same app>)`` with a new ``model`` changes the
replica's init args, so Serve does a rolling update. ``max_surge_percent`` (default 100) starts the new
replicas first and only then drains the old ones, so no request sees a missing replica. Keep
``model_id`` stable across rollouts (clients send it); ``system_fingerprint`` names the checkpoint.
Batch size/timeout and autoscaling are "lightweight" options: changing them does not restart replicas.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the ingress methods (string
# annotations are not resolved through serve.ingress, so `request: Request` became a query parameter).
import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException

from pipelines.serve import openai as oai
from slime.config import from_dict
from slime.errors import InputError
from slime.predictor import ChatRequest, Predictor, PredictorLimits

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True, kw_only=True)
class AutoscalingArgs:
    """Serve's autoscaling_config. Defaults are production-slow; tests shorten the delays."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"autoscaling: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                             f"got {self.min_replicas}/{self.max_replicas}")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("autoscaling.look_back_period_s must exceed autoscaling.metrics_interval_s")


@dataclass(frozen=True, kw_only=True)
class ServeArgs:
    model: str  # checkpoint dir or s3:// URI (self-describing: config + weights + tokenizer)
    model_id: str | None = None  # name clients send as "model"; default: the checkpoint's model_id
    # auto = vllm when vLLM runs the model on this machine (pipelines.serve.engine.vllm_unsupported), else hf,
    # the plain-PyTorch Predictor (the reference path). Resolved once, in build_app.
    engine: Literal["auto", "vllm", "hf"] = "auto"
    enforce_eager: bool = True  # vllm: no torch.compile (starts in ~20 s instead of ~55 s on 2 cores)
    max_num_seqs: int = 16  # vllm: sequences decoded together per engine step
    tensor_parallel_size: int = 1  # vllm: GPUs per engine (13B+); give the replica as many num_gpus
    max_n: int = 8  # choices per request (vllm)
    device: str = "cpu"
    dtype: str | None = None  # default: the checkpoint's dtype
    # visual tokens fed: global / local / both; default the model's own (a converted DC release: global)
    mode: Literal["global", "local", "both"] | None = None
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    autoscaling: AutoscalingArgs = field(default_factory=AutoscalingArgs)
    max_ongoing_requests: int = 16  # per replica; Serve's default 5 would silently cap batches at 5
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    max_surge_percent: int = 100  # rolling updates start replacements before stopping old replicas
    max_images_per_request: int = 1  # the model takes one image per conversation
    max_image_pixels: int = 16_000_000
    max_image_bytes: int = 20_000_000
    max_prompt_tokens: int | None = None  # prompt incl. visual tokens; default: the model's max_length
    max_tokens: int = 1024  # cap on a request's max_tokens
    allowed_url_schemes: tuple[str, ...] = ("data",)  # add http/https/s3 deliberately (server-side fetches)
    api_key: str | None = None  # default: env SLIME_API_KEY; unset = no auth

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a checkpoint path or s3:// URI")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches never fill")
        if self.max_ongoing_requests <= self.autoscaling.target_ongoing_requests:
            raise ValueError("max_ongoing_requests must exceed autoscaling.target_ongoing_requests")
        if not 0 <= self.max_images_per_request <= 1:
            raise ValueError(f"max_images_per_request must be 0 or 1, got {self.max_images_per_request}")
        bad = sorted(set(self.allowed_url_schemes) - set(oai.URL_SCHEMES))
        if bad:
            raise ValueError(f"allowed_url_schemes: {bad} not in {list(oai.URL_SCHEMES)}")
        if self.num_cpus <= 0 and self.num_gpus <= 0:
            raise ValueError("num_cpus or num_gpus must be > 0")

    def limits(self) -> oai.Limits:
        return oai.Limits(max_images_per_request=self.max_images_per_request, max_image_pixels=self.max_image_pixels,
                          max_image_bytes=self.max_image_bytes, max_tokens=self.max_tokens,
                          allowed_url_schemes=tuple(self.allowed_url_schemes), max_n=self.max_n)


# --------------------------------------------------------------------------- FastAPI app + error bodies

api = FastAPI(title="slime-ray", docs_url=None, redoc_url=None)


def _error(e: InputError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.as_openai(), status_code=e.status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(oai.validation_error(list(exc.errors())))


@api.exception_handler(InputError)
async def _on_input(request: Request, exc: InputError) -> JSONResponse:
    return _error(exc)


@api.exception_handler(HTTPException)
async def _on_http(request: Request, exc: HTTPException) -> JSONResponse:  # 404/405 in the same shape
    return JSONResponse(oai.error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)


def authorize(request: Request, key: str | None) -> None:
    """Bearer-token check (constant-time); no key configured = no auth."""
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise InputError("missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key",
                         status=401)


@serve.deployment(name="SlimeServer", health_check_period_s=5)
@serve.ingress(api)
class SlimeServer:
    def __init__(self, args: dict) -> None:
        self._ready = False
        self.args = from_dict(ServeArgs, args)
        self.limits = self.args.limits()
        a = self.args
        limits = PredictorLimits(max_images=a.max_images_per_request, max_image_pixels=a.max_image_pixels,
                                 max_prompt_tokens=a.max_prompt_tokens, max_new_tokens=a.max_tokens)
        self.predictor = Predictor.load(a.model, device=a.device, dtype=a.dtype, model_id=a.model_id, limits=limits,
                                        mode=a.mode)
        self.model_id = self.predictor.model_id
        self.fingerprint = "fp_" + hashlib.sha256(a.model.encode()).hexdigest()[:12]
        # Model calls run in threads so the event loop stays free for health checks, batching and
        # SSE; the Predictor's own lock keeps the model single-entrant. A stream step blocks a thread
        # while it waits for its next token, so the pool is sized for many streams (threads start lazily;
        # max_ongoing_requests is not in the replica's args, to keep changing it a lightweight update).
        self._threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="slime-model")
        self.m_requests = Counter("slime_requests", "chat requests by HTTP status", tag_keys=("status",))
        self.m_latency = Histogram("slime_request_latency_s", "chat request latency (s)",
                                   boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        self.m_batch = Histogram("slime_batch_size", "requests per generate batch", boundaries=[1, 2, 4, 8, 16, 32])
        self.m_visual = Counter("slime_visual_tokens", "visual tokens processed")
        # Warm-up: the first generate pays lazy init; /healthz turns 200 only after it works.
        self.predictor.generate([ChatRequest(messages=[{"role": "user", "content": "hi"}], images=[], max_tokens=1)])
        self._ready = True

    def reconfigure(self, user_config: dict) -> None:
        """Batching knobs arrive as user_config so changing them does not restart replicas."""
        self.generate_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        self.generate_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def check_health(self) -> None:
        if not self._ready:
            raise RuntimeError("model not loaded")

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        if not self._ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id, "fingerprint": self.fingerprint, "engine": "hf"})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(oai.models_body(self.model_id))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        start, status = time.perf_counter(), 500
        try:
            self._authorize(request)
            parsed, req = await oai.read_chat(await request.body(), self.limits, self.model_id)
            for name, used in (("n", parsed.n > 1), ("logprobs", parsed.logprobs is not None),
                               ("response_format", parsed.response_format is not None)):
                if used:
                    raise InputError(f"{name} is not supported by the hf engine (serve with engine='vllm')",
                                     param=name, code="unsupported_value")
            if parsed.stream:
                response = await self._stream(req, parsed.include_usage)
                status = 200
                return response
            result = await self.generate_batch(req)
            if isinstance(result, Exception):
                raise result
            self._count_visual(result)
            status = 200
            return JSONResponse(oai.completion_body(oai.new_id(), self.model_id, result, self.fingerprint))
        except InputError as e:
            status = e.status
            return _error(e)
        finally:
            self.m_requests.inc(tags={"status": str(status)})
            self.m_latency.observe(time.perf_counter() - start)

    # ------------------------------------------------------------------ model calls

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batch(self, reqs: list[ChatRequest]) -> list:
        self.m_batch.observe(len(reqs))
        try:
            return await self._run(self.predictor.generate, reqs)
        except InputError as e:
            if len(reqs) == 1:
                return [e]
        # One bad request must not fail its batch-mates: redo the batch one request at a time and
        # hand each caller its own result or error.
        out = []
        for r in reqs:
            try:
                out.append((await self._run(self.predictor.generate, [r]))[0])
            except InputError as e:
                out.append(e)
        return out

    def _count_visual(self, result) -> None:
        if result.visual_tokens:  # ray.util.metrics Counter.inc rejects 0
            self.m_visual.inc(result.visual_tokens)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    def _step(self, stream):
        """(delta, None) or, when the stream ends, (None, final ChatResult)."""
        try:
            return next(stream), None
        except StopIteration as stop:
            # A generator's return value is race-free; ``predictor.last_result`` is shared by every
            # stream on this replica and is only the fallback.
            return None, stop.value or self.predictor.last_result

    @staticmethod
    def _close(stream) -> None:
        try:
            stream.close()
        except ValueError:  # still running a step in another thread; it ends on its own
            pass

    async def _stream(self, req: ChatRequest, include_usage: bool) -> StreamingResponse:
        stream = self.predictor.stream(req)
        # Pull the first delta before answering 200, so bad input still gets a 4xx error body.
        first, first_final = await self._run(self._step, stream)
        rid, created = oai.new_id(), int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> str:
            return oai.sse(oai.chunk(rid, self.model_id, created, delta, finish, self.fingerprint))

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                delta, result = first, first_final
                while result is None:
                    if delta:
                        yield chunk({"content": delta})
                    delta, result = await self._run(self._step, stream)
                self._count_visual(result)
                yield chunk({}, result.finish_reason)
                if include_usage:
                    yield oai.sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                   "model": self.model_id, "choices": [], "usage": oai.usage(result)})
            except InputError as e:
                yield oai.sse(e.as_openai())
            except Exception as e:  # headers are sent: the error can only travel as an event
                logger.exception("stream failed")
                yield oai.sse(oai.error_body(f"internal error: {type(e).__name__}", type_="server_error"))
            finally:
                # Also runs on client disconnect; in a thread because a step may still be in flight.
                self._threads.submit(self._close, stream)
            yield oai.SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _authorize(self, request: Request) -> None:
        authorize(request, self.args.api_key)


def build_app(args: ServeArgs | dict) -> Application:
    """Typed builder for ``serve.run``, ``serve run pipelines.serve:build_app`` and ``serve deploy``."""
    if isinstance(args, dict):
        args = from_dict(ServeArgs, args)
    if not args.api_key and os.environ.get("SLIME_API_KEY"):
        args = dataclasses.replace(args, api_key=os.environ["SLIME_API_KEY"])
    a = args.autoscaling
    # Only what the replica reads goes into init args: changing batching, resources or autoscaling
    # then stays a lightweight update instead of restarting every replica.
    replica_args = {k: v for k, v in dataclasses.asdict(args).items()
                    if k not in ("autoscaling", "num_cpus", "num_gpus", "max_ongoing_requests", "max_batch_size",
                                 "batch_wait_timeout_s", "max_surge_percent")}
    replica_args["allowed_url_schemes"] = list(args.allowed_url_schemes)
    from pipelines.serve.engine import resolve_engine

    replica_args["engine"] = resolve_engine(args.engine, args.model)
    if replica_args["engine"] == "vllm":
        from pipelines.serve.vllm_app import VllmServer

        # Continuous batching replaces @serve.batch: no batching user_config to reconfigure.
        return VllmServer.options(ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
                                  max_ongoing_requests=args.max_ongoing_requests,
                                  autoscaling_config=dataclasses.asdict(a),
                                  max_surge_percent=args.max_surge_percent).bind(replica_args)
    return SlimeServer.options(
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        max_ongoing_requests=args.max_ongoing_requests,
        autoscaling_config=dataclasses.asdict(a),
        user_config={"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
        max_surge_percent=args.max_surge_percent,
    ).bind(replica_args)
