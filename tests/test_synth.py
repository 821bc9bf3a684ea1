"""Synthetic high-res VQA generator: determinism, sizes, splits, and answers that are really drawn."""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import pytest
from PIL import Image, ImageFont

from jobs import synth as synth_job
from pipelines import storage
from pipelines.data.drawing import font
from pipelines.data.synth import COLORS, SynthConfig, generate, render_image


def _cfg(out, **kw) -> SynthConfig:
    base = dict(output_dir=str(out), num_images=8, min_side=400, max_side=800, val_fraction=0.25,
                png_fraction=0.4, progress=False)
    return SynthConfig(**(base | kw))


def _fingerprint(out) -> tuple[bytes, dict[str, str]]:
    body = (out / "train.json").read_bytes() + (out / "val.json").read_bytes()
    pixels = {p.name: hashlib.sha256(np.asarray(Image.open(p).convert("RGB")).tobytes()).hexdigest()
              for p in sorted((out / "images").iterdir())}
    return body, pixels


def test_same_seed_same_bytes_and_pixels(tmp_path):
    generate(_cfg(tmp_path / "a"))
    generate(_cfg(tmp_path / "b"))
    generate(_cfg(tmp_path / "c", seed=1))
    a, b, c = (_fingerprint(tmp_path / d) for d in "abc")
    assert a == b
    assert a[0] != c[0] and set(a[1].values()).isdisjoint(c[1].values())


def test_worker_processes_write_the_same_bytes(tmp_path):
    """workers=2 renders chunks of images in two processes: the same files, byte for byte, as one process."""
    for kind in ("scene", "fidelity"):
        generate(_cfg(tmp_path / f"{kind}1", kind=kind, num_images=70))  # 3 chunks of <= 32
        generate(_cfg(tmp_path / f"{kind}2", kind=kind, num_images=70, workers=2))
        one, two = ({p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
                    for d in (tmp_path / f"{kind}1", tmp_path / f"{kind}2"))
        assert len(one) == 72 and one == two
    with pytest.raises(ValueError, match="workers must be >= 1"):
        _cfg(tmp_path, workers=0)


def test_sizes_formats_and_splits(tmp_path):
    cfg = _cfg(tmp_path)
    summary = generate(cfg)
    train = json.loads((tmp_path / "train.json").read_text())
    val = json.loads((tmp_path / "val.json").read_text())
    assert summary["train_records"] == len(train) and summary["val_records"] == len(val) > 0
    assert {r["image"] for r in train}.isdisjoint({r["image"] for r in val})  # split by image
    assert len({r["id"] for r in train + val}) == len(train + val)
    assert {r["qtype"] for r in train + val} == {"detail", "global", "caption"}
    formats = set()
    for rel in {r["image"] for r in train + val}:
        im = Image.open(tmp_path / rel)
        formats.add(im.format)
        assert 400 <= im.width <= 800 and 400 <= im.height <= 800
        assert {"jpg": "JPEG", "png": "PNG"}[rel.rsplit(".", 1)[1]] == im.format
    assert formats == {"JPEG", "PNG"}
    for r in train + val:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].count("<image>") == 1 and gpt["from"] == "gpt"
        if r["qtype"] != "caption":
            assert len(gpt["value"].split()) == 1  # short answers: exact match is meaningful


def test_answers_are_drawn_in_the_details(tmp_path):
    cfg = _cfg(tmp_path, png_fraction=1.0)  # lossless, so colours can be checked exactly
    generate(cfg)
    records = json.loads((tmp_path / "train.json").read_text()) + json.loads((tmp_path / "val.json").read_text())
    for i in range(cfg.num_images):
        _, facts = render_image(random.Random(f"{cfg.seed}:{i}"), cfg)
        name = f"s{cfg.seed}-{i:06d}"
        px = np.asarray(Image.open(tmp_path / "images" / f"{name}.png").convert("RGB")).astype(int)
        answers = {r["task"]: r["conversations"][1]["value"] for r in records if r["id"].startswith(name + "-")}
        for task, answer in answers.items():
            key = {"code": "code", "corner_color": "corner_color", "corner_shape": "corner_shape",
                   "count_dots": "num_dots", "background": "background", "count_large": "num_large",
                   "large_color": "large_color"}.get(task)
            if key:
                assert answer == str(facts[key]), (name, task)
        # The corner mark really has the answered colour, at the corner the question names.
        x0, y0, x1, y1 = facts["mark_box"]
        mark = px[y0:y1, x0:x1].reshape(-1, 3)
        assert (np.abs(mark - COLORS[facts["corner_color"]]).sum(1) < 10).sum() > 0.2 * len(mark)
        assert (x0 < px.shape[1] / 2) == facts["corner"].endswith("left")
        # The code box holds dark text and is small: under 2% of the image height.
        x0, y0, x1, y1 = facts["code_box"]
        assert (px[y0 + 2:y1 - 2, x0 + 2:x1 - 2].sum(2) < 200).any() and (y1 - y0) < 0.02 * px.shape[0] + 20
        # Countable dots: the dot colour covers about num_dots dots' worth of pixels.
        dot = (np.abs(px - COLORS[facts["dot_color"]]).sum(2) < 10).sum()
        area = np.pi * (max(6, round(facts["type_px"] * 0.8)) / 2) ** 2
        assert 0.5 * facts["num_dots"] * area < dot < 1.6 * facts["num_dots"] * area + 40


