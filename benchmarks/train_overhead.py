"""Ray Train overhead: samples/s of the real training loop (pipelines.train.loop.train_loop_per_worker, 1 Ray
Train worker, batches from Ray Data) against a plain single-process torch loop over the same preprocessed
samples and the same model, in the same run. Target ratio >= 0.9.

Fair steady state: both sides run the same number of optimizer steps of the same phase (III: everything
but the tower trains, mode both, gamma 0.75) on the same rows in the same order, with the same number of
intra-op threads (``--threads``, set in the driver and, through a thin wrapper, in the Ray Train worker),
and the first ``--warmup`` steps are excluded on both sides. Throughput is wall clock over the measured
steps (timestamps taken at the end of each step, so everything the loop does between steps counts:
data wait, collate, logging, metric reductions); the median of per-step rates is printed beside it.

The Ray side is fed the way the real pipeline feeds Train: blocks of 8 rows (what the Preprocessor's
map_batches emits at its default batch size; ``from_items`` alone would make 1-row blocks) and one data
epoch that covers the run (real epochs are thousands of steps; the plain loop just cycles the rows).
The machine's speed drifts by 10-20 % over a minute on a shared host, more than the effect measured,
so the runs alternate plain, Ray, plain, Ray, ..., plain and each Ray run is compared with the mean of
the plain runs either side of it; the median of those ratios is the result.

    python -m benchmarks.train_overhead [--images 16] [--steps 200] [--warmup 40] [--batch 4] [--trials 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def samples(n_images: int, model_dir: str, root: str) -> list[dict]:
    from PIL import Image

    from pipelines.data.synth import SynthConfig, generate
    from slime.checkpoint import load_config
    from slime.processing import SlimeProcessor
    from transformers import AutoTokenizer

    generate(SynthConfig(output_dir=root, num_images=n_images, min_side=448, max_side=672, val_fraction=0.0,
                         progress=False))
    proc = SlimeProcessor(load_config(model_dir), AutoTokenizer.from_pretrained(f"{model_dir}/tokenizer"))
    recs = json.load(open(f"{root}/train.json"))
    return [proc(r, Image.open(f"{root}/{r['image']}").convert("RGB"), "both", 0.75) for r in recs]


def steady(ends: list[float], warmup: int, batch: int) -> float:
    """samples/s over the steps after ``warmup`` (end timestamps of every step)."""
    return (len(ends) - warmup) * batch / (ends[-1] - ends[warmup - 1])


def plain_loop(model_dir: str, rows: list[dict], steps: int, batch: int) -> tuple[list[float], list[float]]:
    """(end timestamps, per-step samples/s) of a bare torch loop: same model, rows, order, clip and AdamW."""
    import torch

    from slime.checkpoint import load_pretrained
    from slime.model import set_trainable

    torch.manual_seed(0)
    model, _ = load_pretrained(model_dir)
    set_trainable(model, ["projector", "global_adapter", "compressor", "llm"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ends, rates, i = [], [], 0
    for _ in range(steps):
        start = time.perf_counter()
        chunk = [rows[(i + k) % len(rows)] for k in range(batch)]
        i += batch
        if i + batch > len(rows):  # drop_last epochs, like the Ray side
            i = 0
        b = {k: torch.stack([torch.as_tensor(r[k]) for r in chunk]) for k in chunk[0]}
        out = model(**b, mode="both", gamma=0.75)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(out.loss)
        now = time.perf_counter()
        ends.append(time.time())
        rates.append(batch / (now - start))
    return ends, rates


def _worker(config: dict) -> None:
    """The real loop, with the driver's intra-op thread count (Ray sets OMP_NUM_THREADS from the CPUs)."""
    import torch

    from pipelines.train.loop import train_loop_per_worker

    torch.set_num_threads(config.pop("threads"))
    print(f"[overhead] worker torch threads: {torch.get_num_threads()}", flush=True)
    train_loop_per_worker(config)


