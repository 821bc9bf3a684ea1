"""Pack LLaVA-format JSON/JSONL + images into versioned webdataset tar shards (local or s3://).

Layout of a packed dataset directory::

    manifest.json                      the commit point: only shards listed here exist for readers
    shard-{version:06d}-{index:06d}.tar  members `<key>.json` (+ `<key>.<jpg|jpeg|png|webp>`), adjacent
    ids-{version:06d}.txt              ids accepted in that version (duplicate detection on append)
    rejects.jsonl                      one line per skipped record: source, line/index, id, reason

Each run is one ``dataset_version``. A source whose sha256 is already in the manifest is skipped,
so re-running is a no-op; new sources append new shards only. Shards, ids and rejects are written
before the manifest, which is replaced atomically last: a crash leaves orphan files that no reader
lists (and the retry overwrites), never a manifest that names missing data. One writer at a time.
Images are stored byte-for-byte as found; readers decode (``read_webdataset(decoder=None)``).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import io
import json
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass, field

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipelines import storage
from pipelines.storage import StorageConfig

REASONS = ("bad_json", "missing_image", "undecodable_image", "image_too_large", "image_token_mismatch",
           "empty_conversation", "malformed_conversation", "duplicate_id", "path_escape")
IMAGE_TOKEN = "<image>"
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True, kw_only=True)
class PackConfig:
    inputs: tuple[str, ...]  # LLaVA .json (a list) or .jsonl files, local or s3://
    output_dir: str  # the dataset directory (local or s3://)
    image_root: str | None = None  # default: the directory of each input file
    # Image paths must resolve inside the image root (no ``../``, no symlink pointing out). Absolute
    # paths and URIs are refused too unless this is set, for JSON files that were written with them.
    allow_absolute_paths: bool = False
    max_samples_per_shard: int = 1000
    max_bytes_per_shard: int = 256 * 1024 * 1024
    max_pixels: int = 40_000_000
    num_threads: int = 4  # image fetch + check threads (I/O bound on S3; PIL decode releases the GIL)
    progress: bool = True
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs must name at least one JSON/JSONL file")
        if self.max_samples_per_shard < 1 or self.max_bytes_per_shard < 1:
            raise ValueError("max_samples_per_shard and max_bytes_per_shard must be >= 1")


class Reject(Exception):
    """A record-level problem: logged to rejects.jsonl with its reason code, never fatal."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_manifest(dataset_uri: str, storage_cfg: StorageConfig | None = None) -> dict:
    """The dataset manifest, or an empty version-0 manifest when nothing was packed yet."""
    uri = storage.join(dataset_uri, "manifest.json")
    if not storage.exists(uri, storage_cfg):
        return {"dataset_version": 0, "shards": [], "num_samples": 0, "sources": [], "rejects": 0, "ids_files": []}
    return json.loads(storage.read_bytes(uri, storage_cfg))


def shard_uris(dataset_uri: str, manifest: dict | None = None, storage_cfg: StorageConfig | None = None,
               max_version: int | None = None) -> list[str]:
    """Full URIs of the committed shards (optionally only versions <= ``max_version``, to pin a
    training run to a dataset snapshot). Pass these, not the directory, to ``read_webdataset``."""
    manifest = manifest if manifest is not None else read_manifest(dataset_uri, storage_cfg)
    return [storage.join(dataset_uri, s["name"]) for s in manifest["shards"]
            if max_version is None or s["version"] <= max_version]


def iter_records(data: bytes, source: str):
    """Yield (where, record-or-Reject): where = {"line": n} for JSONL (1-based), {"index": i} for JSON."""
    text = data.decode("utf-8", errors="replace")
    if source.endswith(".jsonl") or not text.lstrip().startswith("["):  # a lone {...} reads as one line
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield {"line": n}, json.loads(line)
            except json.JSONDecodeError as e:
                yield {"line": n}, Reject("bad_json", str(e))
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:  # one broken byte loses the whole array: say so, once
        yield {"index": None}, Reject("bad_json", f"whole file unreadable: {e}")
        return
    for i, rec in enumerate(records):
        yield {"index": i}, rec


