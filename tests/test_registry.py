"""Model registry on local disk and on S3 (moto): versions, lineage, atomic production pointer, lock."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import pytest

from pipelines import storage
from pipelines.lifecycle.registry import LockHeld, Registry, RegistryLock


class Clock:
    def __init__(self, start: datetime = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)):
        self.t = start

    def __call__(self) -> datetime:
        return self.t

    def advance(self, **kw) -> None:
        self.t += timedelta(**kw)


def make_model(path, tag: str) -> str:
    os.makedirs(os.path.join(path, "tokenizer"), exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"tag": tag}, f)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(os.urandom(1024))
    with open(os.path.join(path, "tokenizer", "tokenizer.json"), "w") as f:
        f.write("{}")
    return str(path)


def exercise(root: str, tmp_path) -> None:
    clock = Clock()
    reg = Registry(root, now=clock)
    assert reg.production() is None and reg.list() == []
    lineage = {"dataset_version": 1, "shards": ["shard-000001-000000.tar"], "parent_version": None}
    v1 = reg.register(make_model(tmp_path / "m1", "one"), {"accuracy": 0.5}, lineage)
    clock.advance(minutes=1)
    v2 = reg.register(make_model(tmp_path / "m2", "two"), {"accuracy": 0.6}, {**lineage, "parent_version": v1})
    assert v1.startswith("v000001-") and v2.startswith("v000002-") and sorted([v2, v1]) == [v1, v2]
    assert [v.id for v in reg.list()] == [v1, v2]

    got = reg.get(v2)
    assert got.metrics == {"accuracy": 0.6} and got.lineage["parent_version"] == v1
    assert got.lineage["shards"] == ["shard-000001-000000.tar"] and got.lineage["code_revision"]
    assert got.lineage["created"].startswith("2026-11-22T03:01")
    copied = json.loads(storage.read_bytes(storage.join(got.model_uri, "config.json")))
    assert copied == {"tag": "two"}
    assert storage.exists(storage.join(got.model_uri, "tokenizer", "tokenizer.json"))

    reg.promote(v1, "first")
    assert reg.production().id == v1
    pointer = reg.promote(v2, "better")
    assert pointer["version"] == v2 and pointer["previous"] == v1
    assert json.loads(storage.read_bytes(storage.join(root, "production.json")))["previous"] == v1
    assert reg.get(v2).verdict["verdict"] == "promoted"
    assert [d["version"] for d in reg.decisions()] == [v1, v2]
    with pytest.raises(KeyError):
        reg.promote("v000099-20261122T000000Z", "no such version")
    assert reg.production().id == v2


def test_registry_local(tmp_path):
    exercise(str(tmp_path / "registry"), tmp_path)


@pytest.mark.integration
def test_registry_s3(s3_bucket, tmp_path):
    exercise(f"s3://{s3_bucket}/registry", tmp_path)


def test_half_registered_version_is_invisible_and_its_number_not_reused(tmp_path):
    root = str(tmp_path / "registry")
    reg = Registry(root)
    os.makedirs(os.path.join(root, "versions", "v000001-20261122T030000Z", "model"))  # died while copying
    assert reg.list() == []
    with pytest.raises(KeyError):
        reg.promote("v000001-20261122T030000Z", "incomplete")
    v = reg.register(make_model(tmp_path / "m", "x"), {"accuracy": 1.0}, {"shards": []})
    assert v.startswith("v000002-") and [x.id for x in reg.list()] == [v]


def test_production_pointer_replace_is_atomic(tmp_path, monkeypatch):
    """A writer dying mid-write must leave the old pointer readable (temp file + os.replace)."""
    reg = Registry(str(tmp_path / "registry"))
    v1 = reg.register(make_model(tmp_path / "m1", "1"), {"accuracy": 0.1}, {"shards": []})
    v2 = reg.register(make_model(tmp_path / "m2", "2"), {"accuracy": 0.2}, {"shards": []})
    reg.promote(v1, "first")

    def dying_replace(src, dst):
        raise OSError("killed between write and rename")

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(OSError):
        reg.promote(v2, "never lands")
    monkeypatch.undo()
    assert reg.production().id == v1
    assert [n for n in os.listdir(tmp_path / "registry") if n.endswith(".tmp")] == []


def test_lock_excludes_live_owner_and_takes_over_stale(tmp_path):
    clock = Clock()
    reg = Registry(str(tmp_path / "registry"), now=clock)
    a, b = RegistryLock(reg, "tick-a", ttl_s=60), RegistryLock(reg, "tick-b", ttl_s=60)
    assert a.acquire() is None
    with pytest.raises(LockHeld, match="tick-a"):
        b.acquire()
    clock.advance(seconds=50)
    a.heartbeat()  # keeps it alive past the first expiry
    clock.advance(seconds=50)
    with pytest.raises(LockHeld):
        b.acquire()
    clock.advance(seconds=11)  # tick-a died: no heartbeat for > ttl
    stale = b.acquire()
    assert stale["owner"] == "tick-a" and b.read()["owner"] == "tick-b"
    with pytest.raises(LockHeld, match="taken over"):
        a.heartbeat()
    a.release()  # not the owner: must not delete b's lock
    assert b.read()["owner"] == "tick-b"
    b.release()
    assert b.read() is None


@pytest.mark.integration
@pytest.mark.parametrize("start", ["free", "stale"])
def test_s3_lock_two_contenders_cannot_both_take_it(s3_bucket, monkeypatch, start):
    """B decides the lock is free (or stale) and, before B writes, A takes it: B's write must fail
    (S3 conditional writes) instead of overwriting A's lock, so exactly one of them holds it."""
    clock = Clock()
    reg = Registry(f"s3://{s3_bucket}/registry", now=clock)
    if start == "stale":
        assert RegistryLock(reg, "dead-tick", ttl_s=60).acquire() is None
        clock.advance(seconds=120)
    a, b = RegistryLock(reg, "tick-a", ttl_s=60), RegistryLock(reg, "tick-b", ttl_s=60)
    outcome: dict[str, object] = {}
    real_read = storage.read_bytes

    def try_acquire(lock: RegistryLock, name: str) -> None:
        try:
            lock.acquire()
            outcome[name] = "holds"
        except LockHeld as e:
            outcome[name] = f"refused: {e}"

    def read_then_a_wins(uri, *args, **kwargs):
        # B's first look at the lock; A acquires right after it (before B writes anything)
        try:
            return real_read(uri, *args, **kwargs)
        finally:
            if uri.endswith("retrain.lock") and "a" not in outcome:
                outcome["a"] = "running"
                try_acquire(a, "a")

    monkeypatch.setattr(storage, "read_bytes", read_then_a_wins)
    try_acquire(b, "b")
    monkeypatch.setattr(storage, "read_bytes", real_read)
    if "a" not in outcome:  # B never had to read (its conditional create won): A comes second
        try_acquire(a, "a")
    holders = [n for n in ("a", "b") if outcome[n] == "holds"]
    assert len(holders) == 1, outcome
    winner, loser = (a, b) if holders == ["a"] else (b, a)
    assert reg._read_json("retrain.lock")["owner"] == winner.owner
    with pytest.raises(LockHeld):
        loser.heartbeat()
    loser.release()  # not the owner: the winner keeps its lock
    assert reg._read_json("retrain.lock")["owner"] == winner.owner
    winner.heartbeat()
    winner.release()
    assert reg._read_json("retrain.lock") is None
