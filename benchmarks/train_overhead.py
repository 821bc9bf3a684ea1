"""Ray Train overhead: samples/s of the real training loop (pipelines.train, 1 Ray Train worker, batches
from Ray Data) against a plain single-process torch loop over the same preprocessed samples and model,
in the same run. Target ratio >= 0.9. Both sides use one intra-op thread (Ray sets OMP_NUM_THREADS=1 in
workers), the tiny model, phase III (everything but the tower trains), micro-batch 4.

    python -m benchmarks.train_overhead [--images 16] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def samples(n_images: int, model_dir: str, root: str) -> list[dict]:
    from PIL import Image

    from pipelines.synth import SynthConfig, generate
    from slime.checkpoint import load_config
    from slime.processing import SlimeProcessor
    from transformers import AutoTokenizer

    generate(SynthConfig(output_dir=root, num_images=n_images, min_side=448, max_side=672, val_fraction=0.0,
                         progress=False))
    proc = SlimeProcessor(load_config(model_dir), AutoTokenizer.from_pretrained(f"{model_dir}/tokenizer"))
    recs = json.load(open(f"{root}/train.json"))
    return [proc(r, Image.open(f"{root}/{r['image']}").convert("RGB"), "both", 0.75) for r in recs]


def plain_loop(model_dir: str, rows: list[dict], steps: int, batch: int) -> list[float]:
    import torch

    from slime.checkpoint import load_pretrained
    from slime.model import set_trainable

    torch.manual_seed(0)
    model, _ = load_pretrained(model_dir)
    set_trainable(model, ["projector", "global_adapter", "compressor", "llm"])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rates, i = [], 0
    for _ in range(steps):
        start = time.perf_counter()
        chunk = [rows[(i + k) % len(rows)] for k in range(batch)]
        i += batch
        b = {k: torch.stack([torch.as_tensor(r[k]) for r in chunk]) for k in chunk[0]}
        out = model(**b, mode="both", gamma=0.75)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(out.loss)
        rates.append(batch / (time.perf_counter() - start))
    return rates


def ray_loop(model_dir: str, rows: list[dict], steps: int, batch: int, work: str) -> list[float]:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train import train_loop_per_worker
    from pipelines.train_config import TrainConfig
    from slime.config import load_config, to_dict

    cfg = load_config(TrainConfig, None, [
        "name=overhead", f"storage_path={work}/runs", "scaling.num_workers=1",
        f"phases=[{{name: III, trainable: [projector, global_adapter, compressor, llm], mode: both, gamma: 0.75, "
        f"lr: 1.0e-4, steps: {steps}}}]", f"optim.micro_batch_size={batch}", "optim.warmup_ratio=0.0",
        f"checkpoint.every_steps={steps + 1}", "checkpoint.wait_committed=false", "logging.tensorboard=false",
        f"logging.every_steps={steps}"])
    data = {"shards": "unused", "model": model_dir}
    ds = ray.data.from_items(rows)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "init_dir": model_dir, "plan": [steps], "data": {"III": data}},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="overhead", storage_path=f"{work}/runs"), datasets={"III": ds})
    trainer.fit()
    lines = [json.loads(x) for x in open(f"{work}/runs/overhead/logs/metrics.jsonl")]
    return [x["samples_per_s"] for x in lines if "event" not in x]


def main() -> None:
    import ray
    import torch

    from slime.presets import save_tiny_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        model_dir = str(save_tiny_checkpoint(f"{work}/model"))
        rows = samples(args.images, model_dir, f"{work}/synth")
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
        warm = args.steps // 4  # first steps: allocator warm-up, data pipeline start
        ray_rates = ray_loop(model_dir, rows, args.steps, args.batch, work)[warm:]
        plain_rates = plain_loop(model_dir, rows, args.steps, args.batch)[warm:]
        ray.shutdown()
    ray_sps, plain_sps = statistics.median(ray_rates), statistics.median(plain_rates)
    print(json.dumps({"samples": len(rows), "steps": args.steps, "micro_batch": args.batch,
                      "plain_samples_per_s": round(plain_sps, 2), "ray_train_samples_per_s": round(ray_sps, 2),
                      "ratio": round(ray_sps / plain_sps, 3), "target": 0.9}))


if __name__ == "__main__":
    main()
