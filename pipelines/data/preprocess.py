"""What runs inside the Ray Data workers: the shard reader, the Preprocessor actor, the drop counters.

* ``ShardReader`` streams webdataset tars (members ``{key}.{jpg|jpeg|png|webp}`` + ``{key}.json``,
  adjacent, as pipelines/data/pack.py writes them) into rows ``key · image (bytes|None) · json (bytes)``.
  It exists because ``ray.data.read_webdataset`` fails the whole job on one truncated shard (measured on
  Ray 2.60: ``tarfile.ReadError: unexpected end of data`` -> ``RayTaskError`` after one attempt, no
  option to skip), and wrapping it cannot work either: it buffers 512 samples before yielding, so the
  good samples before the damage would be lost with it. Here a tar-level error ends that shard only:
  the complete samples read so far are kept and the shard is counted as ``bad_shard``. Bytes stay raw
  (the read stage is cheap; decoding happens in the actors) and all images land in one ``image``
  column whatever their extension, so blocks from different shards share one schema.
* ``Preprocessor`` (callable class, one per actor) turns a batch of rows into contract samples with
  SlimeProcessor; in ``features`` mode it also runs the frozen VisionTower + DenseConnector.
* ``DataMetrics`` (named actor, driver-owned) sums ``{"ok": n, reason: count}`` over every worker, and
  records each shard a read task opened with the samples it read from it (what a run really read).

Shapes (B rows in a batch): T max_length · M max tiles · S tile side · P' tokens/tile · Din fused width.
    out: input_ids/attention_mask/labels int64 [B, T] · instruction_mask bool [B, T]
         pixel_values float32 [B, M, 3, S, S]  (features mode: vision_features float16 [B, M, P', Din])
         tile_mask bool [B, M] · grid/image_size int64 [B, 2] · has_image bool [B]
         num_visual_tokens int64 [B] · sample_hash int64 [B]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

from pipelines import storage
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BYTES_PER_BLOCK = 64 << 20


# ----------------------------------------------------------------------------- drop counters


@ray.remote(num_cpus=0)
class DataMetrics:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.shards: Counter = Counter()  # shard path -> samples read (0 while its read is under way)

    def add(self, counts: dict[str, int], shards: dict[str, int] | None = None) -> None:
        self.counts.update(counts)
        for path, n in (shards or {}).items():
            self.shards[path] += n

    def get(self) -> dict[str, int]:
        return dict(self.counts)

    def get_shards(self) -> dict[str, int]:
        return dict(self.shards)

    def reset(self) -> None:
        self.counts.clear()
        self.shards.clear()


_HANDLES: dict[str, ray.actor.ActorHandle] = {}


def metrics_actor(name: str):
    """Get-or-create, cached per process. Call it in the driver first: a non-detached actor dies with
    its owner or as soon as the owner drops its last handle, so the driver keeps one (the cache) for
    the life of the job; a Ray Data worker as owner would take the counts down when the pool shrinks.
    Created on the creator's (the driver's) node: on a worker node, losing that node would fail every later
    read task's report, and with it every restart of the run (measured: tests/test_multinode.py)."""
    if name not in _HANDLES:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # hard: a soft affinity was not honoured (measured: 2 of 4 such actors landed on worker nodes)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        _HANDLES[name] = DataMetrics.options(name=name, get_if_exists=True, lifetime=None,
                                             scheduling_strategy=here).remote()
    return _HANDLES[name]


def _report(name: str, counts: dict[str, int], shards: dict[str, int] | None = None) -> None:
    counts = {k: int(v) for k, v in counts.items() if v}
    if counts or shards:
        # Waited on: the driver reads the totals right after the last batch, so a count still in
        # flight would be lost (calls from different processes to one actor are not ordered).
        ray.get(metrics_actor(name).add.remote(counts, shards))


# ----------------------------------------------------------------------------- reading


