"""Ray Data pipeline on the shared Ray session: packed shards (local + moto S3) -> contract rows.

Every pipeline run starts fresh actors (process + torch/transformers import, several seconds on two
cores), so the module runs each configuration once and shares the rows between tests.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipelines import storage
from pipelines.data.ingest import (CONTRACT_COLUMNS, DataConfig, build_dataset, data_metrics, list_shards,
                                   torch_batch_kwargs)
from pipelines.data.pack import PackConfig, pack
from pipelines.data.preprocess import load_vision, sample_hash
from pipelines.storage import StorageConfig
from slime.checkpoint import load_config
from slime.presets import save_tiny_checkpoint
from slime.tiling import count_visual_tokens

NUM_IMAGES = 27  # + 1 text-only record = 28 samples in shards of 10
GAMMA = 0.5


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _rec(rid: str, image: str | None, answer: str = "red") -> dict:
    q = "<image>\nWhat colour is the background?" if image else "Name a colour."
    return {"id": rid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]} \
        | ({"image": image} if image else {})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny model dir + a packed dataset (manifest, 3 shards) + expected (w, h) per sample_hash."""
    root = tmp_path_factory.mktemp("data")
    model = str(save_tiny_checkpoint(root / "model"))
    rng = random.Random(0)
    (root / "raw" / "img").mkdir(parents=True)
    records, sizes = [], []
    for i in range(NUM_IMAGES):
        w, h = rng.randint(200, 600), rng.randint(200, 600)
        (root / "raw" / "img" / f"{i}.jpg").write_bytes(_jpeg(w, h, i))
        records.append(_rec(f"r{i}", f"img/{i}.jpg"))
        sizes.append((w, h))
    records.append(_rec("text", None))
    sizes.append((0, 0))
    (root / "raw" / "train.json").write_text(json.dumps(records))
    summary = pack(PackConfig(inputs=(str(root / "raw" / "train.json"),), output_dir=str(root / "ds"),
                              max_samples_per_shard=10, progress=False))
    assert summary["samples"] == len(records) and len(summary["written_shards"]) == 3
    version = summary["dataset_version"]
    expected = {sample_hash(f"{version:06d}-{n + 1:09d}"): wh for n, wh in enumerate(sizes)}  # pack's keys
    return dict(root=root, model=model, ds=str(root / "ds"), expected=expected, cfg=load_config(model))


def _cfg(data, name: str, **kw) -> DataConfig:
    base = dict(shards=data["ds"], model=data["model"], mode="both", gamma=GAMMA, num_actors=1, batch_size=8,
                shuffle="files", seed=3, preserve_order=True, metrics_name=f"test-{name}")
    return DataConfig(**(base | kw))


def _by_hash(rows: list[dict]) -> dict[int, dict]:
    return {int(r["sample_hash"]): r for r in rows}


@pytest.fixture(scope="module")
def local_rows(ray_session, data):
    cfg = _cfg(data, "local")
    rows = build_dataset(cfg).take_all()
    return cfg, rows, data_metrics(cfg)


def test_list_shards_filters(data, tmp_path):
    cfg = _cfg(data, "list")
    shards = list_shards(cfg)
    assert [os.path.basename(s) for s in shards] == [f"shard-000001-{i:06d}.tar" for i in range(3)]
    assert list_shards(_cfg(data, "list", shards=os.path.join(data["ds"], "manifest.json"))) == shards
    assert list_shards(_cfg(data, "list", exclude=("shard-000001-000001.tar",))) == [shards[0], shards[2]]
    with pytest.raises(FileNotFoundError, match="no shards selected"):
        list_shards(_cfg(data, "list", only_versions=(2,)))
    with pytest.raises(ValueError, match="batch_size"):
        _cfg(data, "list", batch_size=0)


def test_read_concurrency_never_exceeds_the_shards():
    from pipelines.data.ingest import read_concurrency

    assert [read_concurrency(2, n) for n in (1, 2, 10)] == [1, 2, 2]
    assert read_concurrency(None, 1) is None and read_concurrency(3, 0) == 1


