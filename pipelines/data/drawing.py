"""Drawing primitives shared by the synthetic data generators (pipelines.data.synth and synth_tasks)."""

from __future__ import annotations

import math

from PIL import ImageDraw, ImageFont


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # bundled Aileron TTF; needs FreeType, no download
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()  # bitmap fallback: fixed ~11 px glyphs


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # five-pointed star: 10 vertices alternating outer and inner radius
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=fill)
