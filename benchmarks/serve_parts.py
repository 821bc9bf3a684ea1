"""The building blocks of ``benchmarks.serve_load``: the requests (a PNG question, closed-loop HTTP clients), the
configurations it measures (our Serve apps deployed one at a time; the engine alone, ``ceiling``), the machine
record and the benchmark's model."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import os
import platform
import statistics
import tempfile
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

APP = "slime-bench"
QUESTION = "What colour is the circle?"
IMAGES = {"640x480": (640, 480), "1344x1344": (1344, 1344)}
MAIN_IMAGE = "640x480"


# --------------------------------------------------------------------------- requests


def png_url(w: int = 640, h: int = 480, shift: int = 0) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (90, 140, 60))
    x, y = w * 5 // 16 + shift, h * 5 // 16
    ImageDraw.Draw(img).ellipse((x, y, x + w * 3 // 16, y + h // 4), fill=(220, 40, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_URLS: dict[str, str] = {}


def body(max_tokens: int, image: str = MAIN_IMAGE, gamma: float | None = None, **extra) -> dict:
    if image not in _URLS:
        _URLS[image] = png_url(*IMAGES[image])
    out = {"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                     {"type": "image_url", "image_url": {"url": _URLS[image]}}]}],
           "max_tokens": max_tokens, "temperature": 0, **extra}
    if gamma is not None:
        out["gamma"] = gamma
    return out


class ClientThreads:
    """Threads running until stopped, around a ``with`` block: closed-loop clients, probes. Subclasses add their
    targets with ``spawn`` and record under ``self.lock``; leaving the block sets ``self.stop`` and joins."""

    join_s = 120.0

    def __init__(self) -> None:
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.threads: list[threading.Thread] = []

    def spawn(self, target, count: int = 1) -> None:
        self.threads += [threading.Thread(target=target, daemon=True) for _ in range(count)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.join_s)


def summarize(latencies: list[float], tokens: int, failed: int, elapsed: float, visual: float | None) -> dict:
    if not latencies:
        return {"tok_s": 0.0, "rps": 0.0, "p50": None, "p99": None, "n": 0, "failed": failed, "tok_req": None,
                "visual": visual}
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"tok_s": tokens / elapsed, "rps": len(latencies) / elapsed, "p50": q[49], "p99": q[98],
            "n": len(latencies), "failed": failed, "tok_req": tokens / len(latencies), "visual": visual}


def load(base_url: str, concurrency: int, duration_s: float, payload: dict, path: str = "/v1/chat/completions",
         visual: float | None = None, collect: list | None = None) -> dict:
    """``concurrency`` closed-loop HTTP clients for ``duration_s``: latency and output tokens of every success
    (``collect``: gets (client latency, the response's ``slime_timings``) of each)."""
    import httpx

    latencies, tokens, failures, seen, lock = [], [0], [0], [visual], threading.Lock()
    payloads, sent = (payload if isinstance(payload, list) else [payload]), [0]
    deadline = time.perf_counter() + duration_s

    def client():
        with httpx.Client(base_url=base_url, timeout=300) as c:
            while time.perf_counter() < deadline:
                with lock:  # a list of payloads (distinct images): each request the next one
                    one, sent[0] = payloads[sent[0] % len(payloads)], sent[0] + 1
                t0 = time.perf_counter()
                r = c.post(path, json=one)
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                        answer = r.json()
                        usage = answer["usage"]
                        if collect is not None:
                            collect.append((latencies[-1], answer.get("slime_timings")))
                        tokens[0] += usage["completion_tokens"]
                        if usage.get("visual_tokens") is not None:
                            seen[0] = usage["visual_tokens"]
                    else:
                        failures[0] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(latencies, tokens[0], failures[0], time.perf_counter() - start, seen[0])


# --------------------------------------------------------------------------- the configurations


def deploy(model: str, engine: str, base_url: str, max_tokens: int, replica_cpus: float, threads: int | None = None,
           env: dict | None = None) -> float:
    """Deploy ``engine``'s app (replacing the previous one) -> seconds until it answered a request. ``threads``: the
    replica's ``cpu_threads`` (what the model computes on; default Ray's for ``replica_cpus``, at least 1)."""
    import httpx
    from ray import serve

    from pipelines.serve.app import build_app

    # each engine gets only the settings it honours (build_app refuses the other's)
    batching = {"max_batch_size": 8, "batch_wait_timeout_s": 0.01} if engine == "hf" else {"max_num_seqs": 16}
    args = {"model": model, "model_id": "bench", "engine": engine, "num_cpus": replica_cpus, "cpu_threads": threads, **batching,
            "max_ongoing_requests": 32, "max_tokens": max_tokens, "max_image_pixels": 2_000_000,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 4}, "env": env or {}}
    undeploy()
    t0 = time.perf_counter()
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body(max_tokens), timeout=600)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def undeploy() -> None:
    from ray import serve

    if APP in serve.status().applications:
        serve.delete(APP)  # one configuration at a time: they never compete for the cores