class ShardReader(FileBasedDatasource):
    """Webdataset tars -> rows (key: str, image: bytes|None, json: bytes|None); see module docstring."""

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths: list[str], *, metrics_name: str, rows_per_block: int = 64, **kwargs) -> None:
        super().__init__(paths, **kwargs)
        self.metrics_name, self.rows_per_block = metrics_name, rows_per_block

    def _read_stream(self, f: pa.NativeFile, path: str):
        counts: Counter = Counter()
        rows: list[dict] = []
        size, num_rows = 0, 0
        # The shard is recorded as opened before any row flows: a run that stops early (steps reached)
        # may never finish a read, and it still read from that shard.
        _report(self.metrics_name, {}, {path: 0})
        for sample in iter_tar_samples(f, path, counts):
            rows.append(sample)
            size += len(sample["json"]) + len(sample["image"] or b"")
            if len(rows) >= self.rows_per_block or size >= _BYTES_PER_BLOCK:
                num_rows += len(rows)
                yield _block(rows)
                rows, size = [], 0
        if rows:
            num_rows += len(rows)
            yield _block(rows)
        _report(self.metrics_name, counts, {path: num_rows})


def iter_tar_samples(f, path: str, counts: Counter):
    """One webdataset tar, read as a stream (never seeks: works on S3 bodies) -> samples ``{key, image,
    json}`` in order; what is skipped is counted in ``counts`` (module docstring). ``ShardReader`` reads
    shards with it in Ray Data, ``pipelines.harness`` without Ray."""
    sample: dict | None = None
    try:
        stream = tarfile.open(fileobj=f, mode="r|*")
        for info in stream:
            if not info.isreg():
                continue
            folder, base = os.path.split(info.name)
            stem, _, ext = base.partition(".")  # webdataset key = everything before the first "."
            ext = ext.lower()
            if not stem or (ext != "json" and ext not in IMAGE_EXTS):
                counts["bad_member"] += 1
                continue
            key = f"{folder}/{stem}" if folder else stem
            if sample is None or sample["key"] != key:
                # the previous sample is complete: out before reading, so a truncated next member cannot
                # take it down
                if sample is not None:
                    if sample["json"] is None:
                        counts["missing_json"] += 1
                    else:
                        yield sample
                sample = {"key": key, "image": None, "json": None}
            data = stream.extractfile(info).read()
            slot = "json" if ext == "json" else "image"
            if sample[slot] is not None:  # a second image or json for one key: keep the first
                counts["bad_member"] += 1
                continue
            sample[slot] = data
    except (tarfile.TarError, EOFError) as e:
        # Truncated or garbled tar: the sample in progress may be missing members, so it is dropped;
        # everything complete before it was already kept.
        counts["bad_shard"] += 1
        log.warning("skipping the rest of shard %s: %s: %s", path, type(e).__name__, e)
        return
    if sample is not None:
        if sample["json"] is None:
            counts["missing_json"] += 1
        else:
            yield sample


def _block(rows: list[dict]) -> pa.Table:
    return pa.table({"key": pa.array([r["key"] for r in rows], pa.string()),
                     "image": pa.array([r["image"] for r in rows], pa.large_binary()),
                     "json": pa.array([r["json"] for r in rows], pa.large_binary())})


