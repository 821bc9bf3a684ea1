"""Local branch: QueryCompressor, raster re-layout across crops, TextGuidedSelector (count, order,
fp32 scoring, nucleus slots) and no answer leakage into the selection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slime.config import ConnectorConfig, LocalConfig, replace
from slime.connectors import DenseConnector, MLPProjector, Resampler
from slime.local import QueryCompressor, TextGuidedSelector, raster_layout
from slime.presets import tiny


def test_query_compressor_shapes():
    cfg = tiny()
    dc = DenseConnector(ConnectorConfig(kind="mlp"), cfg.vision)
    comp = QueryCompressor(Resampler(4, 32, 2, dc.positions))
    out = comp(torch.randn(5, dc.num_tokens, 32), MLPProjector(32, 64))
    assert out.shape == (5, 4, 64)  # [n, Q, D]


@pytest.mark.parametrize(("cols", "rows"), [(3, 2), (1, 2), (7, 1), (1, 1)])
def test_raster_layout_reads_row_by_row_across_crops(cols, rows):
    q = 3  # 3 x 3 queries per crop
    # token value = (crop, query row, query col): crops are row-major, queries raster within a crop
    ids = torch.tensor([[[c, i // q, i % q] for i in range(q * q)] for c in range(cols * rows)], dtype=torch.float32)
    flat = raster_layout(ids, cols, rows)  # [n*Q, 3]
    assert flat.shape == (cols * rows * q * q, 3)
    expected = [[(y // q) * cols + x // q, y % q, x % q] for y in range(rows * q) for x in range(cols * q)]
    assert flat.tolist() == expected
    with pytest.raises(ValueError, match="grid"):
        raster_layout(ids, cols + 1, rows)


def planted(num_local=20, num_text=3, dim=64, where=(2, 9, 17), seed=0):
    """Random local tokens with a few planted ones parallel to the mean text direction (highest mean cosine)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_local, dim, generator=g)
    text = torch.randn(num_text, dim, generator=g)
    direction = F.normalize(text, dim=-1).sum(0)
    for scale, i in zip((0.5, 3.0, 1.0), where):
        tokens[i] = scale * direction
    return tokens, text, list(where)


def test_selector_keeps_planted_tokens_in_order():
    tokens, text, where = planted()
    sel = TextGuidedSelector(LocalConfig(num_queries=4)).eval()
    kept, valid = sel(tokens, text, gamma=0.15)  # ceil(0.15 * 20) = 3
    assert kept.shape == (3, 64) and valid.all()
    assert torch.equal(kept, tokens[where])  # exactly the planted ones, original order
    # tokens equal to a text embedding also win (cosine 1 with it)
    tokens[5] = text[1]
    kept, _ = sel(tokens, text, gamma=0.2)  # 4 kept
    assert torch.equal(kept, tokens[[2, 5, 9, 17]])


@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.75, 0.5, 0.3, 0.01])
def test_selector_count_follows_gamma(gamma):
    tokens, text, _ = planted(num_local=144 * 6, dim=32)
    kept, valid = TextGuidedSelector(LocalConfig(num_queries=144)).eval()(tokens, text, gamma)
    assert kept.shape[0] == valid.shape[0] == max(1, math.ceil(round(gamma * 864, 6)))
    if gamma == 0.75:
        assert kept.shape[0] == 648
    # order preserved: kept rows appear in tokens in increasing index order
    idx = [int((tokens == row).all(-1).nonzero()[0]) for row in kept]
    assert idx == sorted(idx)


def test_selector_without_instruction_keeps_evenly_spaced():
    tokens = torch.arange(10.0)[:, None].repeat(1, 4)
    kept, valid = TextGuidedSelector(LocalConfig(num_queries=4)).eval()(tokens, tokens[:0], gamma=0.5)
    assert kept[:, 0].tolist() == [0.0, 2.0, 4.0, 7.0, 9.0] and valid.all()