@pytest.mark.integration
def test_local_rows_follow_the_contract(data, local_rows):
    cfg, rows, counts = local_rows
    mcfg = data["cfg"]
    t, m, s = mcfg.max_length, mcfg.tiling.max_tiles, mcfg.vision.image_size
    assert len(rows) == len(data["expected"]) and counts == {"ok": len(rows)}
    assert set(rows[0]) == set(CONTRACT_COLUMNS) | {"sample_hash"}
    shapes = {"input_ids": ((t,), np.int64), "attention_mask": ((t,), np.int64), "labels": ((t,), np.int64),
              "instruction_mask": ((t,), np.bool_), "pixel_values": ((m, 3, s, s), np.float32),
              "tile_mask": ((m,), np.bool_), "grid": ((2,), np.int64), "image_size": ((2,), np.int64),
              "has_image": ((), np.bool_), "num_visual_tokens": ((), np.int64), "sample_hash": ((), np.int64)}
    from transformers import AutoTokenizer

    image_id = AutoTokenizer.from_pretrained(os.path.join(data["model"], "tokenizer")).convert_tokens_to_ids("<image>")
    for h, row in _by_hash(rows).items():
        for col, (shape, dtype) in shapes.items():
            arr = np.asarray(row[col])
            assert arr.shape == shape and arr.dtype == dtype, (col, arr.shape, arr.dtype)
        w, hgt = data["expected"][h]
        assert tuple(row["image_size"]) == (w, hgt)
        n_image = int((row["input_ids"] == image_id).sum())
        if w:
            budget = count_visual_tokens(w, hgt, mcfg, GAMMA, "both")
            assert row["num_visual_tokens"] == budget.total_tokens == n_image
            assert tuple(row["grid"]) == budget.grid and row["tile_mask"].sum() == 1 + budget.crops
            assert not row["pixel_values"][row["tile_mask"].sum():].any()  # zeros past the real tiles
        else:
            assert row["num_visual_tokens"] == n_image == 0 and not row["has_image"] and not row["tile_mask"].any()


