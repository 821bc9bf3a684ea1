"""Serve throughput with dynamic batching (max_batch_size 8) against no batching (max_batch_size 1).

Baseline: the same app and replica with ``max_batch_size=1``. For concurrency 1, 4 and 16 it reports
requests/s, p50 and p99 latency and the batched/unbatched throughput ratio (one fixed replica, so
batching is the only difference). A last phase turns autoscaling on (1..2 replicas) under
concurrency 16 and prints the replica count over time. Run on demand, never in the test pass:

    python benchmarks/serve_load.py [--model DIR|s3://...] [--duration 10] [--max-tokens 16]
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

os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

APP = "slime-bench"


def png_url(w: int = 640, h: int = 480) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 140, 60)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def load(base_url: str, concurrency: int, duration_s: float, max_tokens: int) -> dict:
    """``concurrency`` closed-loop clients for ``duration_s``; latency of every successful request."""
    import httpx

    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "describe the image"},
                                                      {"type": "image_url", "image_url": {"url": png_url()}}]}],
            "max_tokens": max_tokens}
    latencies, failures, lock = [], [0], threading.Lock()
    deadline = time.perf_counter() + duration_s

    def client():
        with httpx.Client(base_url=base_url, timeout=120) as c:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                ok = c.post("/v1/chat/completions", json=body).status_code == 200
                with lock:
                    latencies.append(time.perf_counter() - t0) if ok else failures.__setitem__(0, failures[0] + 1)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"rps": len(latencies) / elapsed, "p50": q[49], "p99": q[98], "n": len(latencies), "failed": failures[0]}


def deploy(model: str, max_batch_size: int, max_replicas: int = 1) -> None:
    from ray import serve

    from pipelines.serve import build_app

    args = dict(model=model, model_id="bench", num_cpus=0.5, max_batch_size=max_batch_size, batch_wait_timeout_s=0.01,
                max_ongoing_requests=32,
                autoscaling=dict(min_replicas=1, max_replicas=max_replicas, target_ongoing_requests=4,
                                 upscale_delay_s=2, downscale_delay_s=5, look_back_period_s=3, metrics_interval_s=1))
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)


def replicas() -> int:
    from ray import serve

    return serve.status().applications[APP].deployments["SlimeServer"].replica_states.get("RUNNING", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir or s3:// URI (default: a fresh tiny checkpoint)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for the embedded Ray")
    parser.add_argument("--llm-width", type=int, default=512,
                        help="LLM hidden size of the generated checkpoint (tiny is 64: its per-token cost is "
                             "Python overhead, which batching cannot amortise)")
    args = parser.parse_args()

    import ray
    from ray import serve

    model = args.model
    if model is None:
        from slime.config import replace
        from slime.presets import save_tiny_checkpoint, tiny

        cfg = tiny()
        w = args.llm_width
        cfg = replace(cfg, llm=replace(cfg.llm, hidden_dim=w, intermediate_dim=4 * w, num_layers=4, num_heads=w // 64,
                                       num_kv_heads=w // 64))
        model = str(save_tiny_checkpoint(os.path.join(tempfile.mkdtemp(), f"llm{w}"), cfg=cfg))
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"

    results: dict[tuple[int, int], dict] = {}
    for batch in (1, 8):
        deploy(model, batch)
        load(base, 2, 2.0, args.max_tokens)  # warm-up, not measured
        for conc in (1, 4, 16):
            results[(batch, conc)] = load(base, conc, args.duration, args.max_tokens)

    print(f"\nmodel {model}, max_tokens {args.max_tokens}, {args.duration:.0f} s per cell, 1 replica, 640x480 image")
    print(f"{'batch':>5} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'n':>5} {'fail':>4} {'ratio':>6}")
    for (batch, conc), r in results.items():
        ratio = r["rps"] / results[(1, conc)]["rps"] if results[(1, conc)]["rps"] else float("nan")
        print(f"{batch:>5} {conc:>4} {r['rps']:>8.2f} {r['p50'] * 1e3:>8.0f} {r['p99'] * 1e3:>8.0f} "
              f"{r['n']:>5} {r['failed']:>4} {ratio:>6.2f}")

    # Autoscaling: replica count over time under concurrency 16, then idle.
    deploy(model, 8, max_replicas=2)
    timeline, stop = [], threading.Event()
    t0 = time.perf_counter()

    def sample():
        while not stop.is_set():
            timeline.append((time.perf_counter() - t0, replicas()))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample)
    sampler.start()
    r = load(base, 16, 3 * args.duration, args.max_tokens)
    idle_until = time.perf_counter() + 20
    while time.perf_counter() < idle_until and replicas() > 1:
        time.sleep(1.0)
    stop.set()
    sampler.join()
    print(f"\nautoscaling 1..2 replicas, concurrency 16 for {3 * args.duration:.0f} s: {r['rps']:.2f} req/s, "
          f"p50 {r['p50'] * 1e3:.0f} ms, p99 {r['p99'] * 1e3:.0f} ms, {r['failed']} failed")
    print("replicas over time: " + " ".join(f"{t:.0f}s:{n}" for t, n in timeline))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
