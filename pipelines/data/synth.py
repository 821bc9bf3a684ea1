"""Deterministic synthetic high-resolution VQA data: the smoke test for "does the local branch work".

Each image (roughly 1000-2000 px per side, independent width and height, so aspect ratios vary
between 1:2 and 2:1) carries

* global content, visible in a downscaled view: a gradient background of a named colour and 1-5
  large circles of one colour;
* small details, lost when the image is squeezed into one 336 px view: a boxed three-character code
  in small type, a small mark (shape + colour) in one corner, and 1-6 small dots of one colour.

From it come LLaVA-format records with short answers drawn from a small vocabulary (colour names,
shape names, digits, a few letters), so exact match is a meaningful metric for a tiny model:
``qtype`` "detail" (needs the small details), "global" (answerable from the global view) and
"caption" (one descriptive sentence, for the connector pre-training phase). ``task`` names the
question template. Same seed -> byte-identical JSON and identical pixels.

``kind="fidelity"`` instead draws the tasks of ``pipelines.data.synth_tasks``: 3*tile x 2*tile lossless images
whose detail questions need the local crops by construction (fine texture, fine print, one small
patterned object) plus two global questions; every task is asked about every image.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image, ImageDraw
from tqdm import tqdm

from pipelines import storage
from pipelines.data.drawing import draw_shape, font
from pipelines.data.synth_tasks import LOCAL_TASKS, TASKS, fidelity_caption, fidelity_questions, render_fidelity_image
from pipelines.storage import StorageConfig

# Named colours: RGB of a shape / mark, and a light tint of the same name for backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20),
    "orange": (245, 130, 20), "purple": (140, 40, 170), "black": (20, 20, 20), "white": (250, 250, 250),
}
BACKGROUNDS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "star")
CODE_LETTERS = "ACEHKMPRTX"  # visually distinct capitals; the answer vocabulary stays small
DIGITS = "0123456789"
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    output_dir: str  # local dir or s3:// prefix; gets images/, train.json, val.json
    kind: Literal["scene", "fidelity"] = "scene"
    seed: int = 0
    num_images: int = 64
    val_fraction: float = 0.125  # whole images go to val, so val questions are about unseen images
    min_side: int = 1000
    max_side: int = 2000
    png_fraction: float = 0.25
    jpeg_quality: int = 92
    detail_scale: float = 0.012  # small-type height as a fraction of the shorter side (>= 10 px)
    questions_per_image: int = 3  # QA records per image (detail/global mix), plus one caption
    detail_fraction: float = 0.6
    captions: bool = True
    tile: int = 112  # fidelity: the model's tile side; images are 3*tile x 2*tile (crops at 1:1)
    tasks: tuple[str, ...] = ()  # fidelity: tasks to ask (empty = all of synth_tasks.TASKS)
    progress: bool = True
    workers: int = 1  # processes rendering images (same bytes for any number)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if not 64 <= self.min_side <= self.max_side:
            raise ValueError(f"min_side/max_side must satisfy 64 <= min <= max, got {self.min_side}/{self.max_side}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.kind == "fidelity":

            unknown = [t for t in self.tasks if t not in TASKS]
            if unknown:
                raise ValueError(f"tasks: {unknown[0]!r} is not one of {list(TASKS)}")
            if self.tile < 28:
                raise ValueError(f"tile must be >= 28, got {self.tile}")


class _Placer:
    """Rejection-samples boxes that overlap nothing placed before (with a margin)."""

    def __init__(self, rng: random.Random, width: int, height: int):
        self.rng, self.width, self.height, self.boxes = rng, width, height, []

    def free(self, box, margin: int = 4) -> bool:
        return all(box[2] + margin < b[0] or b[2] + margin < box[0] or box[3] + margin < b[1] or b[3] + margin < box[1]
                   for b in self.boxes)

    def place(self, w: int, h: int, inset: int) -> tuple[int, int, int, int]:
        for _ in range(200):
            x = self.rng.randint(inset, self.width - inset - w)
            y = self.rng.randint(inset, self.height - inset - h)
            box = (x, y, x + w, y + h)
            if self.free(box):
                self.boxes.append(box)
                return box
        self.boxes.append(box)  # crowded small image: accept an overlap rather than loop forever
        return box


def render_image(rng: random.Random, cfg: SynthConfig) -> tuple[Image.Image, dict]:
    """One image and the facts drawn on it (everything questions are generated from)."""
    width, height = rng.randint(cfg.min_side, cfg.max_side), rng.randint(cfg.min_side, cfg.max_side)
    short = min(width, height)
    bg = rng.choice(BACKGROUNDS)
    tint = tuple(int(c * 0.35 + 255 * 0.65) for c in COLORS[bg])
    shade = tuple(int(c * 0.85) for c in tint)
    gradient = Image.linear_gradient("L").resize((width, height))
    img = Image.composite(Image.new("RGB", (width, height), shade), Image.new("RGB", (width, height), tint), gradient)
    draw = ImageDraw.Draw(img)
    placer = _Placer(rng, width, height)

    # Large circles first: they own most of the canvas and must not hide the small things.
    large_color = rng.choice([c for c in COLORS if c not in (bg, "white")])
    num_large = rng.randint(1, 5)
    for _ in range(num_large):
        d = int(short * rng.uniform(0.12, 0.2))
        draw.ellipse(placer.place(d, d, inset=short // 10), fill=COLORS[large_color])

    type_px = max(10, round(short * cfg.detail_scale))
    code = rng.choice(CODE_LETTERS) + rng.choice(DIGITS) + rng.choice(CODE_LETTERS)
    face = font(type_px)
    left, top, right, bottom = draw.textbbox((0, 0), code, font=face)
    pad = max(2, type_px // 4)
    bx = placer.place(right - left + 2 * pad, bottom - top + 2 * pad, inset=short // 8)
    draw.rectangle(bx, fill=COLORS["white"], outline=COLORS["black"], width=max(1, type_px // 10))
    draw.text((bx[0] + pad - left, bx[1] + pad - top), code, fill=COLORS["black"], font=face)

    mark_px = max(10, round(type_px * 1.5))
    corner = rng.choice(CORNERS)
    corner_color = rng.choice([c for c in COLORS if c not in (bg, large_color, "white")])
    corner_shape = rng.choice(SHAPES)
    m = max(4, short // 40)
    x0 = m if corner.endswith("left") else width - m - mark_px
    y0 = m if corner.startswith("top") else height - m - mark_px
    mark_box = (x0, y0, x0 + mark_px, y0 + mark_px)
    placer.boxes.append(mark_box)
    draw_shape(draw, corner_shape, mark_box, COLORS[corner_color])

    dot_color = rng.choice([c for c in COLORS if c not in (bg, large_color, corner_color, "white")])
    num_dots = rng.randint(1, 6)
    dot_px = max(6, round(type_px * 0.8))
    for _ in range(num_dots):
        draw.ellipse(placer.place(dot_px, dot_px, inset=short // 10), fill=COLORS[dot_color])

    facts = {"width": width, "height": height, "background": bg, "large_color": large_color,
             "num_large": num_large, "code": code, "corner": corner, "corner_color": corner_color,
             "corner_shape": corner_shape, "dot_color": dot_color, "num_dots": num_dots,
             "code_box": bx, "mark_box": mark_box, "type_px": type_px}
    return img, facts


def _questions(f: dict) -> dict[str, tuple[str, str, str]]:
    """task -> (qtype, question, short answer)."""
    return {
        "code": ("detail", "What is the code written in the small box?", f["code"]),
        "corner_color": ("detail", f"What colour is the small shape in the {f['corner']} corner?", f["corner_color"]),
        "corner_shape": ("detail", f"What shape is the small mark in the {f['corner']} corner?", f["corner_shape"]),
        "count_dots": ("detail", f"How many small {f['dot_color']} dots are there?", str(f["num_dots"])),
        "background": ("global", "What is the background colour?", f["background"]),
        "count_large": ("global", "How many large circles are there?", str(f["num_large"])),
        "large_color": ("global", "What colour are the large circles?", f["large_color"]),
    }


def _caption(f: dict) -> str:
    n = f["num_large"]
    return (f"A {f['background']} background with {n} large {f['large_color']} circle{'s' * (n > 1)}, "
            f"a small box reading {f['code']}, a small {f['corner_color']} {f['corner_shape']} in the "
            f"{f['corner']} corner and {f['num_dots']} small {f['dot_color']} dot{'s' * (f['num_dots'] > 1)}.")


def _record(rid: str, image: str, question: str, answer: str, qtype: str, task: str) -> dict:
    return {"id": rid, "image": image, "qtype": qtype, "task": task,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def records_for(name: str, image: str, facts: dict, rng: random.Random, cfg: SynthConfig) -> list[dict]:
    qs = _questions(facts)
    detail = [t for t, q in qs.items() if q[0] == "detail"]
    glob = [t for t, q in qs.items() if q[0] == "global"]
    num_detail = min(len(detail), round(cfg.questions_per_image * cfg.detail_fraction))
    num_global = min(len(glob), cfg.questions_per_image - num_detail)
    tasks = rng.sample(detail, num_detail) + rng.sample(glob, num_global)
    out = [_record(f"{name}-{t}", image, qs[t][1], qs[t][2], qs[t][0], t) for t in tasks]
    if cfg.captions:
        caption = _caption(facts)
        out.append(_record(f"{name}-caption", image, "Describe the image briefly.", caption, "caption", "caption"))
    return out


def fidelity_records(name: str, image: str, facts: dict, cfg: SynthConfig) -> list[dict]:

    qs = fidelity_questions(facts, cfg.tasks or TASKS)
    out = [_record(f"{name}-{t}", image, q, a, qtype, t) for t, (qtype, q, a) in qs.items()]
    if cfg.captions:
        out.append(_record(f"{name}-caption", image, "Describe the image briefly.", fidelity_caption(facts),
                           "caption", "caption"))
    return out


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=6)
    else:  # 4:4:4 keeps the colour of few-pixel marks; chroma subsampling would smear it
        img.save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _make_image(cfg: SynthConfig, i: int) -> tuple[list[dict], int]:
    """Render, encode and write image ``i`` (its pixels depend on (seed, i) only); its records and byte count."""
    rng = random.Random(f"{cfg.seed}:{i}")  # str seeds hash with sha512: stable across processes
    if cfg.kind == "fidelity":

        details = tuple(t for t in cfg.tasks if t in LOCAL_TASKS) or LOCAL_TASKS
        img, facts = render_fidelity_image(rng, cfg.tile, details)
        fmt = "png"  # lossless: JPEG would smear the 1-px patterns the local tasks are about
    else:
        img, facts = render_image(rng, cfg)
        fmt = "png" if rng.random() < cfg.png_fraction else "jpg"
    name = f"s{cfg.seed}-{i:06d}"
    rel = f"images/{name}.{fmt}"
    data = _encode(img, fmt, cfg.jpeg_quality)
    storage.write_bytes_atomic(storage.join(cfg.output_dir, *rel.split("/")), data, cfg.storage)
    recs = (fidelity_records(name, rel, facts, cfg) if cfg.kind == "fidelity"
            else records_for(name, rel, facts, rng, cfg))
    return recs, len(data)


def _make_images(cfg: SynthConfig, indices: range) -> list[tuple[list[dict], int]]:
    return [_make_image(cfg, i) for i in indices]


def generate(cfg: SynthConfig) -> dict:
    """Write images + train.json + val.json under ``cfg.output_dir``; returns a summary dict. With
    ``cfg.workers > 1`` the images are rendered in that many processes; the output is the same bytes."""
    start = time.perf_counter()
    split_rng = random.Random(f"{cfg.seed}:split")
    val_images = set(split_rng.sample(range(cfg.num_images), round(cfg.num_images * cfg.val_fraction)))
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    image_bytes = 0
    chunk = 32
    chunks = [range(a, min(a + chunk, cfg.num_images)) for a in range(0, cfg.num_images, chunk)]
    bar = tqdm(total=cfg.num_images, desc="synth", unit="img", disable=not cfg.progress)
    with contextlib.ExitStack() as stack:
        if cfg.workers > 1 and len(chunks) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(min(cfg.workers, len(chunks)),
                                                           mp_context=mp.get_context("spawn")))
            results = pool.map(_make_images, [cfg] * len(chunks), chunks)  # in order
        else:
            results = (_make_images(cfg, c) for c in chunks)
        for indices, made in zip(chunks, results):
            for i, (recs, nbytes) in zip(indices, made):
                image_bytes += nbytes
                splits["val" if i in val_images else "train"].extend(recs)
            bar.update(len(indices))
    bar.close()
    for split, recs in splits.items():
        body = json.dumps(recs, indent=1, ensure_ascii=False).encode()
        storage.write_bytes_atomic(storage.join(cfg.output_dir, f"{split}.json"), body, cfg.storage)
    return {"output_dir": cfg.output_dir, "images": cfg.num_images, "image_bytes": image_bytes,
            "train_records": len(splits["train"]), "val_records": len(splits["val"]),
            "elapsed_s": round(time.perf_counter() - start, 2)}