@pytest.mark.parametrize("noise", ["relative", "absolute"])
def test_selector_without_instruction_selects_in_training_as_in_evaluation(noise):
    """No instruction tokens (plain template): every score ties at 0; training must not keep an arbitrary
    (relative noise 0.1 x std(0) = 0, topk over ties) or random (absolute noise) set."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(36, 8, generator=g)
    sel = TextGuidedSelector(LocalConfig(num_queries=4, noise=noise))
    expected = sel.eval().select(tokens, tokens[:0], 0.5)[0].tolist()
    assert expected == torch.linspace(0, 35, 18).round().long().tolist()
    sel.train()
    for seed in range(5):
        torch.manual_seed(seed)
        assert sel.select(tokens, tokens[:0], 0.5)[0].tolist() == expected


def test_nucleus_returns_l_slots_with_mask():
    tokens, text, where = planted(num_local=20)
    sel = TextGuidedSelector(LocalConfig(num_queries=4, selection="nucleus", temperature=0.05)).eval()
    out, valid = sel(tokens, text, gamma=0.9)
    assert out.shape == (20, 64) and valid.shape == (20,) and valid.dtype == torch.bool
    n = int(valid.sum())
    assert 1 <= n < 20 and valid[:n].all() and not valid[n:].any()  # valid prefix, then unused slots
    assert (out[n:] == 0).all()
    assert set(where) <= {int((tokens == row).all(-1).nonzero()[0]) for row in out[:n]}
    idx = [int((tokens == row).all(-1).nonzero()[0]) for row in out[:n]]
    assert idx == sorted(idx)
    full, full_valid = sel(tokens, text, gamma=1.0)
    assert full_valid.sum() >= n


def test_scores_fp32_and_bf16_inputs():
    tokens, text, where = planted(num_local=40, dim=64)
    sel = TextGuidedSelector(LocalConfig(num_queries=4)).eval()
    s = sel.scores(tokens.bfloat16(), text.bfloat16())
    assert s.dtype == torch.float32 and s.shape == (40,)
    ref = F.cosine_similarity(tokens[:, None], text[None], dim=-1).mean(-1)
    torch.testing.assert_close(sel.scores(tokens, text), ref, rtol=1e-5, atol=1e-5)
    kept, _ = sel(tokens.bfloat16(), text.bfloat16(), gamma=3 / 40)
    assert kept.dtype == torch.bfloat16 and torch.equal(kept, tokens.bfloat16()[where])


def test_scores_never_materialise_l_t_d():
    """Pitfall C8: broadcasting cosine_similarity builds an [L, T, D] tensor (GBs at real sizes)."""
    num_local, num_text, dim = 864, 256, 512
    tokens, text = torch.randn(num_local, dim), torch.randn(num_text, dim)
    sel = TextGuidedSelector(LocalConfig(num_queries=144)).eval()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        sel(tokens, text, gamma=0.5)
    peak = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < peak < num_local * num_text * dim * 4 / 8  # largest single allocation is [L, D] / [L, T]


def test_selection_noise_only_in_training():
    tokens, text, _ = planted(num_local=200, dim=32)
    sel = TextGuidedSelector(LocalConfig(num_queries=4, noise_std=0.5))
    sel.eval()
    a, _ = sel(tokens, text, 0.5)
    assert torch.equal(a, sel(tokens, text, 0.5)[0])
    sel.train()
    torch.manual_seed(0)
    b, _ = sel(tokens, text, 0.5)
    assert b.shape == a.shape and not torch.equal(a, b)


# ------------------------------------------------------------------ no answer leakage (through the model)


@pytest.fixture(scope="module")
def tiny_model():
    from slime.presets import build_tiny

    cfg = replace(tiny(), local=LocalConfig(num_queries=4, num_heads=2, gamma=0.5))
    model, tok = build_tiny(0, cfg)
    return model.eval(), tok


def test_only_instruction_tokens_steer_selection(tiny_model):
    from slime.tiling import count_visual_tokens

    model, tok = tiny_model
    cfg = model.cfg
    budget = count_visual_tokens(640, 480, cfg)  # 2 x 2 crops, 16 local tokens, 8 kept
    m = cfg.tiling.max_tiles
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.zeros(1, m, 3, 56, 56)
    pixel_values[0, : 1 + budget.crops] = torch.randn(1 + budget.crops, 3, 56, 56, generator=g)
    tile_mask = torch.zeros(1, m, dtype=torch.bool)
    tile_mask[0, : 1 + budget.crops] = True
    question = torch.randint(20, 600, (12,), generator=g)
    answer = torch.randint(20, 600, (10,), generator=g)

    def visual(question, answer):
        ids = torch.cat([torch.full((budget.total_tokens,), model.image_token_id), question, answer])[None]
        instr = torch.zeros_like(ids, dtype=torch.bool)
        instr[0, budget.total_tokens: budget.total_tokens + len(question)] = True
        embeds, *_ = model.prepare_inputs(ids, torch.ones_like(ids), pixel_values, tile_mask,
                                          torch.tensor([list(budget.grid)]), instr, torch.tensor([True]))
        return embeds[0, : budget.total_tokens]

    base = visual(question, answer)
    assert torch.equal(base, visual(question, torch.randint(20, 600, (10,), generator=g)))
    changed = [not torch.equal(base, visual(torch.randint(20, 600, (12,), generator=g), answer)) for _ in range(5)]
    assert any(changed)  # the instruction does steer it (so the check above could fail)


# ------------------------------------------------------------------ training-mode selection keeps what is relevant


def relevant_tokens(num_local=96, num_text=20, dim=128, num_relevant=8, lift=2.5, seed=0):
    """Random local tokens whose mean cosine to the text has the small spread of an untrained model,
    plus ``num_relevant`` tokens lifted ``lift`` spreads above the rest along the mean text direction."""
    g = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(num_local, dim, generator=g), dim=-1)
    text = torch.randn(num_text, dim, generator=g)
    where = torch.randperm(num_local, generator=g)[:num_relevant]
    spread = float(TextGuidedSelector(LocalConfig(num_queries=16)).scores(tokens, text).std())
    mean_text = F.normalize(text, dim=-1).mean(0)  # mean cosine of v = v/|v| . mean_text
    tokens[where] += lift * spread * mean_text / mean_text.norm().square()
    return tokens, text, set(where.tolist())


def survival(cfg: LocalConfig, tokens, text, where, gamma=0.5, draws=200) -> float:
    sel = TextGuidedSelector(cfg).train()
    torch.manual_seed(0)
    kept = 0
    for _ in range(draws):
        out, _ = sel(tokens, text, gamma)
        kept += sum(int((tokens[i] == out).all(-1).any()) for i in where)
    return kept / (draws * len(where))


def test_training_selection_keeps_planted_tokens_at_gamma_half():
    tokens, text, where = relevant_tokens()
    sel = TextGuidedSelector(LocalConfig(num_queries=16))
    s = sel.scores(tokens, text)
    rest = torch.tensor([i not in where for i in range(len(s))])
    assert s[rest].std() < 0.05  # the regime of an untrained model: scores spread over a few hundredths
    assert min(s[list(where)]) > s[rest].quantile(0.5)  # noiseless top-half keeps every planted token
    default = survival(LocalConfig(num_queries=16), tokens, text, where)
    upstream = survival(LocalConfig(num_queries=16, score="sum", noise="absolute"), tokens, text, where)
    broken = survival(LocalConfig(num_queries=16, score="mean", noise="absolute"), tokens, text, where)
    assert default > 0.97 and upstream > 0.9  # chance (random half) is 0.5
    assert broken < 0.75  # mean cosine + absolute sigma 0.1: noise swamps the ranking (what issue 10 found)


def test_relative_noise_is_scale_free():
    tokens, text, where = relevant_tokens(seed=1)
    a = survival(LocalConfig(num_queries=16, noise_std=0.5), tokens, text, where, draws=50)
    b = survival(LocalConfig(num_queries=16, noise_std=0.5, score="sum"), tokens, text, where, draws=50)
    assert a == pytest.approx(b, abs=0.02)  # sum = T * mean: the same ranking, the same relative noise


# ------------------------------------------------------------------ the compressor keeps where things are


def _compressor(kind: str, num_queries=16, dim=64, side=8, seed=0) -> Resampler:
    from slime.connectors import patch_positions
    from slime.local import LOCALITY

    torch.manual_seed(seed)
    return Resampler(num_queries, dim, 4, patch_positions(side), locality=LOCALITY if kind == "local" else None)


def effective_keys(weights: torch.Tensor) -> float:
    """exp(entropy) of each query's attention, averaged: 64 = a mean-pool over an 8x8 crop."""
    return float((-(weights * weights.clamp_min(1e-12).log()).sum(-1)).exp().mean())


