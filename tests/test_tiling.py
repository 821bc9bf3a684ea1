"""The visual-token contract (slime.tiling): grid choice, token counts per mode/gamma, tiles on disk."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from slime.config import ConnectorConfig, LocalConfig, TilingConfig, VisionConfig, replace
from slime.presets import preset, tiny
from slime.tiling import count_visual_tokens, kept_count, select_grid, tile_image

CLIP_L = replace(preset("slime-7b"), local=LocalConfig(num_queries=144, num_heads=8, gamma=1.0))
SIGLIP_SO400M = VisionConfig(kind="siglip", image_size=384, patch_size=14, hidden_dim=1152, intermediate_dim=4304,
                             num_layers=26, num_heads=16, select_layer=-1)

# MODEL_SPEC A1 worked examples (CLIP-L/336, gamma 1): size -> (grid (cols, rows), crops, local, max visual)
A1_TABLE = {
    (224, 224): ((1, 2), 2, 288, 865),
    (336, 336): ((1, 2), 2, 288, 865),
    (500, 375): ((2, 1), 2, 288, 865),
    (640, 480): ((2, 2), 4, 576, 1153),
    (800, 600): ((3, 2), 6, 864, 1441),
    (3000, 2000): ((3, 2), 6, 864, 1441),
    (1920, 1080): ((3, 2), 6, 864, 1441),
    (1024, 768): ((3, 2), 6, 864, 1441),
    (1008, 1008): ((2, 3), 6, 864, 1441),
    (1344, 1344): ((2, 3), 6, 864, 1441),
    (2000, 500): ((5, 1), 5, 720, 1297),
    (4000, 300): ((7, 1), 7, 1008, 1585),
}

# ~30 sizes: tiny, square, portrait, landscape, extreme aspect ratios both ways, odd sizes.
SIZES = [(1, 1), (7, 3), (64, 64), (224, 224), (336, 336), (337, 335), (500, 375), (375, 500), (640, 480),
         (480, 640), (800, 600), (1024, 768), (1280, 720), (720, 1280), (1920, 1080), (1080, 1920), (2000, 500),
         (500, 2000), (4000, 300), (300, 4000), (5000, 50), (50, 5000), (8000, 8), (10, 3000), (1008, 1008),
         (1344, 1344), (2048, 2048), (3000, 2000), (999, 333), (1601, 401), (4032, 3024)]


def score(width: int, height: int, grid: tuple[int, int], tile: int) -> tuple[int, int]:
    """(effective pixels, -wasted pixels) of a cols x rows canvas (MODEL_SPEC A1 step 3): higher is better."""
    cw, ch = grid[0] * tile, grid[1] * tile
    s = min(cw / width, ch / height)
    eff = min(math.floor(width * s) * math.floor(height * s), width * height)
    return eff, eff - cw * ch


def allowed_grids(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    """MODEL_SPEC A1 steps 1-2: r = ceil(area / tile^2) clamped to 2..6; counts r-1..r+1 within 2..7."""
    r = min(max(math.ceil(width * height / tile**2), 2), 6)
    return [(c, n // c) for n in range(max(2, r - 1), r + 2) for c in range(1, n + 1) if n % c == 0]


@pytest.mark.parametrize(("size", "expected"), list(A1_TABLE.items()), ids=lambda v: str(v))
def test_model_spec_a1_worked_examples(size, expected):
    grid, crops, local, total = expected
    b = count_visual_tokens(*size, CLIP_L)
    assert (b.grid, b.crops, b.local_tokens, b.total_tokens) == (grid, crops, local, total)
    assert (b.global_tokens, b.separator_tokens, b.kept_local_tokens) == (576, 1, local)
    assert b.total_tokens == 576 + 1 + 144 * crops
    assert b.as_dict()["grid"] == list(grid)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_token_contract_over_sizes(size):
    w, h = size
    tile = CLIP_L.vision.image_size
    cols, rows = select_grid(w, h, tile, CLIP_L.tiling)
    assert 2 <= cols * rows <= 7  # released rule: every image gets 2..7 crops
    # largest effective area among the allowed canvases, then least waste
    candidates = allowed_grids(w, h, tile)
    assert (cols, rows) in candidates
    assert score(w, h, (cols, rows), tile) == max(score(w, h, g, tile) for g in candidates)
    for gamma in (1.0, 0.75, 0.5):
        both = count_visual_tokens(w, h, CLIP_L, gamma=gamma, mode="both")
        glob = count_visual_tokens(w, h, CLIP_L, gamma=gamma, mode="global")
        loc = count_visual_tokens(w, h, CLIP_L, gamma=gamma, mode="local")
        kept = math.ceil(gamma * 144 * cols * rows)
        assert both.total_tokens == 576 + 1 + kept
        assert (glob.total_tokens, glob.local_tokens, glob.separator_tokens) == (576, 0, 0)
        assert (loc.total_tokens, loc.global_tokens, loc.separator_tokens) == (kept, 0, 0)
        assert both.grid == glob.grid == loc.grid == (cols, rows)


@pytest.mark.parametrize(("size", "gamma", "kept"), [((1920, 1080), 0.75, 648), ((1920, 1080), 0.5, 432),
                                                     ((640, 480), 0.75, 432), ((2000, 500), 0.75, 540),
                                                     ((4000, 300), 0.5, 504), ((336, 336), 0.95, 274)])
def test_gamma_keeps_ceil_gamma_l(size, gamma, kept):
    b = count_visual_tokens(*size, CLIP_L, gamma=gamma)
    assert b.kept_local_tokens == kept == math.ceil(gamma * b.local_tokens)
    assert b.total_tokens == 577 + kept


def test_kept_count_edges():
    assert kept_count(10, 0.7) == 7  # 0.7 * 10 = 7.000000000000001 in floating point
    assert kept_count(864, 0.75) == 648
    assert kept_count(3, 0.01) == 1  # never zero
    assert kept_count(0, 0.5) == 0
    assert kept_count(864, 0.5, "nucleus") == 864  # nucleus keeps L slots; unused ones are masked
    nucleus = replace(CLIP_L, local=replace(CLIP_L.local, selection="nucleus"))
    assert count_visual_tokens(1920, 1080, nucleus, gamma=0.5).total_tokens == 1441


def test_gamma_defaults_to_config_and_is_validated():
    cfg = replace(CLIP_L, local=replace(CLIP_L.local, gamma=0.75))
    assert count_visual_tokens(1920, 1080, cfg).kept_local_tokens == 648
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="gamma"):
            count_visual_tokens(1920, 1080, cfg, gamma=bad)
    with pytest.raises(ValueError, match="positive"):
        count_visual_tokens(0, 10, cfg)


def test_sti_token_counts():
    """Dense Connector STI appends floor(P/8) pooled tokens per extra layer: 720 (CLIP-L), 911 (SigLIP)."""
    sti = ConnectorConfig(kind="sti", extra_layers=(7, 15), sti_pool=8)
    clip = replace(CLIP_L, connector=sti)
    assert count_visual_tokens(1920, 1080, clip, mode="global").total_tokens == 720
    assert count_visual_tokens(1920, 1080, clip).total_tokens == 720 + 1 + 864
    sig = replace(CLIP_L, connector=sti, vision=SIGLIP_SO400M)
    assert SIGLIP_SO400M.num_patches == 729
    assert count_visual_tokens(640, 480, sig, mode="global").total_tokens == 911
    for kind in ("sci", "dci"):  # channel fusion keeps the token count
        assert count_visual_tokens(640, 480, replace(sig, connector=ConnectorConfig(kind=kind)),
                                   mode="global").total_tokens == 729


def test_grid_search_mode():
    """Paper rule: any m x n with m, n <= max_grid; the area rule's 2..7 crop bounds do not apply."""
    cfg = replace(CLIP_L, tiling=TilingConfig(kind="grid", max_grid=6))
    assert cfg.tiling.max_tiles == 37
    assert select_grid(336, 336, 336, cfg.tiling) == (1, 1)
    assert select_grid(672, 336, 336, cfg.tiling) == (2, 1)
    assert select_grid(2016, 2016, 336, cfg.tiling) == (6, 6)
    assert select_grid(4000, 300, 336, cfg.tiling) == (6, 1)  # capped at max_grid columns
    assert count_visual_tokens(2016, 2016, cfg, gamma=1.0).total_tokens == 577 + 36 * 144
    for w, h in SIZES:
        cols, rows = select_grid(w, h, 336, cfg.tiling)
        assert 1 <= cols <= 6 and 1 <= rows <= 6


