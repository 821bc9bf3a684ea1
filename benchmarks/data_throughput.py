"""Images/s of the Ray Data pipeline vs plain webdataset + torch DataLoader doing the same work.

Both sides read the same shards and do the same per-sample work (JPEG decode + SlimeProcessor: tiling,
normalisation, template, tokenisation, <image> expansion) and hand the training loop torch batches of
the processed-sample contract. Ray: ShardReader -> Preprocessor actor pool -> iter_torch_batches.
Baseline: webdataset.WebDataset -> map -> DataLoader(num_workers=2).

    python benchmarks/data_throughput.py                      # 200 x 1024x768 JPEG, 336 px tiles
    python benchmarks/data_throughput.py --actors 2 --batch-size 8 --in-flight 2 --cpus 2

Reported: end to end (first request to last batch, Ray start-up excluded and included), steady state
(rows after the first batch / time since it), the ratio Ray / baseline (target >= 0.9), and the rate of
one Preprocessor on one core (what each actor adds on a real cluster). Not part of the test suite.
Shape legend: see pipelines/data/preprocess.py (T max_length · M max tiles · S tile side).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before ray is imported: a local, unauthenticated run
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked DataLoader workers each own a tokenizer
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def make_data(root: str, num: int, per_shard: int, image_size: int) -> tuple[str, list[str]]:
    """A tiny model with ``image_size`` tiles + ``num`` 1024x768 JPEG samples in tar shards (cached)."""
    import webdataset as wds

    from slime.presets import save_tiny_checkpoint, tiny
    from slime.config import replace

    model = os.path.join(root, f"model-{image_size}")
    if not os.path.exists(os.path.join(model, "slime_config.yaml")):
        cfg = tiny()
        # Room for a 576-token global view at S=336 (the tiny preset's 256 would drop every sample).
        cfg = replace(cfg, vision=replace(cfg.vision, image_size=image_size), max_length=1024,
                      llm=replace(cfg.llm, max_position=1024))
        save_tiny_checkpoint(model, cfg=cfg)
    shard_dir = os.path.join(root, f"shards-{num}")
    shards = [os.path.join(shard_dir, f"shard-000001-{i:06d}.tar") for i in range(-(-num // per_shard))]
    if all(os.path.exists(s) for s in shards):
        return model, shards
    os.makedirs(shard_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:768, 0:1024]
    for s, path in enumerate(shards):
        with wds.TarWriter(path, encoder=False, mtime=0.0) as tar:
            for i in range(s * per_shard, min(num, (s + 1) * per_shard)):
                # Smooth gradients + mild noise: JPEG sizes like photos (~100-200 KB), not like white noise.
                base = np.stack([(xx + i * 7) % 256, (yy + i * 13) % 256, (xx + yy) // 8 % 256], -1)
                img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "JPEG", quality=90)
                rec = {"id": str(i), "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the top-left corner?"},
                    {"from": "gpt", "value": "The top-left corner is a dark shade of blue."}]}
                tar.write({"__key__": f"000001-{i:09d}", "jpg": buf.getvalue(), "json": json.dumps(rec).encode()})
    return model, shards


class _Rate:
    """Counts rows; remembers when the first batch arrived (steady state = after it)."""

    def __init__(self) -> None:
        self.start, self.first, self.rows, self.first_rows = time.perf_counter(), None, 0, 0

    def add(self, n: int) -> None:
        if self.first is None:
            self.first, self.first_rows = time.perf_counter(), n
        self.rows += n

    def result(self) -> dict:
        end = time.perf_counter()
        steady = (self.rows - self.first_rows) / max(end - self.first, 1e-9)
        return {"rows": self.rows, "end_to_end": self.rows / (end - self.start), "steady": steady,
                "first_batch_s": self.first - self.start, "total_s": end - self.start}


def run_baseline(model: str, shards: list[str], batch_size: int, workers: int) -> dict:
    import torch
    import webdataset as wds
    from transformers import AutoTokenizer

    from slime.checkpoint import load_config
    from slime.processing import SlimeProcessor

    processor = SlimeProcessor(load_config(model), AutoTokenizer.from_pretrained(os.path.join(model, "tokenizer")))

    def process(sample: dict) -> dict:
        img = processor.decode_image(sample["jpg"])
        return processor(json.loads(sample["json"]), img, "both", None)

    rate = _Rate()
    ds = wds.WebDataset(shards, shardshuffle=False, workersplitter=wds.split_by_worker).map(process)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, prefetch_factor=2)
    for batch in loader:
        rate.add(len(batch["input_ids"]))
    return rate.result()


def run_ray(model: str, shards: list[str], args) -> dict:
    import ray

    from pipelines.data.ingest import DataConfig, build_dataset, data_metrics, torch_batch_kwargs

    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, object_store_memory=2 * 1024**3)
    init_s = time.perf_counter() - t0
    cfg = DataConfig(shards=tuple(shards), model=model, num_actors=args.actors, batch_size=args.batch_size,
                     actor_num_cpus=args.actor_cpus, read_num_cpus=args.read_cpus,
                     max_tasks_in_flight_per_actor=args.in_flight, metrics_name=f"bench-{time.time_ns()}")
    rate = _Rate()
    for batch in build_dataset(cfg).iterator().iter_torch_batches(**torch_batch_kwargs(cfg, args.batch_size)):
        rate.add(len(batch["input_ids"]))
    out = rate.result()
    out["with_init"] = out["rows"] / (out["total_s"] + init_s)
    out["init_s"] = init_s
    out["metrics"] = data_metrics(cfg)
    return out


def per_actor_rate(model: str, shards: list[str], batch_size: int, num: int = 48) -> float:
    """One Preprocessor in this process (one core): images/s of the work each actor does."""
    import tarfile

    from pipelines.data.preprocess import Preprocessor

    rows = []
    with tarfile.open(shards[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in sorted(members):
        if name.endswith(".json"):
            rows.append((name[:-5], members[name[:-5] + ".jpg"], members[name]))
    rows = (rows * (num // len(rows) + 1))[:num]
    pre = Preprocessor(model=model, mode="both", gamma=None, output="pixels", storage_cfg=None, metrics_name="unused")
    import pipelines.data.preprocess as pp

    counts = {}
    pp._report = lambda name, c: counts.update(c)  # no Ray here: keep the last batch's counters
    batches = [rows[i:i + batch_size] for i in range(0, num, batch_size)]
    call = lambda chunk: pre({k: np.array([r[j] for r in chunk], object)  # noqa: E731
                              for j, k in enumerate(("key", "image", "json"))})
    call(batches[0])  # warm-up: first tokenizer and PIL calls pay one-off costs an actor pays once
    start = time.perf_counter()
    for chunk in batches:
        call(chunk)
    rate = num / (time.perf_counter() - start)
    if counts.get("ok") != len(chunk):
        raise RuntimeError(f"the benchmark samples are being dropped: {counts}")
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/slime-bench-data")
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--per-shard", type=int, default=25)
    p.add_argument("--image-size", type=int, default=336, help="tile side S of the benchmark model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--actor-cpus", type=float, default=0.5)
    p.add_argument("--read-cpus", type=float, default=0.25)
    p.add_argument("--in-flight", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray")
    p.add_argument("--loader-workers", type=int, default=2)
    args = p.parse_args(argv)

    model, shards = make_data(args.workdir, args.num_samples, args.per_shard, args.image_size)
    actor = per_actor_rate(model, shards, args.batch_size)
    base = run_baseline(model, shards, args.batch_size, args.loader_workers)
    ray_out = run_ray(model, shards, args)
    print(f"samples {base['rows']} (1024x768 JPEG, S={args.image_size}); per-actor (one core) {actor:.1f} img/s")
    print(f"baseline webdataset+DataLoader(num_workers={args.loader_workers}): end-to-end {base['end_to_end']:.1f} "
          f"img/s, steady {base['steady']:.1f} img/s, first batch {base['first_batch_s']:.1f}s")
    print(f"ray ({args.actors} actors x {args.actor_cpus} CPU, batch {args.batch_size}, in-flight {args.in_flight}): "
          f"end-to-end {ray_out['end_to_end']:.1f} img/s ({ray_out['with_init']:.1f} incl. {ray_out['init_s']:.1f}s "
          f"ray.init), steady {ray_out['steady']:.1f} img/s, first batch {ray_out['first_batch_s']:.1f}s")
    print(f"ratio ray/baseline: end-to-end {ray_out['end_to_end'] / base['end_to_end']:.2f}, "
          f"steady {ray_out['steady'] / base['steady']:.2f}  (metrics {ray_out['metrics']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
