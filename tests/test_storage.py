"""Storage helpers behave the same on local paths and s3:// (moto server on 127.0.0.1)."""

from __future__ import annotations

import os

import pytest

from pipelines import storage
from pipelines.storage import StorageConfig
from slime.storage import local_copy


def _roundtrip(root: str, tmp_path) -> None:
    f = storage.join(root, "a", "b.bin")
    assert not storage.exists(f)
    storage.write_bytes_atomic(f, b"one")
    storage.write_bytes_atomic(f, b"two")  # overwrite in place
    storage.write_bytes_atomic(storage.join(root, "a", "c.txt"), b"c")
    assert storage.read_bytes(f) == b"two" and storage.exists(f)
    assert storage.listdir(storage.join(root, "a")) == ["b.bin", "c.txt"]
    assert storage.listdir(storage.join(root, "nope")) == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing.bin"))

    local = tmp_path / "src"
    (local / "sub").mkdir(parents=True)
    (local / "x.txt").write_bytes(b"x")
    (local / "sub" / "y.bin").write_bytes(os.urandom(3000))
    assert storage.copy_dir(str(local), storage.join(root, "copy")) == ["sub/y.bin", "x.txt"]
    back = tmp_path / "back"
    storage.copy_dir(storage.join(root, "copy"), str(back))
    assert (back / "sub" / "y.bin").read_bytes() == (local / "sub" / "y.bin").read_bytes()
    cached = local_copy(storage.join(root, "copy"), str(tmp_path / "cache"))
    assert open(os.path.join(cached, "sub", "y.bin"), "rb").read() == (local / "sub" / "y.bin").read_bytes()


def test_local(tmp_path):
    _roundtrip(str(tmp_path / "store"), tmp_path)
    d = tmp_path / "store" / "a"
    assert sorted(os.listdir(d)) == ["b.bin", "c.txt"]  # no temp files left behind
    assert local_copy(str(d), str(tmp_path / "unused")) == str(d)  # local: no copy
    assert not (tmp_path / "unused").exists()


def test_s3(s3_bucket, moto_s3, tmp_path):
    assert StorageConfig().endpoint_url == moto_s3  # picked up from AWS_ENDPOINT_URL
    fs, path = storage.filesystem(f"s3://{s3_bucket}/p/")
    assert path == f"{s3_bucket}/p" and type(fs).__name__ == "S3FileSystem"
    _roundtrip(f"s3://{s3_bucket}/root", tmp_path)
    # Unchanged content: the finished copy is reused as it is (with the pipelines' configured filesystem too).
    uri = f"s3://{s3_bucket}/root/copy"
    target = local_copy(uri, str(tmp_path / "cache"))
    os.utime(os.path.join(target, "x.txt"), (0, 0))
    assert local_copy(uri, str(tmp_path / "cache"), fs=storage.filesystem(uri)[0]) == target
    assert os.stat(os.path.join(target, "x.txt")).st_mtime == 0


def test_explicit_config_and_secret_repr():
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:1", region="eu-west-1", access_key="AK", secret_key="SK")
    assert "SK" not in repr(cfg) and "AK" not in repr(cfg)
    fs, path = storage.filesystem("s3://bucket/key", cfg)
    assert path == "bucket/key"
    assert fs.client_kwargs == {"endpoint_url": "http://127.0.0.1:1", "region_name": "eu-west-1"}
    assert storage.filesystem("rel/dir")[1] == os.path.abspath("rel/dir")
