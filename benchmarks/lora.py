"""LoRA against full fine-tuning (training) and a multi-adapter endpoint against the base alone (serving).

train    Phase III on the serving benchmark's model (the tiny vision side, a width-512 8-layer Llama): full (the
         projector, adapters, compressor and the whole LLM train) vs LoRA (the same visual modules fully, the LLM
         through PEFT LoRA r 16 on all seven projections). Trainable parameters, AdamW state bytes (measured from
         the optimizer after a step), and the median step time over ``--steps`` steps after a warm-up, the two
         runs alternating ``--trials`` times (the machine drifts more than a single run shows).
serve    Output tokens/s at concurrency 16, ``AsyncLLM`` in this process (the engine the endpoint wraps): the base
         on an engine without LoRA vs the same base with 4 adapters (rank 16, all projections) and the 16 requests
         spread evenly over them, the two engines alive side by side and measured in alternation ``--trials``
         times; the median of the per-trial ratio is the result (target >= 0.7). Same image, question and 32 new
         tokens per request (ignore_eos, so every request decodes all 32). Also the base's own requests on the
         LoRA engine (``base_on_lora_engine_tok_s``): what enabling LoRA costs before any adapter is asked for.
learning The miniature (benchmarks/learning.py): slime-g0.75 with a full phase III vs slime-g0.75-lora (phase III
         LoRA on the LLM, visual modules fully), same data, init and steps; accuracy per local task with SE.
         ``--skip-learning`` leaves it out (it takes most of the time).

    python -m benchmarks.lora [--trials 3] [--steps 20] [--skip-learning] [--learning-steps 900]
                              [--learning-from FILE]   # a saved `python -m benchmarks.learning --variants
                                                       # slime-g0.75,slime-g0.75-lora` stdout

The last stdout line is one JSON object:
{"train": {"trainable_params": {"lora": N, "full": N}, "optimizer_bytes": {"lora": N, "full": N},
 "step_time_ratio": R}, "serve": {"base_tok_s": X, "adapters_tok_s": X, "ratio": R, "adapters": 4},
 "learning": {"task": T, "lora": A, "full": A}}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

FULL = ("projector", "global_adapter", "compressor", "llm")
VISUAL = ("projector", "global_adapter", "compressor")


def train_rows(model_dir: str, work: str, n: int = 8) -> list[dict]:
    from benchmarks.train_overhead import samples

    return samples(n, model_dir, work)


def train_side(model_dir: str, rows: list[dict], lora: bool, steps: int, warmup: int, batch: int) -> dict:
    """One phase-III run: trainable parameters, optimizer state bytes and per-step seconds after ``warmup``."""
    import torch

    from slime.checkpoint import load_pretrained
    from slime.lora import LoraSpec, add_lora
    from slime.model import set_trainable

    torch.manual_seed(0)
    model, _ = load_pretrained(model_dir)
    names = set_trainable(model, VISUAL if lora else FULL)
    if lora:
        names += add_lora(model, LoraSpec(r=16, alpha=32.0, dropout=0.05))
    params = [model.get_parameter(n) for n in names]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for step in range(warmup + steps):
        chunk = [rows[(step * batch + k) % len(rows)] for k in range(batch)]
        b = {k: torch.stack([torch.as_tensor(r[k]) for r in chunk]) for k in chunk[0]}
        start = time.perf_counter()
        out = model(**b, mode="both", gamma=0.75)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.loss.detach().item()  # wait for the step, as a training loop's logging does
        if step >= warmup:
            times.append(time.perf_counter() - start)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"trainable": sum(p.numel() for p in params), "optimizer_bytes": state,
            "step_s": statistics.median(times)}


def train(model_dir: str, work: str, trials: int, steps: int, warmup: int, batch: int) -> dict:
    rows = train_rows(model_dir, f"{work}/train_data")
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for trial in range(trials):
        for side in ("full", "lora") if trial % 2 == 0 else ("lora", "full"):
            runs[side].append(train_side(model_dir, rows, side == "lora", steps, warmup, batch))
            print(f"train trial {trial + 1} {side}: step {runs[side][-1]['step_s'] * 1000:.0f} ms", flush=True)
    ratios = [lo["step_s"] / fu["step_s"] for lo, fu in zip(runs["lora"], runs["full"])]
    return {"trainable_params": {s: runs[s][0]["trainable"] for s in ("lora", "full")},
            "optimizer_bytes": {s: runs[s][0]["optimizer_bytes"] for s in ("lora", "full")},
            "step_time_ratio": round(statistics.median(ratios), 3),
            "step_time_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "step_s": {s: round(statistics.median(r["step_s"] for r in runs[s]), 4) for s in ("lora", "full")}}


def random_adapter(base: str, out: str, seed: int) -> str:
    """A rank-16 adapter of ``base`` on all seven projections with random (nonzero) weights: its values do not
    change the cost of serving it, only its shape does."""
    import torch

    from slime.checkpoint import load_pretrained
    from slime.lora import LoraSpec, add_lora, fingerprint, save_adapter
    from slime.model import set_trainable

    model, _ = load_pretrained(base)
    set_trainable(model, [])
    names = add_lora(model, LoraSpec(r=16, alpha=32.0, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            p = model.get_parameter(n)
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return str(save_adapter(model, out, base_uri=base, base_fingerprint=fingerprint(base),
                            serving={"visual_mode": model.cfg.visual_mode, "gamma": model.cfg.local.gamma},
                            trainable=names))


async def burst(engine, chat, prompt, info, loras: list, concurrency: int, max_tokens: int) -> float:
    """Output tokens/s of ``concurrency`` concurrent requests (request i with ``loras[i % len(loras)]``)."""
    import uuid

    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)

    async def one(i: int) -> int:
        final = None
        async for out in engine.generate(prompt, params, request_id=uuid.uuid4().hex, lora_request=loras[i % len(loras)]):
            final = out
        return len(final.outputs[0].token_ids)

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return sum(tokens) / (time.perf_counter() - start)


async def serve_side(model_dir: str, work: str, trials: int, concurrency: int, max_tokens: int) -> dict:
    from PIL import Image
    from vllm.lora.request import LoRARequest

    from pipelines.serve.engine import VllmChat, async_engine
    from slime.lora import save_null_adapter
    from slime.predictor import ChatRequest

    adapters = [random_adapter(model_dir, f"{work}/adapter{i}", seed=i) for i in range(4)]
    chat = VllmChat(model_dir)
    image = Image.new("RGB", (640, 480), (40, 90, 160))
    req = ChatRequest(messages=[{"role": "user", "content": "Describe the picture in detail."}], images=[image],
                      max_tokens=max_tokens)
    prompt, info = chat.prompt(req)
    plain = async_engine(model_dir, max_num_seqs=concurrency)
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()  # base rows travel through the null adapter there (pipelines/serve/adapters)
    lora = async_engine(model_dir, max_num_seqs=concurrency, enable_lora=True, max_loras=4 + cpu, max_lora_rank=16,
                        max_cpu_loras=4 + cpu)
    try:
        reqs = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]
        for r in reqs:
            await lora.add_lora(r)
        # The base on the LoRA engine: through the null adapter on CPU (what the endpoint does), else no adapter.
        base_on_lora = [LoRARequest("null", 99, str(save_null_adapter(model_dir, f"{work}/null")))] if cpu else [None]
        if cpu:
            await lora.add_lora(base_on_lora[0])
        await burst(plain, chat, prompt, info, [None], concurrency, 4)  # warm-up, not measured
        await burst(lora, chat, prompt, info, reqs, concurrency, 4)
        base_rates, adapter_rates, machinery_rates = [], [], []
        for trial in range(trials):
            order = ("base", "adapters", "machinery") if trial % 2 == 0 else ("machinery", "adapters", "base")
            for side in order:
                if side == "base":
                    base_rates.append(await burst(plain, chat, prompt, info, [None], concurrency, max_tokens))
                elif side == "adapters":
                    adapter_rates.append(await burst(lora, chat, prompt, info, reqs, concurrency, max_tokens))
                else:
                    machinery_rates.append(await burst(lora, chat, prompt, info, base_on_lora, concurrency,
                                                       max_tokens))
            print(f"serve trial {trial + 1}: base {base_rates[-1]:.1f} tok/s, 4 adapters {adapter_rates[-1]:.1f} "
                  f"tok/s, base on the LoRA engine {machinery_rates[-1]:.1f} tok/s", flush=True)
    finally:
        plain.shutdown()
        lora.shutdown()
    ratios = [a / b for a, b in zip(adapter_rates, base_rates)]
    return {"base_tok_s": round(statistics.median(base_rates), 1),
            "adapters_tok_s": round(statistics.median(adapter_rates), 1),
            "ratio": round(statistics.median(ratios), 3), "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "adapters": 4, "concurrency": concurrency, "max_tokens": max_tokens, "visual_tokens": info["visual_tokens"],
            # where the cost sits: the base's own requests on the LoRA-enabled engine
            "base_on_lora_engine_tok_s": round(statistics.median(machinery_rates), 1)}


def learning(steps: int, seed: int, result: str | None = None) -> dict:
    """The miniature's two variants; ``result``: the JSON line of an earlier
    ``python -m benchmarks.learning --variants slime-g0.75,slime-g0.75-lora`` instead of training them here
    (accuracy does not depend on the machine's load, the timings of the other parts do)."""
    from benchmarks.learning import main as learning_main

    if result:
        with open(result) as f:
            out = json.loads([line for line in f.read().splitlines() if line.startswith("{")][-1])
        steps, seed = out["steps"]["III"], out["seed"]
    else:
        out = learning_main(["--variants", "slime-g0.75,slime-g0.75-lora", "--steps", str(steps), "--seed", str(seed)])
    per_task = {task: {side: row["results"][variant] for side, variant in (("full", "slime-g0.75"),
                                                                         ("lora", "slime-g0.75-lora"))}
                for task, row in out["tasks"].items() if row["kind"] == "local"}
    # the headline task: the local task where the two differ most (the README lists all of them)
    task = max(per_task, key=lambda t: abs(per_task[t]["full"]["accuracy"] - per_task[t]["lora"]["accuracy"]))
    return {"task": task, "lora": per_task[task]["lora"]["accuracy"], "full": per_task[task]["full"]["accuracy"],
            "tasks": per_task, "steps": steps, "seed": seed}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model dir (default: a fresh width-512 / 8-layer one)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="measured training steps per trial")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--skip-learning", action="store_true")
    ap.add_argument("--learning-steps", type=int, default=900)
    ap.add_argument("--learning-from", default=None, help="a saved benchmarks.learning stdout (its last line is used)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="slime-lora-bench-")
    from benchmarks.serve_parts import bench_model  # the serving benchmark's model, same shape

    model_dir = args.model or bench_model(512, 8)
    t0 = time.perf_counter()
    out = {"train": train(model_dir, work, args.trials, args.steps, args.warmup, args.batch)}
    print(f"train done in {time.perf_counter() - t0:.0f} s: {json.dumps(out['train'])}", flush=True)
    out["serve"] = asyncio.run(serve_side(model_dir, work, args.trials, args.concurrency, args.max_tokens))
    print(f"serve done in {time.perf_counter() - t0:.0f} s: {json.dumps(out['serve'])}", flush=True)
    out["learning"] = None if args.skip_learning else learning(args.learning_steps, args.seed, args.learning_from)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
