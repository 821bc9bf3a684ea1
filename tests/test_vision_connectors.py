"""VisionTower layer conventions, Dense Connector layer choice, MLP parity with transformers, MoA gate."""

from __future__ import annotations

import pytest
import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaNextConfig, SiglipVisionConfig,
                          SiglipVisionModel)
from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

from slime.config import ConnectorConfig, VisionConfig
from slime.connectors import DenseConnector, MixtureOfAdapters, MLPProjector, Resampler
from slime.vision import build_vision_tower

# 24 blocks like CLIP-L so the real Dense Connector indices (7, 15, base 23, groups 0-11 / 12-23) apply.
CLIP24 = VisionConfig(kind="clip", image_size=56, patch_size=14, hidden_dim=32, intermediate_dim=64, num_layers=24,
                      num_heads=2, select_layer=-2)
SIGLIP3 = VisionConfig(kind="siglip", image_size=56, patch_size=14, hidden_dim=32, intermediate_dim=64, num_layers=3,
                       num_heads=2, select_layer=-1)
M, P, DV, D = 3, 16, 32, 48  # tiles, patches per tile (4 x 4), vision width, LLM width


@pytest.fixture(scope="module")
def clip_tower():
    torch.manual_seed(0)
    return build_vision_tower(CLIP24)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(M, 3, 56, 56, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def states(clip_tower, pixels):
    return clip_tower(pixels)


def test_clip_tower_returns_all_states_without_cls(clip_tower, pixels, states):
    ref = clip_tower.encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert isinstance(clip_tower.encoder, CLIPVisionModel)
    assert len(states) == len(ref) == 25  # stem + 24 blocks
    for got, want in zip(states, ref):
        assert want.shape == (M, P + 1, DV)
        assert torch.equal(got, want[:, 1:])  # CLS dropped from every layer
    assert CLIP24.base_index == 23


def test_tower_is_frozen_and_stays_in_eval(clip_tower, pixels):
    assert not any(p.requires_grad for p in clip_tower.parameters())
    clip_tower.train()
    assert not clip_tower.training and not clip_tower.encoder.training
    out = clip_tower(pixels.requires_grad_(True))
    assert not out[-1].requires_grad  # no graph is ever built through the tower


def test_siglip_last_block_removed():
    torch.manual_seed(3)
    tower = build_vision_tower(SIGLIP3)
    torch.manual_seed(3)  # same init order as build_vision_tower: the full 4-block model
    full = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                image_size=56, patch_size=14, num_hidden_layers=4)).eval()
    x = torch.randn(2, 3, 56, 56)
    got = tower(x)
    want = full(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(want) == 5 and len(got) == 4 and len(tower.encoder.encoder.layers) == 3
    assert got[0].shape == (2, 16, 32)  # no CLS in SigLIP: every token is kept
    for i in range(4):
        torch.testing.assert_close(got[i], want[i], rtol=0, atol=0)
    assert SIGLIP3.base_index == 3  # hidden_states[-1] of the truncated model


def pool8(x: torch.Tensor) -> torch.Tensor:
    """Hand-written 1-D average over runs of 8 raster-adjacent tokens: [M, P, C] -> [M, P // 8, C]."""
    m, p, c = x.shape
    return x[:, : p // 8 * 8].reshape(m, p // 8, 8, c).mean(2)


def test_sti_layer_choice(states):
    dc = DenseConnector(ConnectorConfig(kind="sti", extra_layers=(7, 15), sti_pool=8), CLIP24)
    out = dc(states)
    want = torch.cat([states[23], pool8(states[7]), pool8(states[15])], dim=1)
    assert out.shape == (M, P + 2 + 2, DV) == (M, dc.num_tokens, dc.out_dim)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, :P], states[23])  # base first, untouched
    assert not torch.allclose(out[:, P:P + 2], pool8(states[23]))  # really layer 7, not the base


def test_sci_layer_choice(states):
    dc = DenseConnector(ConnectorConfig(kind="sci", extra_layers=(7, 15)), CLIP24)
    out = dc(states)
    assert out.shape == (M, P, 3 * DV) and dc.out_dim == 3 * DV and dc.num_tokens == P
    assert torch.equal(out, torch.cat([states[23], states[7], states[15]], dim=-1))


def test_dci_layer_choice(states):
    dc = DenseConnector(ConnectorConfig(kind="dci", dci_groups=2), CLIP24)
    out = dc(states)
    group_a = sum(states[i] for i in range(12)) / 12  # stem + blocks 1-11 (paper layers 1-12)
    group_b = sum(states[i] for i in range(12, 24)) / 12  # blocks 12-23, base included; block 24 never used
    assert out.shape == (M, P, 3 * DV) and dc.out_dim == 3 * DV
    assert torch.equal(out[..., :DV], states[23])
    torch.testing.assert_close(out[..., DV:2 * DV], group_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[..., 2 * DV:], group_b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[..., 2 * DV:], sum(states[i] for i in range(13, 25)) / 12)


def test_mlp_connector_passes_base_through(states):
    dc = DenseConnector(ConnectorConfig(kind="mlp"), CLIP24)
    assert torch.equal(dc(states), states[23]) and dc.out_dim == DV


