"""Where a served request's time goes: opt-in timers for the vLLM serving path (``benchmarks/serve_load.py
--breakdown``), off by default and then free (one module-level check per call site).

Set ``SLIME_SERVE_TIMINGS`` to a file path in the replica's environment (``ServeArgs.env``; the engine-core
process vLLM spawns inherits it) and:

* the endpoint builds its engine with vLLM's request stats on (``disable_log_stats=False``), so each final
  ``RequestOutput.metrics`` carries vLLM's own timestamps (queued, scheduled, first token, last token), and adds
  ``slime_timings`` (seconds, see ``request_breakdown``) to each non-streaming response body;
* the steps vLLM does not time per request append one line each to the file, ``<step> <seconds> <items>``:
  ``mm_processor`` (``SlimeMultiModalProcessor.apply``, in the replica) and ``visual`` (vision tower, Dense
  Connector, projector/mixture of adapters, query compressor and text-guided selector: ``embed_multimodal``, in
  the engine core; one line per batch of images).

Lines are short single ``write`` calls in append mode: two processes can share the file.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

ENV = "SLIME_SERVE_TIMINGS"
PATH = os.environ.get(ENV) or None  # read once per process: the off path costs one truth test


def enabled() -> bool:
    return PATH is not None


def record(step: str, seconds: float, items: int = 1) -> None:
    if PATH is not None:
        with open(PATH, "a") as f:
            f.write(f"{step} {seconds:.6f} {items}\n")


@contextmanager
def timed(step: str, items: int = 1):
    """Append ``step``'s wall time to the timings file when timings are on; otherwise just run the block."""
    if PATH is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        record(step, time.perf_counter() - t0, items)


def read(path: str) -> dict[str, tuple[float, int, int]]:
    """The timings file -> {step: (total seconds, calls, items)}."""
    out: dict[str, list] = {}
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3:
                continue
            acc = out.setdefault(parts[0], [0.0, 0, 0])
            acc[0] += float(parts[1])
            acc[1] += 1
            acc[2] += int(parts[2])
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def request_breakdown(marks: dict[str, float], metrics) -> dict[str, float]:
    """The endpoint's monotonic marks for one request plus vLLM's ``RequestStateStats`` -> seconds per step:

    read_body, parse (JSON + OpenAI checks), image_decode, encode (our ChatEncoder), to_engine (generate() called ->
    the engine core queued it: vLLM's input processing incl. its multimodal processor, and the hop to the core),
    queue (queued -> scheduled), prefill (scheduled -> first token; the visual encoder runs in it), decode (first ->
    last token), output (last token -> the final output in our handler: detokenisation, the hop back), respond
    (building the response body), handler (the whole handler)."""
    out = {}

    def span(name, a, b):
        if marks.get(a) is not None and marks.get(b) is not None:
            out[name] = max(0.0, marks[b] - marks[a])

    if metrics is not None and getattr(metrics, "queued_ts", 0):
        marks = {**marks, "queued": metrics.queued_ts, "scheduled": metrics.scheduled_ts or None,
                 "first_token": metrics.first_token_ts or None, "last_token": metrics.last_token_ts or None}
    span("read_body", "start", "body")
    span("parse", "body", "decode_start")
    span("image_decode", "decode_start", "decoded")
    span("encode", "decoded", "encoded")
    span("to_engine", "encoded", "queued")
    span("queue", "queued", "scheduled")
    span("prefill", "scheduled", "first_token")
    span("decode", "first_token", "last_token")
    span("output", "last_token", "final")
    span("respond", "final", "end")
    span("handler", "start", "end")
    return out
