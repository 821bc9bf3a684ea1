"""Any-resolution slicing and THE visual-token contract (SliME MODEL_SPEC A1, Dense Connector B2).

``count_visual_tokens`` is the one function that says how many visual tokens an image becomes for a
model config, a kept fraction gamma and a visual mode. The processor expands ``<image>`` with it and
the model checks what it produces against it.

Shape legend: S tile side (vision image_size) · n local crops · cols x rows grid (n = cols*rows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from slime.config import ModelConfig, TilingConfig, VisualMode


def _candidates_area(width: int, height: int, tile: int, tiling: TilingConfig) -> list[tuple[int, int]]:
    """Released code (``select_best_resolution_uhd``): r = ceil(area / tile^2) clamped to
    [min_crops, max_crops - 1], counts {r, r+1} (r <= 2) or {r-1, r, r+1}, every factorisation."""
    r = math.ceil(width * height / (tile * tile))
    r = min(max(r, tiling.min_crops), tiling.max_crops - 1)
    counts = [r, r + 1] if r <= 2 else [r - 1, r, r + 1]
    out = []
    for c in counts:
        if not tiling.min_crops <= c <= tiling.max_crops:
            continue
        out += [(w, c // w) for w in range(1, c + 1) if c % w == 0]
    return out


def _candidates_grid(tiling: TilingConfig) -> list[tuple[int, int]]:
    """Paper's search: every m x n grid with 1 <= m, n <= max_grid."""
    return [(w, h) for h in range(1, tiling.max_grid + 1) for w in range(1, tiling.max_grid + 1)]


def select_grid(width: int, height: int, tile: int, tiling: TilingConfig) -> tuple[int, int]:
    """(cols, rows) of local crops: largest effective resolution, then least waste, then first."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    cands = _candidates_area(width, height, tile, tiling) if tiling.kind == "area" else _candidates_grid(tiling)
    best, best_eff, best_waste = cands[0], -1, math.inf
    for cols, rows in cands:
        cw, ch = cols * tile, rows * tile
        scale = min(cw / width, ch / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cols, rows), eff, waste
    return best


@dataclass(frozen=True)
class VisualTokenBudget:
    grid: tuple[int, int]  # (cols, rows)
    crops: int
    global_tokens: int
    separator_tokens: int
    local_tokens: int  # before selection
    kept_local_tokens: int  # after selection (slots, for the nucleus rule)
    total_tokens: int

    def as_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d


def feature_tokens_per_tile(cfg: ModelConfig) -> int:
    """Tokens the Dense Connector hands on per tile: P (mlp/sci/dci) or P + extras*floor(P/pool) (sti)."""
    p = cfg.vision.num_patches
    if cfg.connector.kind == "sti":
        return p + len(cfg.connector.extra_layers) * (p // cfg.connector.sti_pool)
    return p


def kept_count(num_local: int, gamma: float, selection: str = "topk") -> int:
    """Local tokens kept by the selector. topk: ceil(gamma * L); nucleus: L slots (unused ones masked)."""
    if num_local == 0:
        return 0
    if selection == "nucleus":
        return num_local
    # round() first: 0.7 * 10 is 7.000000000000001 in floating point and must stay 7.
    return max(1, min(num_local, math.ceil(round(gamma * num_local, 6))))


def count_visual_tokens(width: int, height: int, cfg: ModelConfig, gamma: float | None = None,
                        mode: VisualMode = "both") -> VisualTokenBudget:
    """How many visual tokens a ``width`` x ``height`` image becomes under ``cfg``."""
    gamma = cfg.local.gamma if gamma is None else gamma
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    cols, rows = select_grid(width, height, cfg.vision.image_size, cfg.tiling)
    crops = cols * rows
    glob = feature_tokens_per_tile(cfg) if mode in ("global", "both") else 0
    local = crops * cfg.local.num_queries if mode in ("local", "both") else 0
    kept = kept_count(local, gamma, cfg.local.selection)
    sep = 1 if mode == "both" else 0
    return VisualTokenBudget((cols, rows), crops, glob, sep, local, kept, glob + sep + kept)


# --------------------------------------------------------------------------- pixels


def _resize_and_pad(img: Image.Image, canvas_w: int, canvas_h: int) -> Image.Image:
    """Aspect-preserving resize onto a black canvas, centred (released ``resize_and_pad_image``)."""
    w, h = img.size
    sw, sh = canvas_w / w, canvas_h / h
    if sw < sh:
        new_w, new_h = canvas_w, min(math.ceil(h * sw), canvas_h)
    else:
        new_h, new_w = canvas_h, min(math.ceil(w * sh), canvas_w)
    resized = img.resize((new_w, new_h), Image.BICUBIC)
    canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
    canvas.paste(resized, ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2))
    return canvas


def _global_view(img: Image.Image, side: int, kind: str, pad_color: tuple[int, int, int]) -> Image.Image:
    if kind == "pad":  # the paper's padded view: square-pad with the mean colour, then resize
        w, h = img.size
        s = max(w, h)
        square = Image.new("RGB", (s, s), pad_color)
        square.paste(img, ((s - w) // 2, (s - h) // 2))
        img = square
    return img.resize((side, side), Image.BICUBIC)  # released code: stretch, no padding


def tile_image(img: Image.Image, cfg: ModelConfig,
               pad_color: tuple[int, int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Image -> uint8 tiles [1+n, S, S, 3] (index 0 = global view, then crops in row-major order).
    A padded global view uses the tower's mean colour (upstream ``expand2square(image_mean * 255)``)."""
    if pad_color is None:
        pad_color = (127, 127, 127) if cfg.vision.kind == "siglip" else (122, 116, 104)
    side = cfg.vision.image_size
    img = img.convert("RGB")
    cols, rows = select_grid(img.width, img.height, side, cfg.tiling)
    canvas = _resize_and_pad(img, cols * side, rows * side)
    tiles = [np.asarray(_global_view(img, side, cfg.tiling.global_view, pad_color))]
    arr = np.asarray(canvas)
    for r in range(rows):
        for c in range(cols):
            tiles.append(arr[r * side:(r + 1) * side, c * side:(c + 1) * side])
    return np.stack(tiles), (cols, rows)