def test_tile_image_shapes_order_and_padding():
    cfg = tiny()  # S = 56
    s = cfg.vision.image_size
    # A 2:1 image split in two halves of distinct colours lands exactly on a 2 x 1 canvas.
    img = Image.new("RGB", (2 * s, s), (255, 0, 0))
    img.paste((0, 0, 255), (s, 0, 2 * s, s))
    tiles, grid = tile_image(img, cfg)
    assert grid == (2, 1) and tiles.shape == (3, s, s, 3) and tiles.dtype == np.uint8
    assert (tiles[1] == (255, 0, 0)).all() and (tiles[2] == (0, 0, 255)).all()  # row-major crops
    # Global view is a stretch of the whole image (no padding): left half red, right half blue.
    assert (tiles[0][:, : s // 2 - 2] == (255, 0, 0)).all() and (tiles[0][:, s // 2 + 2:] == (0, 0, 255)).all()


@pytest.mark.parametrize("size", [(56, 56), (100, 80), (30, 400), (400, 30), (1000, 700)])
def test_tile_image_count_matches_contract(size):
    cfg = tiny()
    tiles, grid = tile_image(Image.new("RGB", size, "white"), cfg)
    b = count_visual_tokens(*size, cfg)
    assert grid == b.grid and tiles.shape == (1 + b.crops, 56, 56, 3)


def test_local_canvas_is_black_padded_and_centred():
    cfg = tiny()
    s = cfg.vision.image_size
    tiles, grid = tile_image(Image.new("RGB", (s, s), (255, 255, 255)), cfg)  # square -> 1 x 2 canvas
    assert grid == (1, 2)
    canvas = np.concatenate([tiles[1], tiles[2]], axis=0)  # [2S, S, 3]
    white = (canvas == 255).all(-1)
    rows_white = np.flatnonzero(white.all(1))
    assert (canvas[~white] == 0).all()  # padding is black
    assert rows_white.min() == s // 2 and rows_white.max() == s // 2 + s - 1  # upscaled to S x S, centred
    assert (tiles[0] == 255).all()  # global view of a square image is the image itself


def test_global_view_pad_mode_keeps_aspect():
    cfg = replace(tiny(), tiling=TilingConfig(global_view="pad"))
    s = cfg.vision.image_size
    tiles, _ = tile_image(Image.new("RGB", (4 * s, s), (255, 255, 255)), cfg, pad_color=(10, 20, 30))
    g = tiles[0]
    assert (g[0, s // 2] == (10, 20, 30)).all() and (g[-1, s // 2] == (10, 20, 30)).all()  # top/bottom bands
    assert (g[s // 2, :] == 255).all()  # the image strip runs across the middle row
