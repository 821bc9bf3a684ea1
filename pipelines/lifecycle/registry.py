"""Model registry on local disk or ``s3://``: immutable versions plus one atomic "production" pointer.

Layout under the registry root::

    versions/<id>/model/         the exported model directory, copied in
    versions/<id>/metrics.json   evaluation metrics on the fixed validation set
    versions/<id>/lineage.json   dataset version + shard names seen, parent version, run config,
                                 code revision, created time. Written LAST: it marks the version complete.
    versions/<id>/verdict.json   {"verdict": "promoted"|"rejected", "reason", "time"} once decided
    production.json              {"version", "updated", "previous"}: one atomic write (temp + os.replace
                                 locally, a single PUT on S3), so a reader sees the old or the new pointer
    serving.json                 {"version", "updated"}: the version the Serve app was last rolled to
    decisions/<time>-<ns>-<rand>.json  one record per scheduler tick / promotion, append-only
    retrain.lock                 {"owner", "acquired", "heartbeat", "expires"}: at most one retrain at a time
                                 (retrain.lock.guard: local registries only, the flock around a takeover)

Version ids sort in registration order: ``v000007-20261122T030012Z``. A version killed while being
copied has no lineage.json and is invisible to ``list``/``get``; its number is never reused. Writers are
serialised by the scheduler's lock (``RegistryLock``: S3 conditional writes); readers need no lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipelines import storage

_ID_RE = re.compile(r"^v(\d{6})-\d{8}T\d{6}Z$")


def utc_now() -> datetime:
    return datetime.now(UTC)


def code_revision() -> str:
    """$SLIME_CODE_REVISION (set when the code ships as a zip), else ``git rev-parse HEAD``, else "unknown"."""
    if os.environ.get("SLIME_CODE_REVISION"):
        return os.environ["SLIME_CODE_REVISION"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def artifact(model_dir: str) -> dict[str, Any]:
    """What a version holds: ``{"artifact": "model"}``, or ``{"artifact": "adapter", "base": {uri, fingerprint}}``
    for a LoRA adapter (slime/lora.py), whose base the lineage then names."""
    from slime.lora import ADAPTER_META

    meta_uri = storage.join(model_dir, ADAPTER_META)
    if not storage.exists(meta_uri):
        return {"artifact": "model"}
    return {"artifact": "adapter", "base": json.loads(storage.read_bytes(meta_uri))["base"]}


@dataclass(frozen=True)
class Version:
    id: str
    uri: str  # versions/<id>
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    verdict: dict[str, Any] | None = field(default=None)

    @property
    def model_uri(self) -> str:
        return storage.join(self.uri, "model")

    @property
    def train_from(self) -> str:
        """The model a retrain starts from: this version's model, or an adapter's base (a new adapter is trained
        over the same base each time, never an adapter of an adapter)."""
        return self.lineage["base"]["uri"] if self.lineage.get("artifact") == "adapter" else self.model_uri

    @property
    def shards(self) -> list[str]:
        return list(self.lineage.get("shards", []))


class Registry:
    def __init__(self, root: str, now=utc_now):
        self.root = root.rstrip("/") if storage.is_s3(root) else root
        self.now = now

    # ------------------------------------------------------------------ paths / small I/O
    def _uri(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def _read_json(self, *parts: str) -> Any | None:
        try:
            return json.loads(storage.read_bytes(self._uri(*parts)))
        except FileNotFoundError:
            return None

    def _write_json(self, data: Any, *parts: str) -> None:
        storage.write_bytes_atomic(self._uri(*parts), json.dumps(data, indent=2, sort_keys=True).encode())

    # ------------------------------------------------------------------ versions
    def _next_id(self) -> str:
        numbers = [int(m.group(1)) for n in storage.listdir(self._uri("versions")) if (m := _ID_RE.match(n))]
        return f"v{max(numbers, default=0) + 1:06d}-{self.now().astimezone(UTC):%Y%m%dT%H%M%SZ}"

    def register(self, model_dir: str, metrics: dict[str, Any], lineage: dict[str, Any]) -> str:
        """Copy ``model_dir`` (local or s3://) in and record metrics and lineage; returns the new id.
        The version is not promoted: that is a separate, explicit decision."""
        version_id = self._next_id()
        storage.copy_dir(model_dir, self._uri("versions", version_id, "model"))
        self._write_json(metrics, "versions", version_id, "metrics.json")
        full = {"created": self.now().astimezone(UTC).isoformat(), "code_revision": code_revision(),
                "source_model_dir": model_dir, **artifact(model_dir), **lineage}
        self._write_json(full, "versions", version_id, "lineage.json")  # last: marks the version complete
        return version_id

    def get(self, version_id: str) -> Version:
        lineage = self._read_json("versions", version_id, "lineage.json")
        if lineage is None:
            raise KeyError(f"registry {self.root}: no complete version {version_id!r}")
        return Version(id=version_id, uri=self._uri("versions", version_id),
                       metrics=self._read_json("versions", version_id, "metrics.json") or {},
                       lineage=lineage, verdict=self._read_json("versions", version_id, "verdict.json"))

    def list(self) -> list[Version]:
        """Complete versions, oldest first (half-registered ones are skipped)."""
        out = []
        for name in storage.listdir(self._uri("versions")):
            if _ID_RE.match(name):
                try:
                    out.append(self.get(name))
                except KeyError:
                    continue
        return out

    # ------------------------------------------------------------------ production pointer
    def production(self) -> Version | None:
        pointer = self._read_json("production.json")
        return self.get(pointer["version"]) if pointer else None

    def promote(self, version_id: str, reason: str) -> dict[str, Any]:
        """Point production at ``version_id`` (one atomic write) and log the decision."""
        self.get(version_id)  # refuses incomplete / unknown versions
        current = self._read_json("production.json")
        pointer = {"version": version_id, "updated": self.now().astimezone(UTC).isoformat(),
                   "previous": current["version"] if current else None}
        self._write_json(pointer, "production.json")
        self._set_verdict(version_id, "promoted", reason)
        self.log_decision({"action": "promote", "version": version_id, "previous": pointer["previous"],
                           "reason": reason})
        return pointer

    def reject(self, version_id: str, reason: str) -> None:
        """Mark a candidate as not promoted, so a later tick does not re-evaluate it."""
        self._set_verdict(version_id, "rejected", reason)

    def _set_verdict(self, version_id: str, verdict: str, reason: str) -> None:
        self._write_json({"verdict": verdict, "reason": reason, "time": self.now().astimezone(UTC).isoformat()},
                         "versions", version_id, "verdict.json")

    def serving(self) -> str | None:
        pointer = self._read_json("serving.json")
        return pointer["version"] if pointer else None

    def mark_serving(self, version_id: str) -> None:
        self._write_json({"version": version_id, "updated": self.now().astimezone(UTC).isoformat()}, "serving.json")

    # ------------------------------------------------------------------ decision log
    def log_decision(self, record: dict[str, Any]) -> str:
        """Append one record as decisions/<UTC time>-<random>.json; returns its URI."""
        # wall-clock ns keeps records ordered when an injected clock stands still
        name = f"{self.now().astimezone(UTC):%Y%m%dT%H%M%S.%fZ}-{time.time_ns()}-{uuid.uuid4().hex[:4]}.json"
        self._write_json({"logged": self.now().astimezone(UTC).isoformat(), **record}, "decisions", name)
        return self._uri("decisions", name)

    def decisions(self) -> list[dict[str, Any]]:
        """Every decision record, oldest first."""
        return [self._read_json("decisions", n) for n in storage.listdir(self._uri("decisions")) if n.endswith(".json")]


class LockHeld(RuntimeError):
    """Another live owner holds the registry lock."""


class RegistryLock:
    """A lease in ``<root>/retrain.lock``: owner + heartbeat + expiry. A lock whose ``expires`` has
    passed belongs to a dead holder and is taken over.

    Every change is a compare-and-swap, so two contenders never both hold it. On S3 (conditional writes):
    taking a free lock is a PUT with ``If-None-Match: *``; a takeover, a heartbeat and a release are
    conditional on the ETag of the record that was read (``If-Match``), so a record changed in between
    makes the write fail (HTTP 412) instead of overwriting. Locally: creating is ``O_EXCL``; a takeover,
    heartbeat or release holds an ``flock`` on ``retrain.lock.guard`` around read -> write."""

    def __init__(self, registry: Registry, owner: str, ttl_s: float):
        self.registry, self.owner, self.ttl_s = registry, owner, ttl_s
        self.uri = registry._uri("retrain.lock")
        self.s3 = storage.is_s3(self.uri)

    def read(self) -> dict[str, Any] | None:
        return self.registry._read_json("retrain.lock")

    def _record(self, acquired: str | None = None) -> dict[str, Any]:
        now = self.registry.now().astimezone(UTC)
        return {"owner": self.owner, "acquired": acquired or now.isoformat(), "heartbeat": now.isoformat(),
                "expires": datetime.fromtimestamp(now.timestamp() + self.ttl_s, UTC).isoformat()}

    # ------------------------------------------------------------------ the compare-and-swap primitives
    @contextlib.contextmanager
    def _guard(self):
        """Local only: serialises read -> write between processes on this machine (S3 needs none)."""
        if self.s3:
            yield
            return
        import fcntl

        os.makedirs(os.path.dirname(self.uri), exist_ok=True)
        with open(self.uri + ".guard", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_versioned(self) -> tuple[dict[str, Any] | None, str | None]:
        """(record, its ETag on S3). The ETag is read first: a record replaced between the two reads has
        a newer ETag than the one returned, so a write conditional on it fails, as it should."""
        etag = None
        if self.s3:
            fs, path = storage.filesystem(self.uri)
            try:
                etag = fs.info(path, refresh=True)["ETag"]
            except FileNotFoundError:
                return None, None
        return self.read(), etag

    def _create(self, record: dict[str, Any]) -> bool:
        data = json.dumps(record).encode()
        if self.s3:
            fs, path = storage.filesystem(self.uri)
            try:
                fs.pipe_file(path, data, mode="create")  # If-None-Match: *
            except FileExistsError:  # s3fs's translation of 412 PreconditionFailed on If-None-Match
                return False
            return True
        os.makedirs(os.path.dirname(self.uri), exist_ok=True)
        try:
            fd = os.open(self.uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def _replace(self, record: dict[str, Any], etag: str | None) -> bool:
        """Overwrite the record read with ``etag`` (S3: If-Match; locally the caller holds the guard)."""
        if not self.s3:
            self.registry._write_json(record, "retrain.lock")
            return True
        fs, path = storage.filesystem(self.uri)
        try:
            fs.pipe_file(path, json.dumps(record).encode(), IfMatch=etag)
        except (FileNotFoundError, OSError) as e:
            if _precondition_failed(e):
                return False
            raise
        return True

    # ------------------------------------------------------------------ the lease
    def acquire(self) -> dict[str, Any] | None:
        """Take the lock; returns the stale record it replaced (None if the lock was free).
        Raises LockHeld if a live owner has it or another contender won the race for it."""
        if self._create(self._record()):
            return None
        with self._guard():
            current, etag = self._read_versioned()
            if current is None:  # released since our create failed: one more try, and no more
                if self._create(self._record()):
                    return None
                raise LockHeld(f"lost the race for {self.uri}")
            if current["owner"] != self.owner and \
                    datetime.fromisoformat(current["expires"]) > self.registry.now().astimezone(UTC):
                raise LockHeld(f"retrain lock held by {current['owner']} (heartbeat {current['heartbeat']}, "
                               f"expires {current['expires']})")
            if not self._replace(self._record(), etag):
                raise LockHeld(f"lost the race for {self.uri}: another owner took it over first")
        return current

    def heartbeat(self) -> None:
        with self._guard():
            current, etag = self._read_versioned()
            if not current or current["owner"] != self.owner or \
                    not self._replace(self._record(current["acquired"]), etag):
                now = self.read()
                raise LockHeld(f"retrain lock {self.uri} was taken over by {now and now['owner']}")

    def release(self) -> None:
        with self._guard():
            current, etag = self._read_versioned()
            if not current or current["owner"] != self.owner:
                return
            fs, path = storage.filesystem(self.uri)
            if not self.s3:
                fs.rm_file(path)
                return
            bucket, key = path.split("/", 1)
            try:  # conditional: a takeover since our read keeps its lock
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            except OSError as e:
                if not _precondition_failed(e):
                    raise


def _precondition_failed(e: BaseException) -> bool:
    """An S3 conditional request refused (412), as s3fs translates it; also a key that vanished."""
    return isinstance(e, FileNotFoundError) or getattr(e, "errno", None) == errno.EINVAL or \
        "PreconditionFailed" in str(e) or "412" in str(e)