def check_record(rec: object) -> None:
    """Structure and <image> placement; raises Reject. Text-only records (no image) are valid."""
    if not isinstance(rec, dict):
        raise Reject("malformed_conversation", f"record is a {type(rec).__name__}, not an object")
    rid = rec.get("id")
    if not isinstance(rid, (str, int)) or not str(rid) or "\n" in str(rid):  # ids-*.txt is one id per line
        raise Reject("malformed_conversation", f"id must be a non-empty one-line string, got {rid!r:.80}")
    image = rec.get("image")
    conv = rec.get("conversations")
    if (image is not None and (not isinstance(image, str) or not image)) or not isinstance(conv, list):
        raise Reject("malformed_conversation", f"image must be a path string and conversations a list, got "
                     f"{image!r:.80} / {type(conv).__name__}")
    if not conv:
        raise Reject("empty_conversation", "conversations is empty")
    for i, turn in enumerate(conv):
        want = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
            raise Reject("malformed_conversation", f"turn {i}: want from={want!r} + string value, got {turn!r:.80}")
    if len(conv) % 2:
        raise Reject("malformed_conversation", "last turn is from human: no answer to train on")
    count = sum(t["value"].count(IMAGE_TOKEN) for t in conv)
    if count != (1 if image else 0):
        raise Reject("image_token_mismatch", f"{count} {IMAGE_TOKEN} tokens for {'one image' if image else 'no image'}")