@pytest.mark.integration
def test_s3_gives_the_same_samples(ray_session, data, local_rows, moto_s3, s3_bucket):
    st = StorageConfig(endpoint_url=moto_s3, region="us-east-1", access_key="testing", secret_key="testing")
    storage.copy_dir(data["ds"], f"s3://{s3_bucket}/ds", st)
    storage.copy_dir(data["model"], f"s3://{s3_bucket}/model", st)
    cfg = _cfg(data, "s3", shards=f"s3://{s3_bucket}/ds/manifest.json", model=f"s3://{s3_bucket}/model",
               storage=st, preserve_order=False, shuffle="none")
    rows = build_dataset(cfg).take_all()
    digest = lambda rs: sorted((int(r["sample_hash"]), hash(r["input_ids"].tobytes())) for r in rs)  # noqa: E731
    assert digest(rows) == digest(local_rows[1])
    assert data_metrics(cfg) == {"ok": len(rows)}


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.mark.integration
def test_bad_samples_and_truncated_shard_are_skipped_and_counted(ray_session, data, tmp_path):
    ok = lambda i: [(f"k{i:03d}.jpg", _jpeg(300, 200, i)),  # noqa: E731
                    (f"k{i:03d}.json", json.dumps(_rec(f"g{i}", "x.jpg")).encode())]
    long_answer = " ".join(["word"] * 400)  # > max_length 256 tokens even before <image> expansion
    mixed = [*ok(0), *ok(1),
             ("k100.jpg", b"\xff\xd8 this is not a jpeg"), ("k100.json", json.dumps(_rec("c", "x.jpg")).encode()),
             ("k101.jpg", _jpeg(300, 200, 5)), ("k101.json", b"{not json"),
             ("README.txt", b"stray member"),
             ("k102.jpg", _jpeg(300, 200, 6)), ("k102.json", json.dumps(_rec("long", "x.jpg", long_answer)).encode()),
             ("k103.json", json.dumps(_rec("noimg", "x.jpg")).encode()),  # <image> but no image member
             ("k104.jpg", _jpeg(300, 200, 7)),  # image without json
             *ok(2), *ok(3)]
    _write_tar(tmp_path / "shard-000001-000000.tar", mixed)
    _write_tar(tmp_path / "shard-000001-000001.tar", [m for i in range(10, 18) for m in ok(i)])
    with tarfile.open(tmp_path / "shard-000001-000001.tar") as tar:
        cut = next(i for i in tar.getmembers() if i.name == "k015.jpg")
    blob = (tmp_path / "shard-000001-000001.tar").read_bytes()
    (tmp_path / "shard-000001-000001.tar").write_bytes(blob[:cut.offset_data + cut.size // 2])  # mid-image of k015

    cfg = _cfg(data, "bad", shards=str(tmp_path), preserve_order=False, shuffle="none")
    rows = build_dataset(cfg).take_all()
    assert sorted(int(r["sample_hash"]) for r in rows) == sorted(
        sample_hash(f"k{i:03d}") for i in (0, 1, 2, 3, 10, 11, 12, 13, 14))
    assert data_metrics(cfg) == {"ok": 9, "invalid_image": 1, "bad_json": 1, "bad_member": 1, "missing_json": 1,
                                 "context_length_exceeded": 1, "image_count_mismatch": 1, "bad_shard": 1}


@pytest.mark.integration
def test_gpu_actors_without_cuda_compute_on_cpu(ray_session, data, local_rows):
    cfg = _cfg(data, "gpu", actor_num_gpus=0.5)  # the session has 1 logical GPU and no CUDA
    rows = build_dataset(cfg).take_all()
    ref = _by_hash(local_rows[1])
    assert len(rows) == len(ref)
    for h, row in _by_hash(rows).items():
        for col in CONTRACT_COLUMNS:
            np.testing.assert_array_equal(row[col], ref[h][col], err_msg=col)


@pytest.mark.integration
def test_features_mode(ray_session, data, local_rows):
    import torch

    cfg = _cfg(data, "features", output="features")
    rows = _by_hash(build_dataset(cfg).take_all())
    mcfg = data["cfg"]
    tower, connector = load_vision(data["model"], mcfg, "cpu")
    p, din = connector.num_tokens, connector.out_dim
    assert (p, din) == (mcfg.vision.num_patches, mcfg.vision.hidden_dim)  # tiny: mlp connector
    some = next(h for h, r in rows.items() if r["has_image"])
    for h, row in rows.items():
        assert "pixel_values" not in row
        feats = row["vision_features"]
        assert feats.shape == (mcfg.tiling.max_tiles, p, din) and feats.dtype == np.float16
        assert not feats[~row["tile_mask"]].any()
    ref = _by_hash(local_rows[1])[some]  # same sample, pixels mode
    with torch.inference_mode():
        want = connector(tower(torch.from_numpy(ref["pixel_values"][ref["tile_mask"]]))).numpy()
    np.testing.assert_allclose(rows[some]["vision_features"][ref["tile_mask"]], want,
                               rtol=1e-2, atol=1e-2)  # float16 storage


@pytest.mark.integration
def test_iter_torch_batches_and_seeded_order(ray_session, data, local_rows):
    import torch

    cfg, rows, _ = local_rows
    ds = build_dataset(cfg)
    want = {"input_ids": torch.int64, "labels": torch.int64, "attention_mask": torch.int64,
            "instruction_mask": torch.bool, "pixel_values": torch.float32, "tile_mask": torch.bool,
            "grid": torch.int64, "image_size": torch.int64, "has_image": torch.bool,
            "num_visual_tokens": torch.int64, "sample_hash": torch.int64}
    order = []
    for batch in ds.iterator().iter_torch_batches(**torch_batch_kwargs(cfg, 8)):
        assert {k: v.dtype for k, v in batch.items()} == want
        assert batch["pixel_values"].shape[1:] == rows[0]["pixel_values"].shape
        order += batch["sample_hash"].tolist()
    # Same seed + preserve_order -> the same row order as the first run of this config.
    assert order == [int(r["sample_hash"]) for r in rows]
