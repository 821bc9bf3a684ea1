"""Packing LLaVA JSON/JSONL into versioned webdataset shards: rejects, read-back, append, S3."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from jobs import pack as pack_job
from pipelines import storage
from pipelines.data.pack import PackConfig, pack, read_manifest, shard_uris
from slime.storage import local_copy

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs")


def _img(fmt: str, size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def _rec(rid, image=None, q="What colour?", a="red", qtype="global"):
    human = f"<image>\n{q}" if image else q
    rec = {"id": rid, "qtype": qtype, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": a}]}
    return rec | ({"image": image} if image else {})


@pytest.fixture()
def raw(tmp_path):
    """A raw LLaVA drop: one JSON list + one JSONL with one planted record per reject reason."""
    d = tmp_path / "raw"
    (d / "img").mkdir(parents=True)
    files = {"a.jpg": _img("JPEG"), "b.png": _img("PNG"), "c.jpeg": _img("JPEG", color=(0, 0, 255)),
             "d.webp": _img("WEBP"), "big.png": _img("PNG", size=(300, 300)), "garbage.jpg": b"not an image",
             "gif.gif": _img("GIF")}
    files["trunc.jpg"] = _img("JPEG", size=(256, 256))[:300]
    for name, data in files.items():
        (d / "img" / name).write_bytes(data)
    good_json = [_rec("a", "img/a.jpg"), _rec("b", "img/b.png"), _rec("c", "img/c.jpeg"), _rec("d", "img/d.webp"),
                 _rec("text-only", q="Say hi.", a="hi")]
    bad_json = [
        _rec("missing", "img/nope.jpg"),
        _rec("garbage", "img/garbage.jpg"),
        _rec("trunc", "img/trunc.jpg"),
        _rec("gif", "img/gif.gif"),
        _rec("big", "img/big.png"),
        {"id": "no-token", "image": "img/a.jpg", "conversations": [{"from": "human", "value": "colour?"},
                                                                   {"from": "gpt", "value": "red"}]},
        _rec("stray-token", q="<image>\nhi", a="hi"),
        {"id": "empty", "conversations": []},
        {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"id": "non-str", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "no id"}, {"from": "gpt", "value": "x"}]},
        _rec("a", "img/b.png"),  # same id as an earlier record
    ]
    (d / "data.json").write_text(json.dumps(good_json + bad_json))
    lines = [json.dumps(_rec("e", "img/a.jpg")), "{not json", "", json.dumps(_rec("f", q="Two?", a="2"))]
    (d / "more.jsonl").write_text("\n".join(lines) + "\n")
    return d


EXPECTED_REJECTS = {"missing_image": 1, "undecodable_image": 3, "image_too_large": 1, "image_token_mismatch": 2,
                    "empty_conversation": 1, "malformed_conversation": 3, "duplicate_id": 1, "bad_json": 1}


def _cfg(raw, out, *names, **kw) -> PackConfig:
    return PackConfig(inputs=tuple(str(raw / n) for n in names), output_dir=str(out), max_pixels=200 * 200,
                      max_samples_per_shard=3, progress=False, **kw)


def _read_back(urls: list[str]) -> dict[str, dict]:
    return {json.loads(s["json"])["id"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def test_rejects_manifest_and_readback(raw, tmp_path):
    out = tmp_path / "wds"
    summary = pack(_cfg(raw, out, "data.json", "more.jsonl"))
    assert {k: v for k, v in summary["rejects"].items() if v} == EXPECTED_REJECTS
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert collections.Counter(r["reason"] for r in rejects) == EXPECTED_REJECTS
    by_id = {r["id"]: r["reason"] for r in rejects if r["id"] is not None}
    assert by_id["trunc"] == by_id["garbage"] == by_id["gif"] == "undecodable_image"
    assert by_id["a"] == "duplicate_id" and by_id["big"] == "image_too_large" and by_id["no-token"] == by_id[
        "stray-token"] == "image_token_mismatch"
    assert [(r["index"], r["reason"]) for r in rejects if r["id"] is None and "index" in r] == [
        (15, "malformed_conversation")]  # no id: the record is named by its position
    assert [r["line"] for r in rejects if r["reason"] == "bad_json"] == [2]
    assert all(r["source"].endswith(("data.json", "more.jsonl")) for r in rejects)

    manifest = read_manifest(str(out))
    assert manifest["dataset_version"] == 1 and manifest["rejects"] == sum(EXPECTED_REJECTS.values())
    assert manifest["num_samples"] == summary["samples"] == 7 == sum(s["samples"] for s in manifest["shards"])
    assert [s["name"] for s in manifest["shards"]] == [f"shard-000001-00000{i}.tar" for i in range(3)]
    for s in manifest["shards"]:
        data = (out / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    assert {s["path"] for s in manifest["sources"]} == {str(raw / "data.json"), str(raw / "more.jsonl")}

    samples = _read_back(shard_uris(str(out), manifest))
    assert set(samples) == {"a", "b", "c", "d", "e", "f", "text-only"}
    for rid, ext, name in [("a", "jpg", "a.jpg"), ("b", "png", "b.png"), ("c", "jpeg", "c.jpeg"),
                           ("d", "webp", "d.webp"), ("e", "jpg", "a.jpg")]:
        meta = json.loads(samples[rid]["json"])
        original = (raw / "img" / name).read_bytes()
        assert samples[rid][ext] == original and meta["image_ext"] == ext and meta["image_size"] == [64, 48]
        assert meta["provenance"]["image_sha256"] == hashlib.sha256(original).hexdigest()
        assert meta["provenance"]["image"] == f"img/{name}" and meta["qtype"] == "global"
    text = samples["text-only"]
    assert set(text) - {"__key__", "__url__", "__local_path__"} == {"json"}
    assert json.loads(text["json"])["conversations"][0]["value"] == "Say hi."

    # Members of one sample are adjacent in every tar (read_webdataset raises otherwise).
    for url in shard_uris(str(out), manifest):
        keys = [m.name.split(".", 1)[0] for m in tarfile.open(url).getmembers()]
        assert keys == sorted(keys)


def test_rerun_is_noop_and_append_adds_a_version(raw, tmp_path):
    out = tmp_path / "wds"
    pack(_cfg(raw, out, "data.json"))
    before = read_manifest(str(out))
    files_before = sorted(os.listdir(out))
    again = pack(_cfg(raw, out, "data.json"))
    assert again["new_version"] is False and again["written_shards"] == [] and again["skipped_sources"]
    assert read_manifest(str(out)) == before and sorted(os.listdir(out)) == files_before

    # New raw batch: two new ids, one id already packed in version 1.
    (raw / "batch2.jsonl").write_text("\n".join(json.dumps(r) for r in [
        _rec("g", "img/b.png"), _rec("b", "img/b.png"), _rec("h", q="Hi?", a="hi")]))
    summary = pack(_cfg(raw, out, "data.json", "batch2.jsonl"))
    after = read_manifest(str(out))
    assert summary["dataset_version"] == after["dataset_version"] == 2
    assert summary["rejects"]["duplicate_id"] == 1 and summary["samples"] == 2
    assert after["shards"][:len(before["shards"])] == before["shards"]
    new = after["shards"][len(before["shards"]):]
    assert [s["name"] for s in new] == summary["written_shards"] == ["shard-000002-000000.tar"]
    assert after["num_samples"] == before["num_samples"] + 2
    assert set(_read_back(shard_uris(str(out), after))) == {"a", "b", "c", "d", "text-only", "g", "h"}
    assert set(_read_back(shard_uris(str(out), after, max_version=1))) == {"a", "b", "c", "d", "text-only"}
    assert [json.loads(x)["dataset_version"] for x in (out / "rejects.jsonl").read_text().splitlines()][-1] == 2


def test_shard_limits_and_reproducible_shards(raw, tmp_path):
    def run(out):
        cfg = dataclasses.replace(_cfg(raw, out, "data.json"), max_samples_per_shard=100, max_bytes_per_shard=1)
        return pack(cfg), read_manifest(str(out))

    (one, m1), (_, m2) = run(tmp_path / "one"), run(tmp_path / "two")
    assert len(one["written_shards"]) == one["samples"] == 5  # over the byte budget: one sample per shard
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]  # byte-identical shards
    three = pack(dataclasses.replace(_cfg(raw, tmp_path / "three", "data.json"), max_samples_per_shard=2))
    assert [s["samples"] for s in read_manifest(str(tmp_path / "three"))["shards"]] == [2, 2, 1]
    assert len(three["written_shards"]) == 3


def test_pack_s3_to_s3(raw, s3_bucket, tmp_path):
    src = f"s3://{s3_bucket}/raw"
    storage.copy_dir(str(raw), src)
    out = f"s3://{s3_bucket}/wds"
    summary = pack(PackConfig(inputs=(f"{src}/data.json", f"{src}/more.jsonl"), output_dir=out,
                              max_pixels=200 * 200, progress=False))
    assert {k: v for k, v in summary["rejects"].items() if v} == EXPECTED_REJECTS
    manifest = read_manifest(out)
    assert manifest["num_samples"] == 7 and len(manifest["shards"]) == 1
    assert manifest["sources"][0]["path"] == f"{src}/data.json"
    local = local_copy(out, str(tmp_path / "cache"))
    assert sorted(os.listdir(local)) == ["ids-000001.txt", "manifest.json", "rejects.jsonl", "shard-000001-000000.tar"]
    assert set(_read_back([os.path.join(local, s["name"]) for s in manifest["shards"]])) == {
        "a", "b", "c", "d", "e", "f", "text-only"}
    assert pack(PackConfig(inputs=(f"{src}/data.json",), output_dir=out, progress=False))["new_version"] is False


def test_whole_file_bad_json_and_inflight_duplicates(raw, tmp_path):
    (raw / "broken.json").write_text('[{"id": "x", "conversations": [}')
    (raw / "object.json").write_text('{"id": "y"}')  # not a list: read as JSONL, one record
    # The first "z" fails its image check, so the later "z" is the one that gets in (serial semantics).
    (raw / "dups.jsonl").write_text("\n".join(json.dumps(r) for r in [
        _rec("z", "img/garbage.jpg"), _rec("z", "img/a.jpg"), _rec("z", "img/b.png")]))
    out = tmp_path / "wds"
    summary = pack(_cfg(raw, out, "broken.json", "object.json", "dups.jsonl", num_threads=3))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["reason"], r.get("index"), r.get("line")) for r in rejects] == [
        ("bad_json", None, None), ("malformed_conversation", None, 1),
        ("undecodable_image", None, 1), ("duplicate_id", None, 3)]
    assert summary["samples"] == 1 and read_manifest(str(out))["rejects"] == 4
    (sample,) = _read_back(shard_uris(str(out))).values()
    assert sample["jpg"] == (raw / "img" / "a.jpg").read_bytes()
    assert pack(_cfg(raw, out, "broken.json"))["new_version"] is False  # a bad source is still "seen"


def test_job_entry_point(raw, tmp_path, capsys):
    path = os.path.join(CONFIGS, "pack.yaml")
    assert open(path).readline().startswith("# ")
    rc = pack_job.main(["--config", path, f"inputs=[{raw / 'more.jsonl'}]", f"output_dir={tmp_path / 'o'}",
                        "progress=false"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["samples"] == 2 and out["rejects"]["bad_json"] == 1
    assert pack_job.main(["--config", path, "max_sampels_per_shard=2"]) == 2
    assert "max_sampels_per_shard" in capsys.readouterr().err


def test_path_escapes_are_rejected_with_their_reason(raw, tmp_path):
    """../, absolute paths, URIs and symlinks leading out of the image root never reach a shard."""
    secret = tmp_path / "outside.jpg"
    secret.write_bytes(_img("JPEG", color=(1, 2, 3)))
    os.symlink(secret, raw / "img" / "link-out.jpg")
    os.symlink(raw / "img" / "a.jpg", raw / "img" / "link-in.jpg")  # a link that stays inside is fine
    records = [_rec("ok", "img/a.jpg"), _rec("dotdot", "../outside.jpg"), _rec("dotdot-deep", "img/../../outside.jpg"),
               _rec("absolute", str(secret)), _rec("uri", "file://" + str(secret)), _rec("symlink", "img/link-out.jpg"),
               _rec("link-in", "img/link-in.jpg"), _rec("inner-dotdot", "img/../img/b.png")]
    (raw / "escape.json").write_text(json.dumps(records))
    out = tmp_path / "wds"
    summary = pack(_cfg(raw, out, "escape.json"))
    assert {k: v for k, v in summary["rejects"].items() if v} == {"path_escape": 5}
    rejects = {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == {"dotdot", "dotdot-deep", "absolute", "uri", "symlink"}
    assert "absolute" in rejects["absolute"]["detail"] and "allow_absolute_paths" in rejects["absolute"]["detail"]
    assert "outside the image root" in rejects["symlink"]["detail"]
    kept = _read_back(shard_uris(str(out)))
    assert set(kept) == {"ok", "link-in", "inner-dotdot"}
    assert kept["ok"]["jpg"] == (raw / "img" / "a.jpg").read_bytes()

    # Opting in admits absolute paths (and only those): relative escapes stay rejected.
    (raw / "abs.json").write_text(json.dumps([_rec("absolute", str(secret)), _rec("dotdot", "../outside.jpg")]))
    out2 = tmp_path / "wds2"
    summary = pack(_cfg(raw, out2, "abs.json", allow_absolute_paths=True))
    assert summary["samples"] == 1 and summary["rejects"]["path_escape"] == 1
    assert _read_back(shard_uris(str(out2)))["absolute"]["jpg"] == secret.read_bytes()