def test_connector_rejects_bad_layers():
    with pytest.raises(ValueError, match="extra_layers"):
        DenseConnector(ConnectorConfig(kind="sti", extra_layers=(7, 25)), CLIP24)
    with pytest.raises(ValueError, match="dci_groups"):
        DenseConnector(ConnectorConfig(kind="dci", dci_groups=5), CLIP24)


@pytest.mark.parametrize("num_layers", [1, 3])  # 1 = mlp/sti width, 3 = sci/dci width
def test_mlp_projector_matches_llava_next(num_layers):
    layers = -2 if num_layers == 1 else [-2, 7, 15]
    conf = LlavaNextConfig(vision_config=CLIPVisionConfig(hidden_size=DV, num_attention_heads=2).to_dict(),
                           text_config=LlamaConfig(hidden_size=D, num_attention_heads=2).to_dict(),
                           projector_hidden_act="gelu",
                           vision_feature_layer=layers)
    torch.manual_seed(0)
    ref = LlavaNextMultiModalProjector(conf)
    ours = MLPProjector(DV * num_layers, D)
    ours.load_state_dict(ref.state_dict())  # same names: linear_1 / linear_2
    x = torch.randn(M, P, DV * num_layers)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def make_resampler(num_queries: int, dim: int = DV) -> Resampler:
    dc = DenseConnector(ConnectorConfig(kind="mlp"), CLIP24)
    return Resampler(num_queries, dim, 2, dc.positions)


def test_resampler_shapes_and_fixed_tables():
    r = make_resampler(4)
    assert r(torch.randn(M, P, DV)).shape == (M, 4, DV)
    query_pos, key_pos = r.tables()
    assert r.query.shape == (4, DV) and query_pos.shape == (4, DV) and key_pos.shape == (P, DV)
    # upstream's table is a saved, never-trained tensor: it travels with the checkpoint
    assert "pos_embed" in r.state_dict() and not any(n == "pos_embed" for n, _ in r.named_parameters())
    assert r.pos_embed.dtype == torch.int32 and r.float().pos_embed.dtype == torch.int32  # float16 bits, never cast
    with pytest.raises(ValueError, match="divisible"):
        Resampler(4, 30, 4, key_pos.new_zeros(P, 2))


def test_sincos_table_puts_x_first_and_keys_interpolate_the_query_grid():
    from slime.connectors import resize_table, sincos_table

    t = sincos_table(3, 8)  # [9, 8]: x sin/cos (2+2), then y sin/cos (2+2)
    assert torch.equal(t[1, :4], t[4, :4]) and torch.equal(t[1, 4:], t[0, 4:])  # (x=1,y=0) vs (x=1,y=1)
    assert torch.equal(resize_table(t, 3), t)  # same grid: the table itself
    big = resize_table(t, 6)  # key (2i, 2j) and (2i+1, 2j+1) straddle query cell (i, j)
    assert big.shape == (36, 8) and torch.equal(big.half().float(), big)


@pytest.fixture()
def moa():
    torch.manual_seed(0)
    return MixtureOfAdapters(make_resampler(P), DV, gate_noise=True), MLPProjector(DV, D)


def test_moa_gate_starts_at_half(moa):
    adapter, proj = moa
    adapter.eval()
    x = torch.randn(2, P, DV)
    g = adapter.gates(x)
    assert g.shape == (2, P, 2)
    torch.testing.assert_close(g, torch.full_like(g, 0.5 / (1 + 1e-6)), rtol=0, atol=1e-7)  # upstream's 1e-6 guard
    out = adapter(x, proj)
    assert out.shape == (2, P, D)
    torch.testing.assert_close(out, (0.5 * proj(x) + 0.5 * proj(adapter.resampler(x))) / (1 + 1e-6))


def test_moa_forced_experts(moa):
    adapter, proj = moa
    adapter.eval()
    x = torch.randn(2, P, DV)
    assert torch.equal(adapter(x, proj, forced_expert=0), proj(x))
    assert torch.equal(adapter(x, proj, forced_expert=1), proj(adapter.resampler(x)))
    assert not torch.allclose(adapter(x, proj, forced_expert=0), adapter(x, proj, forced_expert=1))
    with pytest.raises(ValueError, match="forced_expert"):
        adapter(x, proj, forced_expert=2)


def test_moa_noise_only_in_training(moa):
    adapter, _ = moa
    x = torch.randn(2, P, DV)
    adapter.train()
    g1, g2 = adapter.gates(x), adapter.gates(x)
    assert not torch.allclose(g1, torch.full_like(g1, 0.5)) and not torch.equal(g1, g2)
    torch.testing.assert_close(g1.sum(-1), torch.ones(2, P))  # 1 - 1e-6
    adapter.eval()
    assert torch.equal(adapter.gates(x), adapter.gates(x))
    quiet = MixtureOfAdapters(make_resampler(P), DV, gate_noise=False).train()
    torch.testing.assert_close(quiet.gates(x), torch.full((2, P, 2), 0.5 / (1 + 1e-6)), rtol=0, atol=1e-7)


def test_moa_gate_gets_gradient(moa):
    adapter, proj = moa
    adapter.eval()
    adapter(torch.randn(2, P, DV), proj).square().sum().backward()
    assert adapter.gate.weight.grad is not None and adapter.gate.weight.grad.abs().sum() > 0
    assert adapter.resampler.query.grad is not None
