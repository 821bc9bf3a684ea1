"""Fidelity tasks for ``slime synth kind=fidelity``: questions that need the local crops *by construction*.

Each image is ``3 * tile`` x ``2 * tile`` pixels, so the released area rule picks a 3 x 2 grid and the
local crops are the image at 1:1 scale, while the global view squeezes it 3x horizontally and 2x
vertically. The background is mid-grey (128) with Gaussian noise (sigma 12). On it:

* ``texture`` (local): a large region of a 1-px checkerboard in a complementary colour pair
  (red/cyan, green/magenta, blue/yellow, black/white). Every pair averages to mid-grey, so the
  downscaled global view shows grey where the crops show the pattern.
* ``fine_print`` (local): a block of one digit (0, 1, 4 or 7) repeated in ~``tile/12`` px type (9 px at
  tile 112), in a random ink level so the block's mean darkness does not give the digit away; squeezed
  3x the glyphs are 3 px blobs.
* ``small_object`` (local): one small square (about ``tile/6`` px) of the same kind of 1-px
  checkerboard, anywhere in the image: a few local tokens out of ~100 carry it, so it is where the
  text-guided selector has to keep the right ones.
* ``big_color`` and ``big_position`` (global): one large solid shape (circle, square, triangle or
  star) in the left, middle or right third, readable from the global view.

Whether a task is really absent from the global view is measured, not assumed: ``benchmarks.learning``
fits a probe on the global view's features and prints its accuracy next to chance.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

from pipelines.data.synth import _draw_shape, _font

PAIRS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red-cyan": ((255, 0, 0), (0, 255, 255)), "green-magenta": ((0, 255, 0), (255, 0, 255)),
    "blue-yellow": ((0, 0, 255), (255, 255, 0)), "black-white": ((0, 0, 0), (255, 255, 255)),
}
BIG_COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20)}
BIG_SHAPES = ("circle", "square", "triangle", "star")
PRINT_DIGITS = "0147"  # four glyphs as different as digits get
LOCAL_TASKS = ("texture", "fine_print", "small_object")
GLOBAL_TASKS = ("big_color", "big_position")
POSITIONS = ("left", "middle", "right")
TASKS = LOCAL_TASKS + GLOBAL_TASKS
QUESTIONS = {
    "texture": "Which colour pair makes the fine checkered area?",
    "fine_print": "Which digit is repeated in the fine print?",
    "small_object": "Which colour pair makes the small checkered square?",
    "big_color": "What colour is the big shape?",
    "big_position": "Is the big shape on the left, in the middle or on the right?",
}
# Answer set per task (what chance is computed over).
ANSWERS = {"texture": tuple(PAIRS), "fine_print": tuple(PRINT_DIGITS), "small_object": tuple(PAIRS),
           "big_color": tuple(BIG_COLORS), "big_position": POSITIONS}


def _checker(w: int, h: int, pair: str) -> np.ndarray:
    a, b = (np.asarray(c, np.float32) for c in PAIRS[pair])
    parity = (np.add.outer(np.arange(h), np.arange(w)) % 2)[..., None]  # [h, w, 1]
    return np.where(parity == 0, a, b)


def _free(box, boxes, margin: int) -> bool:
    return all(box[2] + margin <= b[0] or b[2] + margin <= box[0] or box[3] + margin <= b[1] or b[3] + margin <= box[1]
               for b in boxes)


def _place(rng: random.Random, boxes: list, width: int, height: int, w: int, h: int, margin: int) -> tuple:
    for _ in range(500):
        x, y = rng.randint(margin, width - margin - w), rng.randint(margin, height - margin - h)
        box = (x, y, x + w, y + h)
        if _free(box, boxes, margin):
            boxes.append(box)
            return box
    raise RuntimeError(f"cannot place a {w}x{h} box on a {width}x{height} image")  # sizes below always fit


def _in_column(rng: random.Random, boxes: list, col: int, tile: int, w: int, h: int, margin: int) -> tuple:
    x = col * tile + rng.randint(margin, tile - margin - w)
    y = rng.randint(margin, 2 * tile - margin - h)
    boxes.append((x, y, x + w, y + h))
    return boxes[-1]


def render_fidelity_image(rng: random.Random, tile: int = 112) -> tuple[Image.Image, dict]:
    """One 3*tile x 2*tile image and the facts drawn on it. Deterministic in ``rng``."""
    width, height = 3 * tile, 2 * tile
    nrng = np.random.default_rng(rng.getrandbits(64))
    canvas = 128 + nrng.normal(0, 12, (height, width, 3)).astype(np.float32)
    boxes: list = []
    margin = max(2, tile // 28)

    # The big shape and the texture area each get their own tile column (so both always fit), then
    # the fine print and the small square go wherever there is room.
    col_big, col_tex = rng.sample(range(3), 2)
    big = round(tile * rng.uniform(0.75, 0.9))
    big_box = _in_column(rng, boxes, col_big, tile, big, big, margin)
    tw, th = round(tile * rng.uniform(0.7, 0.9)), round(tile * rng.uniform(0.6, 0.8))
    tex_box = _in_column(rng, boxes, col_tex, tile, tw, th, margin)
    pair_t = rng.choice(tuple(PAIRS))
    x0, y0, x1, y1 = tex_box
    canvas[y0:y1, x0:x1] = _checker(x1 - x0, y1 - y0, pair_t)

    digit = rng.choice(PRINT_DIGITS)
    type_px = max(7, round(tile / 12))
    font = _font(type_px)
    line = digit * max(4, round(tile * 0.6 / (type_px * 0.6)))
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), line, font=font)
    lines = 4
    gap = max(2, type_px // 3)
    pw, ph = right - left, lines * (bottom - top) + (lines - 1) * gap
    print_box = _place(rng, boxes, width, height, pw, ph, margin)

    small = max(8, round(tile * rng.uniform(0.14, 0.2)))
    small_box = _place(rng, boxes, width, height, small, small, margin)
    pair_s = rng.choice(tuple(PAIRS))
    x0, y0, x1, y1 = small_box
    canvas[y0:y1, x0:x1] = _checker(small, small, pair_s)

    img = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    big_color, big_shape = rng.choice(tuple(BIG_COLORS)), rng.choice(BIG_SHAPES)
    _draw_shape(draw, big_shape, big_box, BIG_COLORS[big_color])
    ink = rng.randint(10, 80)  # random ink level: the block's mean darkness is not the digit's signature
    for k in range(lines):
        y = print_box[1] - top + k * (bottom - top + gap)
        draw.text((print_box[0] - left, y), line, fill=(ink, ink, ink), font=font)

    facts = {"width": width, "height": height, "tile": tile, "texture": pair_t, "texture_box": tex_box,
             "fine_print": digit, "print_box": print_box, "type_px": type_px, "small_object": pair_s,
             "small_box": small_box, "big_color": big_color, "big_shape": big_shape, "big_box": big_box,
             "big_position": POSITIONS[col_big]}
    return img, facts


def fidelity_questions(facts: dict, tasks: tuple[str, ...] = TASKS) -> dict[str, tuple[str, str, str]]:
    """task -> (qtype, question, short answer); qtype "detail" for local tasks, "global" otherwise."""
    return {t: ("detail" if t in LOCAL_TASKS else "global", QUESTIONS[t], str(facts[t])) for t in tasks}


def fidelity_caption(facts: dict) -> str:
    return (f"A {facts['big_color']} {facts['big_shape']}, a fine {facts['texture']} checkered area, fine print of "
            f"the digit {facts['fine_print']} and a small {facts['small_object']} checkered square on grey.")