def test_writes_to_s3(s3_bucket):
    out = f"s3://{s3_bucket}/synth"
    summary = generate(SynthConfig(output_dir=out, num_images=2, min_side=300, max_side=400, progress=False))
    assert storage.listdir(out) == ["images", "train.json", "val.json"]
    assert len(storage.listdir(f"{out}/images")) == 2 == summary["images"]
    assert len(json.loads(storage.read_bytes(f"{out}/train.json"))) == summary["train_records"]


def test_font_works_offline():
    assert isinstance(font(12), ImageFont.FreeTypeFont)


def test_job_entry_point(tmp_path, capsys):
    cfg_path = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "synth_tiny.yaml")
    assert open(cfg_path).readline().startswith("# ")
    rc = synth_job.main(["--config", cfg_path, f"output_dir={tmp_path}", "num_images=3", "progress=false"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["images"] == 3
    assert synth_job.main(["--config", cfg_path, "num_imagez=3"]) == 2
    assert "num_imagez" in capsys.readouterr().err


# ------------------------------------------------------------------ fidelity tasks (local by construction)


def test_fidelity_images_draw_their_answers(tmp_path):
    from pipelines.data.synth_tasks import GLOBAL_TASKS, LOCAL_TASKS, PAIRS, POSITIONS, render_fidelity_image

    cfg = _cfg(tmp_path, kind="fidelity", num_images=12, tile=112, captions=False)
    summary = generate(cfg)
    records = json.loads((tmp_path / "train.json").read_text()) + json.loads((tmp_path / "val.json").read_text())
    # one fine detail per image (its question) plus every global question
    assert summary["train_records"] + summary["val_records"] == 12 * (1 + len(GLOBAL_TASKS))
    assert {r["qtype"] for r in records if r["task"] in LOCAL_TASKS} == {"detail"}
    seen = set()
    for i in range(cfg.num_images):
        _, facts = render_fidelity_image(random.Random(f"{cfg.seed}:{i}"), 112)
        img = Image.open(tmp_path / "images" / f"s{cfg.seed}-{i:06d}.png")
        assert img.format == "PNG" and img.size == (336, 224)  # 3x2 crops of 112 px at 1:1
        px = np.asarray(img.convert("RGB")).astype(int)
        answers = {r["task"]: r["conversations"][1]["value"] for r in records if r["id"].startswith(f"s0-{i:06d}-")}
        detail = facts["detail"]
        seen.add(detail)
        assert answers == {t: str(facts[t]) for t in (detail, *GLOBAL_TASKS)}
        if detail in ("texture", "small_object"):
            x0, y0, x1, y1 = facts["texture_box" if detail == "texture" else "small_box"]
            a, b = (np.asarray(c) for c in PAIRS[facts[detail]])
            patch = px[y0:y1, x0:x1]
            even = (np.add.outer(np.arange(y1 - y0), np.arange(x1 - x0)) % 2 == 0)
            assert (patch[even] == a).all() and (patch[~even] == b).all()  # a 1-px checkerboard of the pair
            assert np.abs(patch.reshape(-1, 3).mean(0) - 128).max() < 3  # ... that averages to mid-grey
        else:
            x0, y0, x1, y1 = facts["print_box"]
            block = px[y0:y1, x0:x1].mean(-1)
            assert (block < 90).sum() > 20  # dark glyph pixels in the fine-print box
            assert (block < 90).sum() < 0.2 * block.size  # ... sparse: 9 px type in 14 px cells
        cx = (facts["big_box"][0] + facts["big_box"][2]) / 2
        assert facts["big_position"] == POSITIONS[int(cx // 112)]
    assert seen == set(LOCAL_TASKS)


def test_fine_print_darkness_does_not_give_the_digit_away():
    from pipelines.data.synth_tasks import render_fidelity_image

    means = {}
    for i in range(40):
        img, facts = render_fidelity_image(random.Random(i), 112, ("fine_print",))
        x0, y0, x1, y1 = facts["print_box"]
        means.setdefault(facts["fine_print"], []).append(np.asarray(img.convert("L"))[y0:y1, x0:x1].mean())
    centres = [np.mean(v) for v in means.values()]
    # per-digit block means agree to < 1 grey level (the background noise alone moves them ~0.2)
    assert len(means) == 4 and max(centres) - min(centres) < 1.0, centres


def test_fidelity_task_selection_and_validation(tmp_path):
    generate(_cfg(tmp_path, kind="fidelity", num_images=2, tile=56, tasks=("texture", "big_color"), captions=True,
                  val_fraction=0.0))
    records = json.loads((tmp_path / "train.json").read_text())
    assert sorted(r["task"] for r in records) == ["big_color", "big_color", "caption", "caption", "texture", "texture"]
    assert Image.open(tmp_path / records[0]["image"]).size == (168, 112)
    with pytest.raises(ValueError, match="tasks"):
        SynthConfig(output_dir=str(tmp_path), kind="fidelity", tasks=("nope",))