def sample_hash(key: str) -> int:
    """Stable int64 id of a sample (its webdataset key): numeric, so it survives iter_torch_batches."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


# ----------------------------------------------------------------------------- preprocessing


def _local_model_dir(model: str, storage_cfg: StorageConfig | None) -> str:
    from slime.storage import local_copy  # the one model cache: keyed by content, safe for concurrent actors

    return local_copy(model, fs=storage.filesystem(model, storage_cfg)[0] if storage.is_s3(model) else None)


def load_vision(model_dir: str, cfg, device: str):
    """(VisionTower, DenseConnector) of a model directory, nothing else: a preprocessing actor must not
    materialise the LLM (load_pretrained would build all of SlimeModel, 7B+ parameters for real presets)."""
    import torch
    from safetensors import safe_open

    from slime.connectors import DenseConnector
    from slime.vision import build_vision_tower

    with open(os.path.join(model_dir, "vision_config.json")) as fh:
        tower = build_vision_tower(cfg.vision, json.load(fh))
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as fh:
        state = {k.removeprefix("vision."): fh.get_tensor(k) for k in fh.keys() if k.startswith("vision.")}
    tower.load_state_dict(state)  # strict: a renamed parameter must not leave a random tower behind
    dtype = torch.float16 if device.startswith("cuda") else torch.float32  # fp16 CPU matmuls are slow/unsupported
    return tower.to(device, dtype).eval(), DenseConnector(cfg.connector, cfg.vision).to(device)


class Preprocessor:
    """Rows (key, image bytes, json bytes) -> contract samples. A row that fails is dropped and counted
    by reason (``bad_json`` or the InputError ``code``: invalid_image, image_too_large,
    context_length_exceeded, image_count_mismatch, ...); the batch goes on."""

    _TILE_CHUNK = 32  # tiles per tower call: bounds activation memory on large batches

    def __init__(self, *, model: str, mode: str, gamma: float | None, output: str,
                 storage_cfg: StorageConfig | None, metrics_name: str) -> None:
        import torch

        from slime.checkpoint import load_config
        from slime.processing import SlimeProcessor
        from slime.tokenizer import load_tokenizer

        local = _local_model_dir(model, storage_cfg)
        self.cfg = load_config(local)
        self.processor = SlimeProcessor(self.cfg, load_tokenizer(os.path.join(local, "tokenizer")))
        self.mode, self.gamma, self.output, self.metrics_name = mode, gamma, output, metrics_name
        t, m, s = self.cfg.max_length, self.cfg.tiling.max_tiles, self.cfg.vision.image_size
        self.shapes = {"input_ids": ((t,), np.int64), "attention_mask": ((t,), np.int64), "labels": ((t,), np.int64),
                       "instruction_mask": ((t,), np.bool_), "pixel_values": ((m, 3, s, s), np.float32),
                       "tile_mask": ((m,), np.bool_), "grid": ((2,), np.int64), "image_size": ((2,), np.int64),
                       "has_image": ((), np.bool_), "num_visual_tokens": ((), np.int64)}
        if output == "features":
            # A logical GPU without CUDA behind it (tests, misconfigured nodes) computes on CPU.
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.tower, self.connector = load_vision(local, self.cfg, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from slime.errors import InputError

        counts: Counter = Counter()
        samples, hashes = [], []
        for key, image, meta in zip(batch["key"], batch["image"], batch["json"]):
            try:
                record = json.loads(meta)
                if not isinstance(record, dict):
                    raise ValueError(f"json member is a {type(record).__name__}, not an object")
            except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                counts["bad_json"] += 1
                log.debug("sample %s: bad json: %s", key, e)
                continue
            try:
                img = self.processor.decode_image(image) if image is not None else None
                samples.append(self.processor(record, img, self.mode, self.gamma))
            except InputError as e:
                counts[e.code] += 1
                log.debug("sample %s dropped: %s", key, e)
                continue
            hashes.append(sample_hash(str(key)))
        counts["ok"] = len(samples)
        _report(self.metrics_name, counts)
        out = {k: np.stack([s[k] for s in samples]).astype(dt, copy=False) if samples
               else np.zeros((0, *shape), dt) for k, (shape, dt) in self.shapes.items()}
        out["sample_hash"] = np.asarray(hashes, np.int64)
        if self.output == "features":
            out["vision_features"] = self.features(out.pop("pixel_values"), out["tile_mask"])
        return out

    def features(self, pixel_values: np.ndarray, tile_mask: np.ndarray) -> np.ndarray:
        """[B, M, 3, S, S] float32 + [B, M] -> [B, M, P', Din] float16, zeros on padded tiles."""
        import torch

        b, m = tile_mask.shape
        out = np.zeros((b, m, self.connector.num_tokens, self.connector.out_dim), np.float16)
        real = pixel_values[tile_mask]  # [N, 3, S, S], batch-major like the model's tile_features
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(real), self._TILE_CHUNK):
                x = torch.from_numpy(real[i:i + self._TILE_CHUNK]).to(self.device)
                chunks.append(self.connector(self.tower(x)).to("cpu", torch.float16).numpy())  # [n, P', Din]
        if chunks:
            out[tile_mask] = np.concatenate(chunks)
        return out
