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

    from slime.config import replace
    from slime.presets import save_tiny_checkpoint, tiny

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


def _role(proc) -> str:
    """What a process of this run is, from its title (Ray names workers ``ray::<actor or task>``)."""
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except Exception:  # noqa: BLE001 - exited, not yet reaped: a DataLoader worker that finished its shards
        return "DataLoader workers"
    if "Preprocessor" in title:
        return "Preprocessor actors"
    if title.startswith("ray::"):
        return "Ray workers (reads, other tasks)"
    for part in ("raylet", "gcs_server"):
        if part in title:
            return "raylet + GCS"
    if "ray" in title:
        return "Ray's other daemons (dashboard agent, log monitor)"
    return "DataLoader workers"  # the baseline's forked workers: no Ray in that run


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and everything it started, by pid (with its role)."""
    import psutil

    me = psutil.Process()
    out = {me.pid: ("driver (iterate, collate, to torch)", sum(me.cpu_times()[:2]))}
    for child in me.children(recursive=True):
        try:
            out[child.pid] = (_role(child), sum(child.cpu_times()[:2]))
        except Exception:  # noqa: BLE001 - exited between listing and reading
            pass
    return out


class _Rate:
    """Counts rows; remembers when the first batch arrived (steady state = after it) and every process's CPU time
    then and at the end: where the cores went during the steady state."""

    def __init__(self) -> None:
        self.start, self.first, self.rows, self.first_rows = time.perf_counter(), None, 0, 0
        self.cpu_first: dict = {}
        self.cpu_last: dict = {}

    def add(self, n: int) -> None:
        if self.first is None:
            self.cpu_first = _cpu_seconds()
            self.first, self.first_rows = time.perf_counter(), n
        self.rows += n
        self.cpu_last = _cpu_seconds()  # at every batch: a DataLoader's workers exit with its last one (~1 ms)

    def result(self) -> dict:
        end, cpu_end = time.perf_counter(), self.cpu_last
        steady = (self.rows - self.first_rows) / max(end - self.first, 1e-9)
        cpu: dict[str, float] = {}
        for pid, (role, t) in cpu_end.items():
            cpu[role] = cpu.get(role, 0.0) + t - self.cpu_first.get(pid, ("", 0.0))[1]
        return {"rows": self.rows, "end_to_end": self.rows / (end - self.start), "steady": steady,
                "first_batch_s": self.first - self.start, "total_s": end - self.start,
                "steady_s": end - self.first, "steady_rows": self.rows - self.first_rows, "cpu_s": cpu}


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
    ray.data.DataContext.get_current().enable_progress_bars = False  # the story is the lines printed below
    rate = _Rate()
    for batch in build_dataset(cfg).iterator().iter_torch_batches(**torch_batch_kwargs(cfg, args.batch_size)):
        rate.add(len(batch["input_ids"]))
    out = rate.result()
    out["with_init"] = out["rows"] / (out["total_s"] + init_s)
    out["init_s"] = init_s
    out["metrics"] = data_metrics(cfg)
    ray.shutdown()  # each run starts its own Ray: runs are independent
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


def cpu_table(name: str, runs: list[dict]) -> None:
    """Where the cores went in the steady state: CPU seconds per 100 images by process role (median of runs), and
    the share of the machine's cores they add up to."""
    import statistics

    roles = sorted({r for run in runs for r in run["cpu_s"]}, key=lambda r: -runs[0]["cpu_s"].get(r, 0.0))
    cores = os.cpu_count()
    print(f"  {name}: CPU s per 100 images in the steady state (median of {len(runs)}), share of {cores} cores")
    for role in roles:
        per100 = statistics.median(100 * run["cpu_s"].get(role, 0.0) / max(run["steady_rows"], 1) for run in runs)
        share = statistics.median(run["cpu_s"].get(role, 0.0) / (cores * run["steady_s"]) for run in runs)
        if per100 >= 0.05:
            print(f"    {role:<52} {per100:>6.2f} s  {share:>6.1%}")
    busy = statistics.median(sum(run["cpu_s"].values()) / (cores * run["steady_s"]) for run in runs)
    print(f"    {'all (busy share of the cores)':<52} {'':>8}  {busy:>6.1%}")


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
    p.add_argument("--runs", type=int, default=3, help="rounds of baseline + Ray, interleaved; medians reported")
    args = p.parse_args(argv)

    import statistics

    model, shards = make_data(args.workdir, args.num_samples, args.per_shard, args.image_size)
    actor = per_actor_rate(model, shards, args.batch_size)
    print(f"samples {args.num_samples} (1024x768 JPEG, S={args.image_size}); per-actor (one core) {actor:.1f} img/s",
          flush=True)
    bases, rays = [], []
    for run in range(args.runs):  # interleaved: both sides see the same state of the machine
        base = run_baseline(model, shards, args.batch_size, args.loader_workers)
        ray_out = run_ray(model, shards, args)
        bases.append(base)
        rays.append(ray_out)
        print(f"run {run + 1}/{args.runs}")
        print(f"  baseline webdataset+DataLoader(num_workers={args.loader_workers}): end-to-end "
              f"{base['end_to_end']:.1f} img/s, steady {base['steady']:.1f} img/s, first batch "
              f"{base['first_batch_s']:.1f}s")
        print(f"  ray ({args.actors} actors x {args.actor_cpus} CPU, batch {args.batch_size}, in-flight "
              f"{args.in_flight}): end-to-end {ray_out['end_to_end']:.1f} img/s ({ray_out['with_init']:.1f} incl. "
              f"{ray_out['init_s']:.1f}s ray.init), steady {ray_out['steady']:.1f} img/s, first batch "
              f"{ray_out['first_batch_s']:.1f}s")
        print(f"  ratio ray/baseline: end-to-end {ray_out['end_to_end'] / base['end_to_end']:.2f}, steady "
              f"{ray_out['steady'] / base['steady']:.2f}  (metrics {ray_out['metrics']})", flush=True)
    steady = [r["steady"] / b["steady"] for r, b in zip(rays, bases)]
    e2e = [r["end_to_end"] / b["end_to_end"] for r, b in zip(rays, bases)]
    first = [r["first_batch_s"] for r in rays]
    print(f"median of {args.runs}: steady {statistics.median(steady):.2f} [{min(steady):.2f}, {max(steady):.2f}], "
          f"end-to-end {statistics.median(e2e):.2f} [{min(e2e):.2f}, {max(e2e):.2f}], first Ray batch "
          f"{statistics.median(first):.1f} s [{min(first):.1f}, {max(first):.1f}]")
    cpu_table("baseline", bases)
    cpu_table("ray", rays)
    print(json.dumps({"steady_ratio": round(statistics.median(steady), 3),
                      "end_to_end_ratio": round(statistics.median(e2e), 3),
                      "first_batch_s": round(statistics.median(first), 2), "runs": args.runs,
                      "range": {"steady_ratio": [round(min(steady), 3), round(max(steady), 3)],
                                "end_to_end_ratio": [round(min(e2e), 3), round(max(e2e), 3)],
                                "first_batch_s": [round(min(first), 2), round(max(first), 2)]},
                      "samples": args.num_samples, "cores": os.cpu_count()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
