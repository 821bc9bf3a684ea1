"""Fidelity tasks for ``slime synth kind=fidelity``: questions that need the local crops *by construction*.

Each image is ``3 * tile`` x ``2 * tile`` pixels, so the released area rule picks a 3 x 2 grid and the
local crops are the image at 1:1 scale, while the global view squeezes it 3x horizontally and 2x
vertically. The background is mid-grey (128) with Gaussian noise (sigma 12). Every image carries one
large solid shape and exactly one fine detail (one per image, so a detail question has one referent):

* ``texture`` (local): a large region of a 1-px checkerboard in a complementary colour pair
  (red/cyan, green/magenta, blue/yellow, black/white). Every pair averages to mid-grey, so the
  downscaled global view shows grey where the crops show the pattern.
* ``fine_print`` (local): a 5 x 4 block of one digit (0, 1, 4 or 7) in 9 px type, one glyph centred in
  each 14 px patch of the crops (the block sits on the patch grid; squeezed into the global view the
  glyphs are 3 x 4 px blobs), its ink set so that the block's mean darkness is random and the same for
  every digit. Mostly, not wholly, absent from the global view: a linear probe on the global view's
  features reads it at 0.35-0.41 (chance 0.27-0.28; 13 px type: 0.78), which the benchmark prints.
* ``small_object`` (local): one small square (``0.35-0.5 * tile`` px, at most 4 % of the image) of
  the same kind of 1-px checkerboard, anywhere: 4-9 of the 96 local tokens carry it, so the selector
  must keep some of them (a selector that ranks at random still keeps one at gamma 0.5 ~94 % of the time).
* ``big_color`` and ``big_position`` (global): the large shape (circle, square, triangle or star) in
  the left, middle or right third, readable from the global view.

Sizes and layout were chosen by measurement in the miniature (``benchmarks.learning`` prints the probes).
Free-floating type at a random phase against the patches was not learned by the five-task mix: 9-14 px
type is read from pooled crop features at only 0.49-0.62, and 20 px type (pooled crop 0.82, global view
0.29, chance 0.25) reached 0.74 in one of five 700-900-step runs and stayed at chance in the others.
The 9 px block on the patch grid is read from the pooled crops at 0.94-0.97. On the random tower's raw
features it is not learned in the five-task mix: every variant stays at chance while the training prints
are memorised (five tasks up to 1,000 steps, fine print x3 in the batches, the compressor frozen, local
tokens only, lr 2e-3), although fine-print questions alone reach 0.997 in 300 steps. With the features
standardised per dimension (``benchmarks.learning``'s default) the mix learns it: 0.99-1.00 at gamma 1.0
and 0.75 on seeds 0 and 1 (README table); the raw feature scales swamp the glyph signal under the colours.
13 px type on the grid was learned too, but leaks into the global view (probe 0.78).
With all three details in one image the two checkerboards competed (pooled-crop probe on a 34-45 px square:
0.43 beside a texture area, 0.97 alone).

Whether a task is really absent from the global view is measured, not assumed: ``benchmarks.learning``
fits a probe on the global view's features and prints its accuracy next to chance.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

from pipelines.data.drawing import draw_shape, font

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


def _place(rng: random.Random, boxes: list, width: int, height: int, w: int, h: int, margin: int,
           grid: int = 1) -> tuple:
    """A free box of w x h anywhere (its corner on multiples of ``grid``), appended to ``boxes``."""
    for _ in range(500):
        x = grid * rng.randint(-(-margin // grid), (width - margin - w) // grid)
        y = grid * rng.randint(-(-margin // grid), (height - margin - h) // grid)
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


def _print_cover(digit: str, cell: int, type_px: int, cols: int, rows: int) -> np.ndarray:
    """[rows*cell, cols*cell] glyph coverage in [0, 1]: ``digit`` centred in every cell."""
    mask = Image.new("L", (cols * cell, rows * cell), 0)
    draw, face = ImageDraw.Draw(mask), font(type_px)
    for r in range(rows):
        for c in range(cols):
            draw.text((c * cell + cell / 2, r * cell + cell / 2), digit, fill=255, font=face, anchor="mm")
    return np.asarray(mask, np.float32) / 255.0


def render_fidelity_image(rng: random.Random, tile: int = 112,
                          details: tuple[str, ...] = LOCAL_TASKS) -> tuple[Image.Image, dict]:
    """One 3*tile x 2*tile image and the facts drawn on it. Deterministic in ``rng``.

    Every image carries the big shape and exactly one fine detail, drawn from ``details``: a texture
    area, a fine-print block or a small checkered square. One detail per image keeps the answer of a
    detail question unambiguous (a small square next to a texture area of the same kind of checkerboard
    would ask the model which of the two is meant, a test of counting, not of resolution)."""
    width, height = 3 * tile, 2 * tile
    nrng = np.random.default_rng(rng.getrandbits(64))
    canvas = 128 + nrng.normal(0, 12, (height, width, 3)).astype(np.float32)
    boxes: list = []
    margin = max(2, tile // 28)
    detail = rng.choice(details)
    facts: dict = {"width": width, "height": height, "tile": tile, "detail": detail}

    # The big shape gets its own tile column; the detail goes in another column or anywhere there is room.
    col_big, col_detail = rng.sample(range(3), 2)
    big = round(tile * rng.uniform(0.75, 0.9))
    big_box = _in_column(rng, boxes, col_big, tile, big, big, margin)
    if detail == "texture":
        tw, th = round(tile * rng.uniform(0.7, 0.9)), round(tile * rng.uniform(0.6, 0.8))
        box = _in_column(rng, boxes, col_detail, tile, tw, th, margin)
        facts.update(texture=rng.choice(tuple(PAIRS)), texture_box=box)
        canvas[box[1]:box[3], box[0]:box[2]] = _checker(tw, th, facts["texture"])
    elif detail == "small_object":
        small = max(8, round(tile * rng.uniform(0.35, 0.5)))  # 39-56 px at tile 112: <= 4 % of the image
        box = _place(rng, boxes, width, height, small, small, margin)
        facts.update(small_object=rng.choice(tuple(PAIRS)), small_box=box)
        canvas[box[1]:box[3], box[0]:box[2]] = _checker(small, small, facts["small_object"])

    img = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    big_color, big_shape = rng.choice(tuple(BIG_COLORS)), rng.choice(BIG_SHAPES)
    draw_shape(draw, big_shape, big_box, BIG_COLORS[big_color])
    if detail == "fine_print":
        digit = rng.choice(PRINT_DIGITS)
        # Fine print on the crops' patch grid: one 9 px glyph centred in each 14 px tower patch (at tile 112),
        # a 5 x 4 block whose corner sits on the grid. Off-grid type (random phase against the patches) was
        # not learned by the frozen random tower of the miniature (see the module docstring).
        cell, type_px = tile // 8, max(5, round(tile * 0.08))
        cols, rows = 5, 4
        box = _place(rng, boxes, width, height, cols * cell, rows * cell, margin, grid=cell)
        cover = _print_cover(digit, cell, type_px, cols, rows)  # glyph coverage per pixel
        # The ink makes the block's mean darkness a random amount that is the same for every digit ("1" has
        # less ink than "0"), so only the glyphs' shapes tell them apart: at most what the sparsest digit
        # reaches in black ink.
        sparsest = min(_print_cover(d, cell, type_px, cols, rows).mean() for d in PRINT_DIGITS)
        dark = rng.uniform(0.5, 0.95) * 128 * sparsest
        ink = 128 - dark / max(float(cover.mean()), 1e-3)
        region = np.asarray(img, np.float32)[box[1]:box[3], box[0]:box[2]]
        region = region * (1 - cover[..., None]) + ink * cover[..., None]
        img.paste(Image.fromarray(np.clip(region, 0, 255).round().astype(np.uint8), "RGB"), (box[0], box[1]))
        facts.update(fine_print=digit, print_box=box, type_px=type_px)
    facts.update(big_color=big_color, big_shape=big_shape, big_box=big_box, big_position=POSITIONS[col_big])
    return img, facts


def fidelity_questions(facts: dict, tasks: tuple[str, ...] = TASKS) -> dict[str, tuple[str, str, str]]:
    """task -> (qtype, question, short answer); qtype "detail" for local tasks, "global" otherwise."""
    return {t: ("detail" if t in LOCAL_TASKS else "global", QUESTIONS[t], str(facts[t])) for t in tasks if t in facts}


def fidelity_caption(facts: dict) -> str:
    detail = {"texture": lambda: f"a fine {facts['texture']} checkered area",
              "fine_print": lambda: f"fine print of the digit {facts['fine_print']}",
              "small_object": lambda: f"a small {facts['small_object']} checkered square"}[facts["detail"]]()
    return f"A {facts['big_color']} {facts['big_shape']} and {detail} on grey."
