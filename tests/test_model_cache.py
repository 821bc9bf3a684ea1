"""The one model cache (``slime.storage.local_copy``) on a real S3 API (moto server on 127.0.0.1): a re-export
to the same URI is loaded and served with its new weights; concurrent fetchers each get a complete copy."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipelines import storage
from pipelines.serve.engine import model_dir
from pipelines.train.state import export_model
from slime.checkpoint import load_pretrained
from slime.presets import save_tiny_checkpoint
from slime.storage import local_copy


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_re_export_to_the_same_uri_is_loaded_and_served_with_the_new_weights(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLIME_VLLM_CACHE", str(tmp_path / "views"))
    uri = f"s3://{s3_bucket}/models/prod"
    old, new = save_tiny_checkpoint(tmp_path / "old", seed=0), save_tiny_checkpoint(tmp_path / "new", seed=1)
    old_w, new_w = load_file(str(old / "model.safetensors")), load_file(str(new / "model.safetensors"))
    assert not _same(old_w, new_w)

    export_model(str(old), uri)
    first_copy = Path(local_copy(uri))
    assert _same(load_pretrained(uri)[0].state_dict(), old_w)
    first_view = model_dir(uri)
    assert _same(load_file(str(first_view / "model.safetensors")), old_w)

    export_model(str(new), uri)  # retrained: same file names, same sizes, other bytes
    fs, path = storage.filesystem(uri)
    sizes = {p.rsplit("/", 1)[1]: i["size"] for p, i in fs.find(path, detail=True).items() if "tokenizer" not in p}
    assert sizes["model.safetensors"] == (old / "model.safetensors").stat().st_size

    assert _same(load_pretrained(uri)[0].state_dict(), new_w)
    second_view = model_dir(uri)
    assert second_view != first_view
    assert _same(load_file(str(second_view / "model.safetensors")), new_w)
    # A replica still reading the first copy (or serving the first view) keeps a complete, unchanged one.
    assert _same(load_file(str(first_copy / "model.safetensors")), old_w)
    assert _same(load_file(str(first_view / "model.safetensors")), old_w)


def test_concurrent_fetches_of_one_uri_each_get_a_complete_copy(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/models/shared"
    files = {f"w{i}.bin": os.urandom(100_000 + i) for i in range(6)} | {"tokenizer/vocab.txt": b"a\nb\n"}
    for rel, data in files.items():
        storage.write_bytes_atomic(f"{uri}/{rel}", data)
    cache = tmp_path / "cache"
    start = threading.Barrier(4)

    def fetch() -> tuple[str, dict[str, bytes]]:
        start.wait()  # all four ask before any copy exists
        d = local_copy(uri, str(cache))
        return d, {rel: Path(d, rel).read_bytes() for rel in files}

    with ThreadPoolExecutor(4) as pool:
        results = [f.result() for f in [pool.submit(fetch) for _ in range(4)]]
    assert all(got == files for _, got in results)
    assert len({d for d, _ in results}) == 1
    # One finished copy and its lock file; no temp directory left behind.
    (home,) = cache.iterdir()
    key = Path(results[0][0]).name
    assert sorted(p.name for p in home.iterdir()) == sorted([key, f".{key}.lock"])