def test_local_compressor_starts_on_its_own_cell():
    x = torch.randn(4, 64, 64)
    local, upstream = _compressor("local"), _compressor("upstream")
    w_local, w_up = local.attention(x), upstream.attention(x)  # [M, Q, N]
    # query (i, j) of the 4x4 grid owns patches (2i..2i+1, 2j..2j+1) of the 8x8 grid
    own = torch.zeros(16, 64, dtype=torch.bool)
    for q in range(16):
        for k in range(64):
            own[q, k] = (k // 8) // 2 == q // 4 and (k % 8) // 2 == q % 4
    assert float((w_local * own).sum(-1).mean()) > 0.8 and effective_keys(w_local) < 8
    assert float((w_up * own).sum(-1).mean()) < 0.2 and effective_keys(w_up) > 40  # upstream init: a mean-pool


@pytest.mark.parametrize(("kind", "lo", "hi"), [("local", 0.65, 1.01), ("upstream", 0.0, 0.4)])
def test_small_detail_survives_compression(kind, lo, hi):
    """A one-patch detail (one of 4 classes) at a random place in a noisy crop: a nearest-centroid probe on
    the compressed token covering that patch reads the class (chance 0.25) only if the queries are local."""
    comp = _compressor(kind)
    g = torch.Generator().manual_seed(1)
    classes = torch.randn(4, 64, generator=g)

    def sample(n):
        x = torch.randn(n, 64, 64, generator=g)
        y = torch.randint(0, 4, (n,), generator=g)
        where = torch.randint(0, 64, (n,), generator=g)
        x[torch.arange(n), where] += 1.5 * classes[y]
        q = (where // 8) // 2 * 4 + (where % 8) // 2  # the query whose cell holds the detail
        with torch.no_grad():
            return comp(x)[torch.arange(n), q], y

    xt, yt = sample(400)
    xv, yv = sample(400)
    centroids = torch.stack([xt[yt == c].mean(0) for c in range(4)])
    acc = float(((xv[:, None] - centroids[None]).norm(dim=-1).argmin(-1) == yv).float().mean())
    assert lo <= acc < hi, acc
