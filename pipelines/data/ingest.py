"""Ray Data input pipeline: packed webdataset shards (local or s3://) -> processed-sample contract rows.

    list_shards(cfg)   manifest.json / directory / explicit tars -> shard URIs (version + exclude filters)
    build_dataset(cfg) ShardReader (raw bytes, cheap read tasks) -> map_batches(Preprocessor, actor pool)
    Ray Train:         TorchTrainer(datasets={"train": ds}); in the worker
                       ray.train.get_dataset_shard("train").iter_torch_batches(**torch_batch_kwargs(cfg, b))

Rows hold only numeric columns (no ``__key__``/``__url__`` strings: they break the default torch collate),
so the default ``iter_torch_batches`` collate works. Bad data never stops the job: corrupt images, bad
json, records the processor rejects, stray tar members and truncated shards are skipped and counted in
the ``DataMetrics`` actor (``data_metrics(cfg)`` -> ``{"ok": n, reason: count}``; totals accumulate over
every execution, i.e. every epoch).

Order: ``shuffle="files"`` permutes shard order with ``seed + epoch`` (and again per re-execution of the
same dataset, deterministically, so Train epochs differ); ``preserve_order=True`` keeps block order so
the same seed gives the same row order. Without it rows arrive in completion order.

When ``output="features"`` pays off: it moves the frozen tower off the training GPUs (CLIP-L/336 costs
~2 x 0.30 GFLOP x 577 tokens ~ 0.35 TFLOP per tile, up to 8 tiles a sample, for every epoch) onto
preprocessing actors (fractional or spare GPUs, or CPUs). It does NOT shrink what crosses the object
store for CLIP-L. Bytes per sample at M = 8 tiles (all tiles shipped; padded tiles are zeros):

    model        pixels float32 [M,3,S,S]      features float16 [M,P',Din]             ratio
    CLIP-L/336   8*3*336*336*4 = 10.84 MB      mlp: 8*576*1024*2 =  9.44 MB            0.87
                                               sci/dci (Din 3072): 28.31 MB            2.61
    tiny (S=56)  8*3*56*56*4   = 301,056 B     mlp (P'=16, Din=32): 8*16*32*2 = 8,192 B 0.027

So for CLIP-L choose features for compute, not bandwidth (and not with sci/dci, which triple Din);
the tiny model's ratio is an artefact of its 32-wide tower. Features also freeze the tower's numerics
into the data: a later tower change needs a re-run.
Shapes and dtypes of a row: see pipelines/data/preprocess.py (T max_length, M max tiles, S tile side).
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass, field
from typing import Literal

import ray

from pipelines import storage
from pipelines.data.preprocess import IMAGE_EXTS, Preprocessor, ShardReader, metrics_actor
from pipelines.storage import StorageConfig
from slime.config import VisualMode

log = logging.getLogger(__name__)
_SHARD_NAME = re.compile(r"shard-(\d+)-(\d+)\.tar$")
CONTRACT_COLUMNS = ("input_ids", "attention_mask", "labels", "instruction_mask", "pixel_values", "tile_mask",
                    "grid", "image_size", "has_image", "num_visual_tokens")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    shards: str | tuple[str, ...]  # manifest.json URI, dataset dir/prefix, or tar URIs (local or s3://)
    model: str  # model directory (ModelConfig + tokenizer/; + weights for features), local or s3://
    mode: VisualMode = "both"
    gamma: float | None = None
    output: Literal["pixels", "features"] = "pixels"
    num_actors: int | tuple[int, int] = 1  # fixed pool, or (min, max) to autoscale
    actor_num_cpus: float = 0.5  # fractional: whole-CPU actors + 1-CPU reads hang a 2-CPU node
    actor_num_gpus: float = 0.0  # fractional allowed; no GPU in the cluster -> CPU with a warning
    # Always explicit: Ray requires it with GPUs, and a whole-block batch of CLIP-L pixels is GBs.
    batch_size: int = 8
    max_tasks_in_flight_per_actor: int = 2  # queued batches per actor (overlaps its input with compute)
    read_num_cpus: float = 0.25
    # Shard reads at once (None = as many as the CPUs allow). Each read task needs a worker process, and a
    # burst of them delays the preprocessing actor: on 2 cores, ten 0.25-CPU reads took the CPU budget for
    # 30 s and the actor started 54 s after the pipeline, against 5-10 s with 2 (a shard read is I/O, fast).
    read_concurrency: int | None = 2
    shuffle: Literal["files", "none"] = "none"
    seed: int = 0
    preserve_order: bool = False
    only_versions: tuple[int, ...] | None = None  # e.g. (7,) = only the shards packed in dataset version 7
    exclude: tuple[str, ...] = ()  # shard names or URIs to leave out
    metrics_name: str = "DataMetrics"  # name of the counters actor (one per concurrent pipeline)
    # Samples one pass yields at most (None = all). A training phase sets it to the samples its steps consume, so
    # a phase shorter than an epoch stops reading and preprocessing there instead of streaming on ahead (a smaller
    # limit set in the run's data section stays).
    limit: int | None = None
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        for name in ("shards", "exclude", "only_versions"):  # YAML and callers hand over lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        sizes = self.num_actors if isinstance(self.num_actors, tuple) else (self.num_actors,)
        if not sizes or min(sizes) < 1 or len(sizes) > 2 or sizes != tuple(sorted(sizes)):
            raise ValueError(f"num_actors must be an int >= 1 or (min, max) with 1 <= min <= max, "
                             f"got {self.num_actors}")
        if self.actor_num_cpus < 0 or self.actor_num_gpus < 0 or self.read_num_cpus < 0:
            raise ValueError("actor_num_cpus, actor_num_gpus and read_num_cpus must be >= 0")
        if self.read_concurrency is not None and self.read_concurrency < 1:
            raise ValueError(f"read_concurrency must be >= 1 or null, got {self.read_concurrency}")
        if self.gamma is not None and not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if isinstance(self.shards, tuple) and not self.shards:
            raise ValueError("shards is an empty list")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")


# ----------------------------------------------------------------------------- shards


def _version(uri: str) -> int | None:
    m = _SHARD_NAME.search(uri)
    return int(m.group(1)) if m else None


def list_shards(cfg: DataConfig) -> list[str]:
    """Shard URIs to read, manifest-aware: a manifest (given, or found in the directory) lists exactly
    the committed shards; a directory without one lists its ``*.tar``. ``only_versions`` keeps shards
    of those dataset versions (from the manifest, else the ``shard-{version}-{index}.tar`` name);
    ``exclude`` drops names or URIs."""
    from pipelines.data.pack import read_manifest

    st = cfg.storage
    if isinstance(cfg.shards, tuple):
        found = [(u, _version(u)) for u in cfg.shards]
    else:
        uri = cfg.shards.rstrip("/")
        if uri.endswith(".tar"):
            found = [(uri, _version(uri))]
        else:
            root = posixpath.dirname(uri) if uri.endswith("manifest.json") else uri
            if not storage.exists(root, st):
                raise FileNotFoundError(f"no shards at {root}: the path does not exist")
            if uri.endswith("manifest.json") or storage.exists(storage.join(root, "manifest.json"), st):
                found = [(storage.join(root, s["name"]), s["version"]) for s in read_manifest(root, st)["shards"]]
            else:
                found = [(storage.join(root, n), _version(n)) for n in storage.listdir(root, st) if n.endswith(".tar")]
    excluded = set(cfg.exclude)
    out = [u for u, v in found
           if (cfg.only_versions is None or v in cfg.only_versions)
           and u not in excluded and posixpath.basename(u) not in excluded]
    if not out:
        raise FileNotFoundError(f"no shards selected from {cfg.shards}: it has no manifest.json or *.tar "
                                f"(only_versions={cfg.only_versions}, exclude={list(cfg.exclude)})")
    return out


def read_target(uris: list[str], st: StorageConfig):
    """(paths, filesystem) for Ray: local paths + None, or ``bucket/key`` paths + an s3fs object that
    carries endpoint and credentials (it is pickled to the read tasks; env vars of the driver are not)."""
    remote = {storage.is_s3(u) for u in uris}
    if len(remote) > 1:
        raise ValueError("shards mix local paths and s3:// URIs; read them as two datasets")
    if not remote.pop():
        return [storage.filesystem(u)[1] for u in uris], None
    fs, _ = storage.filesystem(uris[0], st)
    return [u.split("://", 1)[1] for u in uris], fs


# ----------------------------------------------------------------------------- the dataset


def _actor_gpus(cfg: DataConfig) -> float:
    if cfg.actor_num_gpus and not ray.cluster_resources().get("GPU", 0):
        log.warning("actor_num_gpus=%s but the cluster has no GPUs: preprocessing actors run on CPU",
                    cfg.actor_num_gpus)
        return 0.0
    return cfg.actor_num_gpus


def read_concurrency(configured: int | None, files: int) -> int | None:
    """Shard reads at once: the configured number, never more than the files (one read task reads at least one
    file; more would only make Ray Data warn that the operator cannot use them)."""
    return None if configured is None else max(1, min(configured, files))


def build_dataset(cfg: DataConfig, epoch: int = 0) -> ray.data.Dataset:
    """Lazy dataset of contract rows (+ ``sample_hash`` int64; + ``vision_features`` instead of
    ``pixel_values`` in features mode). Nothing runs until it is iterated."""
    from ray.data import ActorPoolStrategy, FileShuffleConfig

    if not ray.is_initialized():
        ray.init()
    metrics_actor(cfg.metrics_name)  # created here so the driver owns it (see metrics_actor)
    paths, fs = read_target(list_shards(cfg), cfg.storage)
    # reseed_after_execution: every re-execution of this dataset (each Train epoch) gets a new,
    # still deterministic, file order; epoch picks the starting point when a dataset is rebuilt.
    shuffle = FileShuffleConfig(seed=cfg.seed + epoch, reseed_after_execution=True) if cfg.shuffle == "files" else None
    # One read block per actor batch: an actor task then ends (and its rows flow on) after one batch,
    # not after a whole shard; measured first batch 15 s -> see benchmarks/data_throughput.py.
    reader = ShardReader(paths, filesystem=fs, shuffle=shuffle, metrics_name=cfg.metrics_name,
                         rows_per_block=cfg.batch_size)
    ds = ray.data.read_datasource(reader, num_cpus=cfg.read_num_cpus,
                                  concurrency=read_concurrency(cfg.read_concurrency, len(paths)))
    sizes = cfg.num_actors if isinstance(cfg.num_actors, tuple) else (cfg.num_actors, cfg.num_actors)
    ds = ds.map_batches(
        Preprocessor,
        fn_constructor_kwargs=dict(model=cfg.model, mode=cfg.mode, gamma=cfg.gamma, output=cfg.output,
                                   storage_cfg=cfg.storage, metrics_name=cfg.metrics_name),
        compute=ActorPoolStrategy(min_size=sizes[0], max_size=sizes[1],
                                  max_tasks_in_flight_per_actor=cfg.max_tasks_in_flight_per_actor),
        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.actor_num_cpus, num_gpus=_actor_gpus(cfg),
        zero_copy_batch=True)
    if cfg.limit is not None:  # after the Preprocessor: dropped samples do not count
        ds = ds.limit(cfg.limit)
    ds.context.execution_options.preserve_order = cfg.preserve_order  # this dataset only, not the process
    return ds


def data_metrics(cfg: DataConfig | str = "DataMetrics") -> dict[str, int]:
    """``{"ok": n, reason: count}`` summed over every worker of the pipeline named by ``cfg``."""
    name = cfg.metrics_name if isinstance(cfg, DataConfig) else cfg
    return ray.get(metrics_actor(name).get.remote())


def shards_read(cfg: DataConfig | str = "DataMetrics") -> dict[str, int]:
    """``{shard path: samples read}`` for every shard a read task of the pipeline opened (0 = opened, not
    finished; summed over executions, so a shard read in two epochs counts twice). Paths are as Ray
    read them: local paths, or ``bucket/key`` for S3."""
    name = cfg.metrics_name if isinstance(cfg, DataConfig) else cfg
    return ray.get(metrics_actor(name).get_shards.remote())


def reset_data_metrics(cfg: DataConfig | str = "DataMetrics") -> None:
    name = cfg.metrics_name if isinstance(cfg, DataConfig) else cfg
    ray.get(metrics_actor(name).reset.remote())


# ----------------------------------------------------------------------------- Ray Train side


def torch_dtypes(cfg: DataConfig) -> dict:
    import torch

    dtypes = {"input_ids": torch.int64, "attention_mask": torch.int64, "labels": torch.int64,
              "instruction_mask": torch.bool, "tile_mask": torch.bool, "grid": torch.int64,
              "image_size": torch.int64, "has_image": torch.bool, "num_visual_tokens": torch.int64,
              "sample_hash": torch.int64}
    if cfg.output == "features":
        return dtypes | {"vision_features": torch.float16}
    return dtypes | {"pixel_values": torch.float32}


def torch_batch_kwargs(cfg: DataConfig, batch_size: int, *, drop_last: bool = False,
                       prefetch_batches: int = 2) -> dict:
    """Keyword arguments for ``iter_torch_batches`` with the default collate (every column is numeric).
    Drop ``sample_hash`` before ``model(**batch)``; it identifies samples, it is not a model input."""
    return dict(batch_size=batch_size, dtypes=torch_dtypes(cfg), drop_last=drop_last, prefetch_batches=prefetch_batches)


def ingest_options(cfg: DataConfig):
    """ExecutionOptions for ``ray.train.DataConfig(execution_options=...)``: Train builds its own from the
    process-wide DataContext, which would drop ``preserve_order`` set on the dataset."""
    from ray.data import ExecutionOptions

    opts = ExecutionOptions()
    opts.preserve_order = cfg.preserve_order
    return opts


__all__ = ["CONTRACT_COLUMNS", "IMAGE_EXTS", "DataConfig", "build_dataset", "data_metrics", "ingest_options",
           "list_shards", "reset_data_metrics", "shards_read", "torch_batch_kwargs", "torch_dtypes"]