def http_cells(base: str, cells: list[tuple], duration: float, max_tokens: int, *, extra: dict | None = None,
               visual: dict | None = None) -> dict:
    out = {}
    warmed, top = set(), max(c for *_, c in cells)
    for image, gamma, conc in cells:
        payload = body(max_tokens, image, gamma, **(extra or {}))
        if (image, gamma) not in warmed:  # warm-up once per image/gamma at the top concurrency (caches, batch
            warmed.add((image, gamma))    # shapes; a fresh server's first rounds are slow), not measured
            load(base, top, min(3.0, duration), payload)
        out[(image, gamma, conc)] = load(base, conc, duration, payload,
                                         visual=(visual or {}).get(image))
    return out


def ceiling(model: str, cells: list[tuple], duration: float, max_tokens: int, threads: int | None = None) -> dict:
    """The engine alone: an ``AsyncLLM`` in this process with the endpoint's settings (``ServeArgs`` defaults:
    enforce_eager, max_num_seqs 16), given the endpoint's own prompts, encoded before the clock starts.
    ``threads``: its engine core's OpenMP threads (``async_engine``'s ``cpu_threads``, as the endpoint's replica
    is given them; default: this process's, i.e. every core)."""
    from vllm.sampling_params import RequestOutputKind

    from pipelines.serve import openai as oai
    from pipelines.serve.engine import VllmChat, async_engine
    from slime.predictor import RequestLimits

    limits = RequestLimits(max_new_tokens=max_tokens, max_image_pixels=2_000_000)
    chat = VllmChat(model, limits=limits)

    async def run() -> dict:
        engine = async_engine(model, cpu_threads=threads, max_num_seqs=16)
        try:
            out, counter = {}, [0]

            async def one(prompt, params) -> int:
                counter[0] += 1
                final = None
                # a fresh prompt dict and params per request, as the endpoint builds them (vLLM may mutate both)
                fresh = {k: (v if k == "multi_modal_data" else copy.deepcopy(v)) for k, v in prompt.items()}
                async for o in engine.generate(fresh, params.clone(), request_id=f"ceil-{counter[0]}"):
                    final = o
                return len(chat.completion_ids(final.outputs[0].token_ids))

            for image, gamma, conc in cells:
                _, req = await oai.read_chat(json.dumps(body(max_tokens, image, gamma)).encode(), limits, None)
                prompt, info = chat.prompt(req)
                # as the endpoint's non-streaming path asks: one choice, the final output only
                params = chat.sampling_params(req, info, n=1, output_kind=RequestOutputKind.FINAL_ONLY)
                await asyncio.gather(*(one(prompt, params) for _ in range(4)))  # warm-up
                latencies, tokens = [], [0]
                deadline = time.perf_counter() + duration

                async def client(prompt=prompt, params=params, deadline=deadline, latencies=latencies, tokens=tokens):
                    while time.perf_counter() < deadline:
                        t0 = time.perf_counter()
                        n = await one(prompt, params)  # awaited first: `+=` would read tokens[0] before it
                        tokens[0] += n
                        latencies.append(time.perf_counter() - t0)

                start = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(conc)))
                out[(image, gamma, conc)] = summarize(latencies, tokens[0], 0, time.perf_counter() - start,
                                                      info["visual_tokens"])
            return out
        finally:
            engine.shutdown()

    return asyncio.run(run())


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16",
              "amx_int8", "asimd", "sve")
    return {"cpu": cpu, "isa": [f for f in wanted if f in flags], "cores": os.cpu_count()}



def bench_model(width: int, layers: int) -> str:
    from slime.config import replace
    from slime.presets import save_tiny_checkpoint, tiny

    cfg = tiny()
    cfg = replace(cfg, llm=replace(cfg.llm, hidden_dim=width, intermediate_dim=4 * width, num_layers=layers,
                                   num_heads=width // 64, num_kv_heads=width // 64))
    return str(save_tiny_checkpoint(os.path.join(tempfile.mkdtemp(), f"llm{width}x{layers}"), cfg=cfg))

