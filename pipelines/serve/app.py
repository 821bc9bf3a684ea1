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
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.metrics import Counter, Histogram

from pipelines.serve import openai as oai
from pipelines.serve.ingress import (  # noqa: F401
    AutoscalingArgs,
    ServeArgs,
    authorize,
    check_engine_settings,
    default_model_id,
    error_response,
    install_error_handlers,
    server_error,
)
from slime.config import from_dict
from slime.errors import InputError
from slime.predictor import ChatRequest, Predictor
from slime.storage import local_copy

logger = logging.getLogger("ray.serve")


# --------------------------------------------------------------------------- FastAPI app + error bodies

api = FastAPI(title="slime-ray", docs_url=None, redoc_url=None)
install_error_handlers(api)


@serve.deployment(name="SlimeServer", health_check_period_s=5)
@serve.ingress(api)
class SlimeServer:
    def __init__(self, args: dict) -> None:
        self._ready = False
        self.args = from_dict(ServeArgs, args)
        self.limits = self.args.limits()
        a = self.args
        limits = self.limits  # one record: the HTTP layer and the encoder check the same numbers
        if a.cpu_threads:
            torch.set_num_threads(a.cpu_threads)  # Ray set this process's threads from num_cpus (at least 1)
        self.predictor = Predictor.load(a.model, device=a.device, dtype=a.dtype, limits=limits, mode=a.mode,
                                        model_id=a.model_id or default_model_id(a.model, local_copy(a.model)))
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
            return error_response(e)
        except Exception as e:  # anything unexpected: an OpenAI-style 500, the replica stays up
            logger.exception("chat completion failed")
            return server_error(e)
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
                    if k not in ("autoscaling", "num_cpus", "num_gpus", "env", "max_ongoing_requests", "max_batch_size",
                                 "batch_wait_timeout_s", "max_surge_percent", "resources")}
    replica_args["allowed_url_schemes"] = list(args.allowed_url_schemes)
    from pipelines.serve.engine import resolve_engine

    replica_args["engine"] = resolve_engine(args.engine, args.model)
    check_engine_settings(args, replica_args["engine"])
    actor = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
             **({"resources": dict(args.resources)} if args.resources else {}),
             **({"runtime_env": {"env_vars": dict(args.env)}} if args.env else {})}
    if replica_args["engine"] == "vllm":
        from pipelines.serve.vllm_app import VllmServer

        # Continuous batching replaces @serve.batch: no batching user_config to reconfigure.
        return VllmServer.options(ray_actor_options=actor,
                                  max_ongoing_requests=args.max_ongoing_requests,
                                  autoscaling_config=dataclasses.asdict(a),
                                  max_surge_percent=args.max_surge_percent).bind(replica_args)
    return SlimeServer.options(
        ray_actor_options=actor,
        max_ongoing_requests=args.max_ongoing_requests,
        autoscaling_config=dataclasses.asdict(a),
        user_config={"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
        max_surge_percent=args.max_surge_percent,
    ).bind(replica_args)