def ray_loop(model_dir: str, rows: list[dict], steps: int, batch: int, threads: int,
             work: str, name: str = "overhead", block_rows: int = 8) -> tuple[list[float], list[float]]:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.config import TrainConfig
    from slime.config import load_config, to_dict

    cfg = load_config(TrainConfig, None, [
        f"name={name}", f"storage_path={work}/runs", "scaling.num_workers=1",
        f"phases=[{{name: III, trainable: [projector, global_adapter, compressor, llm], mode: both, gamma: 0.75, "
        f"lr: 1.0e-4, steps: {steps}}}]", f"optim.micro_batch_size={batch}", "optim.warmup_ratio=0.0",
        f"checkpoint.every_steps={steps + 1}", "checkpoint.wait_committed=false", "logging.tensorboard=false",
        f"logging.every_steps={steps}"])
    data = {"shards": "unused", "model": model_dir, "preserve_order": True}
    # One data epoch covering the run, in 8-row blocks (see the module docstring).
    repeated = [rows[i % len(rows)] for i in range((steps + 1) * batch)]
    ds = ray.data.from_items(repeated, override_num_blocks=math.ceil(len(repeated) / block_rows))
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"train": to_dict(cfg), "init_dir": model_dir, "plan": [steps], "data": {"III": data},
                           "threads": threads},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=name, storage_path=f"{work}/runs"), datasets={"III": ds})
    trainer.fit()
    lines = [json.loads(x) for x in open(f"{work}/runs/{name}/logs/metrics.jsonl")]
    lines = [x for x in lines if "event" not in x]
    return [x["time"] for x in lines], [x["samples_per_s"] for x in lines]


def main() -> None:
    import ray
    import torch

    from slime.presets import save_tiny_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=40, help="first steps excluded on both sides")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    ap.add_argument("--trials", type=int, default=5, help="plain, Ray, plain, Ray, ..., plain")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w, b = args.warmup, args.batch
    plain, ray_side = [], []
    with tempfile.TemporaryDirectory() as work:
        model_dir = str(save_tiny_checkpoint(f"{work}/model"))
        rows = samples(args.images, model_dir, f"{work}/synth")
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        plain.append(plain_loop(model_dir, rows, args.steps, b))
        for trial in range(args.trials):
            ray_side.append(ray_loop(model_dir, rows, args.steps, b, args.threads, work, name=f"overhead-{trial}"))
            plain.append(plain_loop(model_dir, rows, args.steps, b))
            print(f"[overhead] trial {trial + 1}/{args.trials}: plain {steady(plain[-2][0], w, b):.1f} -> "
                  f"Ray Train {steady(ray_side[-1][0], w, b):.1f} -> plain {steady(plain[-1][0], w, b):.1f} "
                  f"samples/s", flush=True)
        ray.shutdown()
    plain_rates = [steady(p[0], w, b) for p in plain]
    ray_rates = [steady(r[0], w, b) for r in ray_side]
    # Each Ray run against the plain runs either side of it: the machine's speed drifts by 10-20 % over a
    # minute (shared host), more than the effect being measured.
    ratios = [r / ((plain_rates[i] + plain_rates[i + 1]) / 2) for i, r in enumerate(ray_rates)]
    plain_med = statistics.median([x for p in plain for x in p[1][w:]])
    ray_med = statistics.median([x for r in ray_side for x in r[1][w:]])
    print(json.dumps({"samples": len(rows), "steps": args.steps, "warmup_excluded": w, "micro_batch": b,
                      "threads": args.threads, "trials": args.trials,
                      "plain_samples_per_s": [round(x, 1) for x in plain_rates],
                      "ray_train_samples_per_s": [round(x, 1) for x in ray_rates],
                      "ratios": [round(x, 3) for x in ratios], "ratio": round(statistics.median(ratios), 3),
                      "median_step_ratio": round(ray_med / plain_med, 3), "target": 0.9}))


if __name__ == "__main__":
    main()
