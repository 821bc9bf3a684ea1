"""Serve throughput that reproduces: our vLLM app against the HF app, the engine's own ceiling and the stack a
user would pick instead, each configuration run ``--runs`` times interleaved, medians and ranges of the ratios.

Configurations (one at a time, so they never compete for the cores; the order repeats every run):

    hf        the HF ``Predictor`` app (``engine="hf"``, ``@serve.batch`` with max_batch_size 8)
    vllm      our vLLM app (``engine="vllm"``): FastAPI ingress over an in-replica ``AsyncLLM``
    ceiling   the same requests straight to the engine: an ``AsyncLLM`` in this process, built by
              ``pipelines.serve.engine.async_engine`` with the endpoint's settings, given N concurrent
              ``generate`` calls on prompts encoded before the clock starts (no HTTP, no image decode, no
              encoding): the engine's own speed on this machine
    peer      the same LLM as a LLaVA-NeXT model served by stock vLLM's own OpenAI server (below)

All serve the same checkpoint (default: the tiny vision side with a width-512, 8-layer Llama), the same question
about a 640x480 image, 32 new tokens, greedy. Cells: concurrency 1 and 16, closed-loop clients for ``--duration``
seconds each: output tokens/s, requests/s, p50/p99 latency, visual tokens per request. The vLLM app and the peer
are also measured on a 1344x1344 image, and the vLLM app at gamma 0.75 (the request's ``gamma`` field).

The peer. ``LlavaNextForConditionalGeneration`` from transformers, built from its config with random weights and
saved to a temporary directory with a processor, our tokenizer and a vicuna chat template (nothing downloaded):
the same Llama (width 512, 8 layers, our vocabulary) and a CLIP tower of our tiny size (56 px, patch 14, width
32, 4 layers). LLaVA-NeXT's default pinpoints are 336 px tiles in grids of 1x2, 2x1, 2x2, 3x1 and 1x3
([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]); with our 56 px tile they become
[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]: the same grid shapes, so the same choice of grid for a
given aspect ratio, each tile 16 patches instead of 576. It is served by
``python -m vllm.entrypoints.openai.api_server`` (vLLM's built-in llava_next), a subprocess this script starts,
waits for (``/health``) and stops by its pid. Its image processor is transformers' slow (PIL)
``LlavaNextImageProcessorPil``: the fast one needs torchvision, which this project does not install. For the same
reason vLLM 0.32 cannot import its llava family here (its pixtral module imports a helper from transformers'
torchvision-backed Pixtral image processor); in the peer's processes only, that one module name is pointed at
transformers' PIL Pixtral module, which defines the same helper (``PEER_SITECUSTOMIZE``); nothing else is changed. Its requests send ``ignore_eos`` so that,
like ours, every answer is 32 tokens (random weights may end early otherwise); the table shows tokens per request.
Its visual tokens per request come from its processor (what vLLM expands ``<image>`` to).

Ratios are computed per run (each run's configurations measured minutes apart, interleaved), then the median and
the range over runs are printed. The last stdout line is one JSON object::

    {"c16": {"vllm_vs_hf": R, "vllm_vs_ceiling": R, "vllm_vs_peer": R},
     "c1": {"p50_vs_hf": R, "p50_vs_ceiling": R}, "runs": N, "machine": {"cpu": ..., "isa": [...]},
     "range": {...the same keys, [min, max]...}, "reasons": {key: why it is null}}

A ratio that cannot be computed (a configuration skipped or failed) is null with its reason. Run on demand, on a
quiet machine, never in the test pass:

    python -m benchmarks.serve_load --runs 3 [--duration 15] [--model DIR|s3://...] [--configs hf,vllm,ceiling,peer]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import tempfile
import time
import traceback

from benchmarks.serve_parts import (
    IMAGES,
    MAIN_IMAGE,
    QUESTION,
    bench_model,
    body,
    ceiling,
    deploy,
    http_cells,
    load,
    machine,
    png_url,
    undeploy,
)
from benchmarks.serve_peer import PINPOINTS, PeerServer, peer_model

CONFIGS = ("hf", "vllm", "ceiling", "peer")


# --------------------------------------------------------------------------- where a request's time goes

STEPS = [  # (row, source): the handler's own spans and vLLM's timestamps per request, the timings file per call
    ("HTTP + Serve proxy + ingress", "http"), ("read body", "read_body"), ("parse JSON + checks", "parse"),
    ("image decode (base64 + PNG)", "image_decode"), ("our encoding (ChatEncoder)", "encode"),
    ("submit -> engine core queued", "to_engine"), ("  of which vLLM multimodal processor", "mm_processor"),
    ("queue (queued -> scheduled)", "queue"), ("prefill (scheduled -> 1st token)", "prefill"),
    ("  of which vision+connector+compressor+selector", "visual"), ("decode steps (1st -> last token)", "decode"),
    ("output: detokenise, back to handler", "output"), ("build response", "respond"),
]


def breakdown(model: str, base: str, concs: list[int], duration: float, max_tokens: int, replica_cpus: float,
              threads: int | None) -> dict:
    """Our vLLM app with ``SLIME_SERVE_TIMINGS`` on (``pipelines.serve.timings``): mean seconds per request of every
    step, per concurrency. The HTTP row is the client's latency minus the handler's own time."""
    from pipelines.serve import timings

    path = os.path.join(tempfile.mkdtemp(), "timings.txt")
    same = body(max_tokens)
    # distinct images (the circle moved by a pixel each): vLLM's encoder and prefix caches cannot answer from a
    # previous request, as with real traffic; 400 > requests a cell can finish, so none repeats
    distinct = [{**same, "messages": [{"role": "user", "content": [
        {"type": "text", "text": QUESTION},
        {"type": "image_url", "image_url": {"url": png_url(*IMAGES[MAIN_IMAGE], shift=i + 1)}}]}]} for i in range(400)]
    deploy(model, "vllm", base, max_tokens, replica_cpus, threads, env={timings.ENV: path})
    try:
        load(base, 4, min(3.0, duration), same)  # warm-up, not measured
        out = {}
        for conc, images in [(c, kind) for kind in ("same", "distinct") for c in concs]:
            open(path, "w").close()  # this cell's per-call lines only
            got: list = []
            stats = load(base, conc, duration, same if images == "same" else distinct, collect=got)
            rows = [t for _, t in got if t]
            per_call = timings.read(path)
            n = max(len(rows), 1)
            cell = {k: statistics.fmean(r.get(k, 0.0) for r in rows) if rows else None
                    for k in ("read_body", "parse", "image_decode", "encode", "to_engine", "queue", "prefill", "decode",
                              "output", "respond", "handler")}
            cell["http"] = statistics.fmean(lat - (t or {}).get("handler", 0.0) for lat, t in got) if got else None
            cell["mm_processor"] = per_call.get("mm_processor", (0.0, 0, 0))[0] / n
            total, calls, _ = per_call.get("visual", (0.0, 0, 0))
            cell["visual"] = total / n
            cell["visual_calls_per_request"] = calls / n
            cell["latency"] = statistics.fmean(lat for lat, _ in got) if got else None
            cell["tok_s"], cell["n"] = stats["tok_s"], len(rows)
            out[f"c{conc}-{images}"] = cell
        return out
    finally:
        undeploy()


def print_breakdown(cells: dict) -> None:
    concs = list(cells)
    print("\nper-request time breakdown, our vLLM app, 640x480, mean ms per request (timings on: "
          "pipelines/serve/timings.py); same = one image repeated, distinct = a new image every request")
    print(f"{'step':<48}" + "".join(f"{c:>14}" for c in concs))
    for label, key in STEPS + [("client latency (total)", "latency")]:
        vals = [cells[c].get(key) for c in concs]
        print(f"{label:<48}" + "".join(f"{v * 1e3:>14.1f}" if v is not None else f"{'-':>14}" for v in vals))
    print(f"{'output tok/s':<48}" + "".join(f"{cells[c]['tok_s']:>14.1f}" for c in concs))
    print(f"{'visual encoder calls per request':<48}" +
          "".join(f"{cells[c]['visual_calls_per_request']:>14.2f}" for c in concs))
    print(f"{'requests':<48}" + "".join(f"{cells[c]['n']:>14}" for c in concs))
    print("(vLLM's timestamps: queued/scheduled/first/last token from RequestOutput.metrics, disable_log_stats=False; "
          "calls < 1 per request: vLLM's encoder cache reused an identical image + question)")


# --------------------------------------------------------------------------- reporting


def ratio(results: list[dict], key_a: tuple, key_b: tuple, field: str,
          errors: dict) -> tuple[list[float], str | None]:
    """Per-run ratios a/b of ``field`` (runs where both were measured), and why there are none."""
    vals, why = [], None
    for run in results:
        a, b = run.get(key_a), run.get(key_b)
        if a is None or b is None:
            config = key_a[0] if a is None else key_b[0]
            why = f"{config} did not run: {errors.get(config, 'not in --configs')}"
        elif not a.get(field) or not b.get(field):
            why = f"no successful requests in {key_a if not a.get(field) else key_b}"
        else:
            vals.append(a[field] / b[field])
    return vals, None if vals else (why or "no runs")


def report(results: list[dict], args, starts: dict, errors: dict, peer_note: str | None) -> dict:
    cells = sorted({k for run in results for k in run},
                   key=lambda k: (CONFIGS.index(k[0]), k[1], k[2] or 1.0, k[3]))
    print(f"\n{args.max_tokens} new tokens, {args.duration:.0f} s per cell, {len(results)} run(s) interleaved, "
          f"1 replica ({args.replica_cpus} CPU), model threads {args.threads} (hf, vllm and the ceiling alike), "
          "medians over runs (min-max of output tok/s)")
    print("start (deploy -> first answer), median s: " +
          ", ".join(f"{c} {statistics.median(v):.1f}" for c, v in starts.items() if v))
    print(f"{'config':>8} {'image':>9} {'gamma':>5} {'conc':>4} {'out tok/s':>9} {'(range)':>13} {'req/s':>6} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'tok/req':>7} {'visual':>6} {'n':>5} {'fail':>4}")
    for key in cells:
        rows = [run[key] for run in results if key in run]
        tok = [r["tok_s"] for r in rows]

        def med(field, rows=rows):
            vals = [r[field] for r in rows if r.get(field) is not None]
            return statistics.median(vals) if vals else float("nan")

        gamma = "-" if key[2] is None else f"{key[2]:g}"
        print(f"{key[0]:>8} {key[1]:>9} {gamma:>5} {key[3]:>4} {statistics.median(tok):>9.1f} "
              f"{f'{min(tok):.0f}-{max(tok):.0f}':>13} {med('rps'):>6.2f} {med('p50') * 1e3:>7.0f} "
              f"{med('p99') * 1e3:>7.0f} {med('tok_req'):>7.1f} {med('visual'):>6.0f} "
              f"{sum(r['n'] for r in rows):>5} {sum(r['failed'] for r in rows):>4}")
    if any(k[0] == "peer" for k in cells):
        print("\nagainst the peer (stock vLLM + LLaVA-NeXT), medians: output tok/s | p50 ms | visual tokens per request")
        print(f"{'image':>9} {'conc':>4} {'ours g1.0':>22} {'ours g0.75':>22} {'peer':>22} {'tok/s ours/peer':>15}")
        for image in IMAGES:
            for conc in sorted({k[3] for k in cells}):
                row = []
                for key in (("vllm", image, None, conc), ("vllm", image, 0.75, conc), ("peer", image, None, conc)):
                    rs = [run[key] for run in results if key in run and run[key].get("p50") is not None]
                    row.append((statistics.median(r["tok_s"] for r in rs), statistics.median(r["p50"] for r in rs),
                                rs[0]["visual"]) if rs else None)
                fmt = [f"{t:>8.1f} | {p * 1e3:>5.0f} | {v if v is not None else '-':>3}" if x else f"{'-':>22}"
                       for x in row for t, p, v in [x or (0, 0, None)]]
                ratio_s = f"{row[0][0] / row[2][0]:.2f}" if row[0] and row[2] and row[2][0] else "-"
                print(f"{image:>9} {conc:>4} {fmt[0]:>22} {fmt[1]:>22} {fmt[2]:>22} {ratio_s:>15}")
    if peer_note:
        print(f"peer: {peer_note}")
    for name, err in errors.items():
        print(f"{name}: not measured: {err}")

    def cell(cfg, conc, image=MAIN_IMAGE):
        return (cfg, image, None, conc)

    specs = {"c16": {"vllm_vs_hf": (cell("vllm", 16), cell("hf", 16), "tok_s"),
                     "vllm_vs_ceiling": (cell("vllm", 16), cell("ceiling", 16), "tok_s"),
                     "vllm_vs_peer": (cell("vllm", 16), cell("peer", 16), "tok_s")},
             "c1": {"p50_vs_hf": (cell("vllm", 1), cell("hf", 1), "p50"),
                    "p50_vs_ceiling": (cell("vllm", 1), cell("ceiling", 1), "p50")}}
    out = {"c16": {}, "c1": {}, "runs": len(results), "machine": machine(), "range": {"c16": {}, "c1": {}},
           "reasons": {}}
    print("\nratios (median of runs, [min, max]):")
    for group, items in specs.items():
        for name, (a, b, field) in items.items():
            vals, why = ratio(results, a, b, field, errors)
            if why:
                out[group][name], out["range"][group][name] = None, None
                out["reasons"][f"{group}.{name}"] = why
                print(f"  {group} {name}: null ({why})")
            else:
                out[group][name] = round(statistics.median(vals), 3)
                out["range"][group][name] = [round(min(vals), 3), round(max(vals), 3)]
                print(f"  {group} {name}: {out[group][name]:.2f} [{min(vals):.2f}, {max(vals):.2f}]")
    c16, c1 = out["c16"], out["c1"]
    print("targets (issue 23): c16 vllm/ceiling >= 0.8: {}, c16 vllm/hf >= 3: {}, c1 p50 vllm/ceiling <= 1.15: {}".format(
        c16["vllm_vs_ceiling"], c16["vllm_vs_hf"], c1["p50_vs_ceiling"]))
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir or s3:// URI (default: a fresh width-512 / 8-layer one)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per cell")
    parser.add_argument("--runs", type=int, default=3, help="rounds of every configuration, interleaved")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    parser.add_argument("--concurrency", default="1,16", help="client counts per cell (1 and 16 feed the JSON)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for the embedded Ray")
    parser.add_argument("--replica-cpus", type=float, default=0.5, help="num_cpus of the serving replica")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads every configuration's model computes on (the replicas' cpu_threads, the "
                             "ceiling's and the peer's engine; default: all cores, as a CPU node serving one replica)")
    parser.add_argument("--breakdown", action="store_true",
                        help="only the per-request time breakdown of our vLLM app (timings on), at --concurrency")
    parser.add_argument("--llm-width", type=int, default=512)
    parser.add_argument("--llm-layers", type=int, default=8)
    args = parser.parse_args()
    configs = [] if args.breakdown else [c for c in CONFIGS if c in args.configs.split(",")]
    concs = [int(c) for c in args.concurrency.split(",")]

    import ray
    from ray import serve

    from pipelines.serve.ingress import free_port

    model = args.model or bench_model(args.llm_width, args.llm_layers)
    print(f"model {model}; configurations {configs}; concurrency {concs}; {args.runs} run(s)", flush=True)
    main_cells = [(MAIN_IMAGE, None, c) for c in concs]
    vllm_cells = main_cells + [(img, g, c) for img in IMAGES for g in (None, 0.75) for c in concs
                               if (img, g) != (MAIN_IMAGE, None)]
    peer_cells = [(img, None, c) for img in IMAGES for c in concs]

    peer_dir, peer_visual, peer_note = None, {}, None
    if "peer" in configs:
        try:
            from slime.checkpoint import load_config
            from slime.storage import local_copy

            peer_dir, peer_visual = peer_model(model, os.path.join(tempfile.mkdtemp(), "llava-next-peer"))
            peer_max_len = load_config(local_copy(model)).llm.max_position
            peer_note = (f"LLaVA-NeXT {peer_dir}, pinpoints {PINPOINTS}, visual tokens per request {peer_visual} "
                         "(slow LlavaNextImageProcessorPil: the fast one needs torchvision)")
        except Exception as e:  # noqa: BLE001 - the rest still runs; the JSON says why the peer ratio is null
            traceback.print_exc()
            configs.remove("peer")
            peer_note = f"could not build the LLaVA-NeXT peer: {type(e).__name__}: {e}"

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    if args.breakdown:
        cells = breakdown(model, base, concs, args.duration, args.max_tokens, args.replica_cpus, args.threads)
        print_breakdown(cells)
        serve.shutdown()
        ray.shutdown()
        print(json.dumps({"breakdown_ms": {c: {k: (round(v * 1e3, 2) if isinstance(v, float) and k not in
                                                            ("tok_s", "visual_calls_per_request") else v)
                                                        for k, v in cell.items()} for c, cell in cells.items()},
                          "machine": machine()}), flush=True)
        return

    results: list[dict] = []
    starts: dict[str, list[float]] = {c: [] for c in configs}
    errors: dict[str, str] = {}
    if peer_note and "peer" not in configs:
        errors["peer"] = peer_note
    for run in range(args.runs):
        got: dict = {}
        for config in configs:
            print(f"run {run + 1}/{args.runs}: {config}", flush=True)
            t0 = time.perf_counter()
            try:
                if config in ("hf", "vllm"):
                    starts[config].append(deploy(model, config, base, args.max_tokens, args.replica_cpus,
                                                 args.threads))
                    cells = main_cells if config == "hf" else vllm_cells
                    res = http_cells(base, cells, args.duration, args.max_tokens)
                    undeploy()
                elif config == "ceiling":
                    res = ceiling(model, main_cells, args.duration, args.max_tokens, args.threads)
                    starts[config].append(float("nan"))
                else:
                    server = PeerServer(peer_dir, peer_max_len, os.path.join(os.path.dirname(peer_dir), "server.log"),
                                        threads=args.threads)
                    try:
                        starts[config].append(server.start_s)
                        res = http_cells(server.base, peer_cells, args.duration, args.max_tokens,
                                         extra={"model": "peer", "ignore_eos": True}, visual=peer_visual)
                    finally:
                        server.stop()
                got.update({(config, *k): v for k, v in res.items()})
            except Exception as e:  # noqa: BLE001 - one configuration failing leaves the others' numbers (and a null + reason)
                traceback.print_exc()
                errors[config] = f"{type(e).__name__}: {e}"
                for k in [k for k in got if k[0] == config]:
                    del got[k]
                with contextlib.suppress(Exception):
                    undeploy()
            print(f"  {config} took {time.perf_counter() - t0:.0f} s", flush=True)
        results.append(got)
    starts = {c: [s for s in v if not math.isnan(s)] for c, v in starts.items()}
    out = report(results, args, starts, errors, peer_note)
    serve.shutdown()
    ray.shutdown()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

