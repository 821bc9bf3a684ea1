"""Serve throughput: the vLLM-backed app against today's HF app, side by side in one run.

Baseline: the HF ``Predictor`` app (``engine="hf"``, ``@serve.batch`` with max_batch_size 8). Both
serve the same checkpoint (default: the tiny vision side with a width-512, 8-layer Llama) on one
replica, the same 640x480 image and question, 32 new tokens, greedy (both engines give the same tokens:
tests/test_vllm_parity.py). For concurrency 1, 4 and 16: output tokens/s, requests/s, p50 and p99
latency, and the vLLM/HF ratios; plus each app's start time (deploy -> first answer). Targets: at
concurrency 16 at least 2.5x the HF output tokens/s; at concurrency 1 a p50 no worse than 1.3x HF's.
Run on demand, never in the test pass:

    python benchmarks/serve_load.py [--model DIR|s3://...] [--duration 15] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import tempfile
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

APP = "slime-bench"


def png_url(w: int = 640, h: int = 480) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (90, 140, 60))
    ImageDraw.Draw(img).ellipse((200, 150, 320, 260), fill=(220, 40, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What colour is the circle?"},
                                                      {"type": "image_url", "image_url": {"url": png_url()}}]}],
            "max_tokens": max_tokens, "temperature": 0}


def load(base_url: str, concurrency: int, duration_s: float, max_tokens: int) -> dict:
    """``concurrency`` closed-loop clients for ``duration_s``: latency and output tokens of every success."""
    import httpx

    payload = body(max_tokens)
    latencies, tokens, failures, lock = [], [0], [0], threading.Lock()
    deadline = time.perf_counter() + duration_s

    def client():
        with httpx.Client(base_url=base_url, timeout=300) as c:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = c.post("/v1/chat/completions", json=payload)
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        failures[0] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"tok_s": tokens[0] / elapsed, "rps": len(latencies) / elapsed, "p50": q[49], "p99": q[98],
            "n": len(latencies), "failed": failures[0]}


def deploy(model: str, engine: str, base_url: str, max_tokens: int) -> float:
    """Deploy ``engine``'s app (replacing the previous one) -> seconds until it answered a request."""
    import httpx
    from ray import serve

    from pipelines.serve.app import build_app

    # each engine gets only the settings it honours (build_app refuses the other's)
    batching = dict(max_batch_size=8, batch_wait_timeout_s=0.01) if engine == "hf" else dict(max_num_seqs=16)
    args = dict(model=model, model_id="bench", engine=engine, num_cpus=0.5, **batching,
                max_ongoing_requests=32, max_tokens=max_tokens,
                max_image_pixels=1_000_000,
                autoscaling=dict(min_replicas=1, max_replicas=1, target_ongoing_requests=4))
    if APP in serve.status().applications:
        serve.delete(APP)  # one app at a time: the engines never compete for the two cores
    t0 = time.perf_counter()
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body(max_tokens), timeout=600)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def bench_model(width: int, layers: int) -> str:
    from slime.config import replace
    from slime.presets import save_tiny_checkpoint, tiny

    cfg = tiny()
    cfg = replace(cfg, llm=replace(cfg.llm, hidden_dim=width, intermediate_dim=4 * width, num_layers=layers,
                                   num_heads=width // 64, num_kv_heads=width // 64))
    return str(save_tiny_checkpoint(os.path.join(tempfile.mkdtemp(), f"llm{width}x{layers}"), cfg=cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir or s3:// URI (default: a fresh width-512 / 8-layer one)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per cell")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for the embedded Ray")
    parser.add_argument("--llm-width", type=int, default=512)
    parser.add_argument("--llm-layers", type=int, default=8)
    args = parser.parse_args()

    import ray
    from ray import serve

    model = args.model or bench_model(args.llm_width, args.llm_layers)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"

    results: dict[tuple[str, int], dict] = {}
    starts: dict[str, float] = {}
    for engine in ("hf", "vllm"):
        starts[engine] = deploy(model, engine, base, args.max_tokens)
        load(base, 4, 3.0, args.max_tokens)  # warm-up, not measured
        for conc in (1, 4, 16):
            results[(engine, conc)] = load(base, conc, args.duration, args.max_tokens)

    print(f"\nmodel {model}, {args.max_tokens} new tokens, {args.duration:.0f} s per cell, 1 replica, 640x480 image")
    print("start (deploy -> first answer): " + ", ".join(f"{e} {s:.1f} s" for e, s in starts.items()))
    print(f"{'engine':>6} {'conc':>4} {'out tok/s':>9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'n':>5} {'fail':>4} "
          f"{'tok/s x':>7} {'p50 x':>6}")
    for (engine, conc), r in results.items():
        hf = results[("hf", conc)]
        print(f"{engine:>6} {conc:>4} {r['tok_s']:>9.1f} {r['rps']:>7.2f} {r['p50'] * 1e3:>7.0f} {r['p99'] * 1e3:>7.0f} "
              f"{r['n']:>5} {r['failed']:>4} {r['tok_s'] / hf['tok_s']:>7.2f} {r['p50'] / hf['p50']:>6.2f}")
    v16, h16 = results[("vllm", 16)], results[("hf", 16)]
    v1, h1 = results[("vllm", 1)], results[("hf", 1)]
    print(f"\ntargets: c=16 output tok/s {v16['tok_s'] / h16['tok_s']:.2f}x HF (want >= 2.5); "
          f"c=1 p50 {v1['p50'] / h1['p50']:.2f}x HF (want <= 1.3)")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
