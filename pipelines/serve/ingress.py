"""What both Serve ingresses (the HF Predictor's ``app`` and ``vllm_app``) share: the serving settings, which of
them each engine honours, the default model id, the API-key check and the OpenAI-style error bodies.

Its own module so that ``app`` (which builds either ingress) and ``vllm_app`` both import it and not each
other. Error bodies: every bad request is a 4xx with ``{"error": {message, type, param, code}}``; anything
unexpected is a 500 in the same shape (type ``server_error``), logged with its traceback, and the replica
stays healthy.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the handlers.
import dataclasses
import hmac
import json
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pipelines.serve import openai as oai
from slime.errors import InputError
from slime.predictor import RequestLimits

logger = logging.getLogger("ray.serve")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, for an app started on this machine (demo, harness)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def running_serve_port() -> int | None:
    """The HTTP port of the Serve already running on the connected Ray, or None when none runs."""
    from ray.serve.context import _get_global_client  # the running controller, if any (no public API)

    running = _get_global_client(raise_if_no_controller_running=False)
    return None if running is None else running.http_config.port


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


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's LoRAConfig accepts as max_lora_rank


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
    # CPU threads the model computes on (vLLM's engine core: OpenMP threads; hf: torch threads). Default: Ray's
    # for the replica, num_cpus rounded down, at least 1. A CPU node serving one replica gives it its cores.
    cpu_threads: int | None = None
    # custom Ray resources per replica: {"slime_worker": 1} puts each replica on its own worker node
    # (pipelines.cluster's node resources); a replica lost with its node restarts where these are free
    resources: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # replica env vars (e.g. AWS_ENDPOINT_URL of an S3-compatible store)
    autoscaling: AutoscalingArgs = field(default_factory=AutoscalingArgs)
    max_ongoing_requests: int = 16  # per replica; Serve's default 5 would silently cap batches at 5
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    max_surge_percent: int = 100  # rolling updates start replacements before stopping old replicas
    max_images_per_request: int = 1  # the model takes one image per conversation
    max_image_pixels: int = RequestLimits.max_image_pixels
    max_image_bytes: int = RequestLimits.max_image_bytes
    max_prompt_tokens: int | None = None  # prompt incl. visual tokens; default: the model's max_length
    max_tokens: int = RequestLimits.max_new_tokens  # cap on a request's max_tokens
    allowed_url_schemes: tuple[str, ...] = ("data",)  # add http/https/s3 deliberately (server-side fetches)
    api_key: str | None = None  # default: env SLIME_API_KEY; unset = no auth
    # LoRA adapters (vllm, pipelines/serve/adapters.py): the request's "model" names one; set either to enable
    adapters: dict[str, str] = field(default_factory=dict)  # {name: adapter dir or s3:// URI}, loaded at start
    lora_dir: str | None = None  # <lora_dir>/<name>/ loaded on the first request naming it (run-time adds)
    max_loras: int = 4  # adapters in one batch (vLLM's max_loras)
    max_cpu_loras: int | None = None  # adapters kept loaded per replica, least recently used evicted (>= max_loras)
    max_lora_rank: int = 16  # adapters of a higher rank are refused at load

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
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 (or unset), got {self.cpu_threads}")
        if self.num_cpus <= 0 and self.num_gpus <= 0:
            raise ValueError("num_cpus or num_gpus must be > 0")
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {list(LORA_RANKS)} (vLLM's), got {self.max_lora_rank}")
        if self.max_loras < 1 or (self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras):
            raise ValueError(f"need max_loras >= 1 and max_cpu_loras >= max_loras, got {self.max_loras}/"
                             f"{self.max_cpu_loras}")
        bad = sorted(n for n in self.adapters if not n or "/" in n or n == self.model_id)
        if bad:
            raise ValueError(f"adapters: {bad[0]!r} is not a usable adapter name (no '/', not the base's model_id)")

    def limits(self) -> RequestLimits:
        return RequestLimits(max_images=self.max_images_per_request, max_image_pixels=self.max_image_pixels,
                             max_image_bytes=self.max_image_bytes, max_prompt_tokens=self.max_prompt_tokens,
                             max_new_tokens=self.max_tokens, allowed_url_schemes=tuple(self.allowed_url_schemes),
                             max_n=self.max_n)


# Settings only one engine reads: given to the other (away from their default) they are an error naming them.
ENGINE_ONLY = {"vllm": ("enforce_eager", "max_num_seqs", "tensor_parallel_size", "max_n", "adapters", "lora_dir",
                        "max_loras", "max_cpu_loras", "max_lora_rank"),
               "hf": ("device", "max_batch_size", "batch_wait_timeout_s")}


def check_engine_settings(args: ServeArgs, engine: str) -> None:
    """ValueError naming the first setting the resolved ``engine`` cannot honour (set away from its default)."""
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(ServeArgs)}
    other = "hf" if engine == "vllm" else "vllm"
    for name in ENGINE_ONLY[other]:
        if getattr(args, name) != defaults[name]:
            raise ValueError(f"{name}={getattr(args, name)!r} is a setting of the {other} engine; the {engine} engine "
                             f"serving this model cannot honour it (remove it, or set engine={other})")


def default_model_id(uri: str, local_dir: str | Path) -> str:
    """The name clients send as "model": the checkpoint's own ``model_id`` (metadata.json), else the registry
    version for a ``versions/<id>/model`` directory, else the directory's name."""
    meta_path = Path(local_dir) / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("model_id"):
        return str(meta["model_id"])
    parts = uri.rstrip("/").rsplit("/", 2)
    return parts[-2] if len(parts) >= 2 and parts[-1] == "model" else parts[-1]


def error_response(e: InputError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.as_openai(), status_code=e.status, headers=headers)


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(oai.validation_error(list(exc.errors())))


async def _on_input(request: Request, exc: InputError) -> JSONResponse:
    return error_response(exc)


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


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return server_error(exc)


def server_error(exc: Exception) -> JSONResponse:
    return JSONResponse(oai.error_body(f"internal error: {type(exc).__name__}", type_="server_error"), status_code=500)


def install_error_handlers(api: FastAPI) -> None:
    api.add_exception_handler(RequestValidationError, _on_validation)
    api.add_exception_handler(InputError, _on_input)
    api.add_exception_handler(HTTPException, _on_http)
    api.add_exception_handler(Exception, _on_unexpected)