def check_image(data: bytes, path: str, max_pixels: int) -> tuple[str, int, int]:
    """(member extension, width, height) of encoded image bytes; raises Reject."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
            if fmt in _FORMAT_EXT and w * h <= max_pixels:
                im.verify()  # structural check (PNG CRCs) without decoding
    except Image.DecompressionBombError as e:
        raise Reject("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types for garbage input
        raise Reject("undecodable_image", f"{type(e).__name__}: {e}") from None
    if fmt not in _FORMAT_EXT:
        raise Reject("undecodable_image", f"format {fmt} is not one of jpg/jpeg/png/webp")
    if w * h > max_pixels:
        raise Reject("image_too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    try:  # only a real decode finds a truncated file; JPEG draft (1/8 scale) still reads every byte
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
    except Exception as e:
        raise Reject("undecodable_image", f"{type(e).__name__}: {e}") from None
    ext = _FORMAT_EXT[fmt]
    return ("jpeg" if ext == "jpg" and path.lower().endswith(".jpeg") else ext), w, h


def _fetch_image(uri: str, path: str, cfg: PackConfig, cache: dict) -> tuple[bytes, str, int, int, str]:
    """(bytes, ext, width, height, sha256). Checks are cached by content hash: LLaVA data asks many
    questions about one image, and decoding it once per record would dominate the run."""
    try:
        data = storage.read_bytes(uri, cfg.storage)
    except (FileNotFoundError, IsADirectoryError):
        raise Reject("missing_image", f"{uri} not found") from None
    digest = hashlib.sha256(data).hexdigest()
    key = (digest, path.lower().endswith(".jpeg"))
    if key not in cache:
        try:
            cache[key] = check_image(data, path, cfg.max_pixels)
        except Reject as r:
            cache[key] = r
    if isinstance(cache[key], Reject):
        raise cache[key]
    return (data, *cache[key], digest)


class _ShardWriter:
    """Rolls tar shards by sample count and bytes; each shard is built in a local temp file, hashed,
    then published (upload / os.replace) so no reader ever sees a partial shard."""

    def __init__(self, cfg: PackConfig, version: int, tmpdir: str):
        self.cfg, self.version, self.tmpdir = cfg, version, tmpdir
        self.entries: list[dict] = []
        self.tar = self.file = None
        self.count = self.bytes = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(512 + -(-len(v) // 512) * 512 for v in members.values())  # tar header + padded data
        cfg = self.cfg
        if self.tar and (self.count >= cfg.max_samples_per_shard or self.bytes + size > cfg.max_bytes_per_shard):
            self._close()
        if self.tar is None:
            self.file = open(os.path.join(self.tmpdir, "shard.tar"), "wb")
            # encoder=False: bytes in, bytes out; fixed mtime: same input -> byte-identical shard
            self.tar = wds.TarWriter(self.file, encoder=False, mtime=0.0)
            self.count = self.bytes = 0
        self.tar.write({"__key__": key, **members})  # TarWriter keeps a sample's members adjacent
        self.count, self.bytes = self.count + 1, self.bytes + size

    def _close(self) -> None:
        self.tar.close()
        self.file.close()
        local = self.file.name
        with open(local, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        name = f"shard-{self.version:06d}-{len(self.entries):06d}.tar"
        storage.upload_file(local, storage.join(self.cfg.output_dir, name), self.cfg.storage)
        self.entries.append({"name": name, "samples": self.count, "bytes": os.path.getsize(local),
                             "sha256": digest, "version": self.version})
        os.unlink(local)
        self.tar = self.file = None

    def finish(self) -> list[dict]:
        if self.tar is not None:
            self._close()
        return self.entries


def _image_uri(root: str, path: str, allow_absolute: bool) -> str:
    """Where a record's image lives; raises Reject("path_escape") for a path that leaves the image root
    (a record must not make pack read, and publish into shards, arbitrary files of the machine)."""
    if "://" in path or os.path.isabs(path) or path.startswith("~"):
        if not allow_absolute:
            raise Reject("path_escape", f"{path!r} is absolute; image paths are relative to the image root "
                         "(set allow_absolute_paths=true to accept absolute paths)")
        return path if "://" in path else os.path.expanduser(path)
    if storage.is_s3(root):
        rel = posixpath.normpath(path)
        if rel == ".." or rel.startswith("../"):
            raise Reject("path_escape", f"{path!r} resolves outside the image root {root}")
        return storage.join(root, rel)
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, *path.split("/")))  # follows symlinks
    if os.path.commonpath([base, real]) != base:
        raise Reject("path_escape", f"{path!r} resolves to {real}, outside the image root {base}")
    return real


def _members(rec: dict, image: tuple | None, provenance: dict) -> dict[str, bytes]:
    """Tar members of one sample: ``json`` (conversation + provenance) and the untouched image bytes."""
    data, ext, width, height, digest = image or (None, None, None, None, None)
    meta = {"id": str(rec["id"]), "conversations": rec["conversations"], "qtype": rec.get("qtype"),
            "task": rec.get("task"), "image_ext": ext, "image_size": [width, height] if image else None,
            "provenance": provenance | {"image": rec.get("image"), "image_sha256": digest}}
    members = {"json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()}
    return members | ({ext: data} if image else {})


def _commit(cfg: PackConfig, manifest: dict, version: int, sources: list[dict], shards: list[dict],
            accepted: list[str], rejects: list[dict]) -> dict:
    """ids and rejects first, the manifest last: its atomic replace is what publishes the version."""
    out, st = cfg.output_dir, cfg.storage
    ids_name = f"ids-{version:06d}.txt"
    storage.write_bytes_atomic(storage.join(out, ids_name), "".join(f"{i}\n" for i in accepted).encode(), st)
    if rejects:  # S3 cannot append: read, extend, put (one writer at a time is the contract)
        log_uri = storage.join(out, "rejects.jsonl")
        old = storage.read_bytes(log_uri, st) if storage.exists(log_uri, st) else b""
        new = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejects).encode()
        storage.write_bytes_atomic(log_uri, old + new, st)
    manifest = {"dataset_version": version, "shards": manifest["shards"] + shards,
                "num_samples": manifest["num_samples"] + len(accepted), "sources": manifest["sources"] + sources,
                "rejects": manifest["rejects"] + len(rejects), "ids_files": manifest["ids_files"] + [ids_name]}
    storage.write_bytes_atomic(storage.join(out, "manifest.json"), json.dumps(manifest, indent=1).encode(), st)
    return manifest


def pack(cfg: PackConfig) -> dict:
    """Append the new sources in ``cfg.inputs`` to the dataset at ``cfg.output_dir``; returns a summary."""
    start = time.perf_counter()
    out, st = cfg.output_dir, cfg.storage
    manifest = read_manifest(out, st)
    known = {s["sha256"] for s in manifest["sources"]}
    missing = [src for src in cfg.inputs if not storage.exists(src, st)]
    if missing:  # checked before anything is read or written
        raise FileNotFoundError(f"input file{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)}")
    if cfg.image_root and not storage.exists(cfg.image_root, st):
        raise FileNotFoundError(f"image_root {cfg.image_root} does not exist")
    todo, skipped = [], []
    for src in cfg.inputs:
        data = storage.read_bytes(src, st)
        digest = hashlib.sha256(data).hexdigest()
        (skipped if digest in known else todo).append((src, data, digest))
        known.add(digest)
    summary = {"dataset_uri": out, "dataset_version": manifest["dataset_version"], "new_version": bool(todo),
               "written_shards": [], "samples": 0, "num_samples": manifest["num_samples"],
               "rejects": dict.fromkeys(REASONS, 0), "skipped_sources": [s for s, _, _ in skipped], "elapsed_s": 0.0}
    if not todo:
        return summary

    version = manifest["dataset_version"] + 1
    seen = {i for name in manifest["ids_files"]
            for i in storage.read_bytes(storage.join(out, name), st).decode().split("\n") if i}
    accepted: list[str] = []
    rejects: list[dict] = []
    checked: dict = {}  # (sha256, is .jpeg) -> check_image result or Reject

    def reject(src: str, where: dict, rid, r: Reject) -> None:
        rejects.append({"dataset_version": version, "source": src, **where, "id": rid, "reason": r.reason,
                        "detail": r.detail})

    def finish(src: str, where: dict, rec: dict, fut: cf.Future | None) -> None:
        rid = str(rec["id"])
        try:
            if rid in seen:  # decided in input order, so in-flight duplicates resolve like a serial run
                raise Reject("duplicate_id", f"id {rid!r} already in the dataset")
            image = fut.result() if fut is not None else None
        except Reject as r:
            return reject(src, where, rid, r)
        seen.add(rid)
        accepted.append(rid)
        members = _members(rec, image, {"source": src, **where, "dataset_version": version})
        writer.write(f"{version:06d}-{len(accepted):09d}", members)

    with tempfile.TemporaryDirectory(prefix="slime-pack-") as tmpdir, \
            cf.ThreadPoolExecutor(max(1, cfg.num_threads)) as pool, \
            tqdm(desc=f"pack v{version}", unit="rec", disable=None if cfg.progress else True) as bar:
        writer = _ShardWriter(cfg, version, tmpdir)
        pending: collections.deque = collections.deque()
        for src, data, _ in todo:
            root = cfg.image_root or (posixpath.dirname(src) if storage.is_s3(src) else os.path.dirname(src))
            for where, rec in iter_records(data, src):
                bar.update()
                try:
                    if isinstance(rec, Reject):
                        raise rec
                    check_record(rec)
                    if str(rec["id"]) in seen:  # cheap early exit; finish() re-checks in order
                        raise Reject("duplicate_id", f"id {rec['id']!r} already in the dataset")
                    image = rec.get("image")
                    uri = _image_uri(root, image, cfg.allow_absolute_paths) if image else None
                except Reject as r:
                    reject(src, where, rec.get("id") if isinstance(rec, dict) else None, r)
                    continue
                fut = pool.submit(_fetch_image, uri, image, cfg, checked) if image else None
                pending.append((src, where, rec, fut))
                while len(pending) > 4 * cfg.num_threads:  # bound the image bytes held in memory
                    finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
        shards = writer.finish()

    sources = [{"path": s, "sha256": d, "version": version} for s, _, d in todo]
    manifest = _commit(cfg, manifest, version, sources, shards, accepted, rejects)
    for r in rejects:
        summary["rejects"][r["reason"]] += 1
    elapsed = time.perf_counter() - start
    return summary | {"dataset_version": version, "written_shards": [s["name"] for s in shards],
                      "samples": len(accepted), "num_samples": manifest["num_samples"],
                      "elapsed_s": round(elapsed, 2), "samples_per_s": round(len(accepted) / max(elapsed, 1e-9), 1)}
