"""The real presets at real geometry, built on the meta device (nothing allocated, nothing downloaded):
every tensor a released SliME / Dense Connector checkpoint holds maps onto a tensor of ours of the same
shape, and the token counts are MODEL_SPEC's (A1 table; B2 for Dense Connector on CLIP and SigLIP)."""

from __future__ import annotations

import pytest
import torch

from slime.config import ConnectorConfig, GlobalConfig, VisionConfig, replace
from slime.importer import import_state_dict
from slime.llm import build_llm
from slime.model import build_visual_parts
from slime.presets import preset
from slime.tiling import count_visual_tokens

SIGLIP_SO400M = VisionConfig(kind="siglip", image_size=384, patch_size=14, hidden_dim=1152, intermediate_dim=4304,
                             num_layers=26, num_heads=16, select_layer=-1)


def resampler_keys(prefix: str, queries: int, dv: int) -> dict[str, tuple[int, ...]]:
    """What upstream's Resampler (multimodal_resampler/sampler.py) saves: kv_proj and proj are Identity."""
    return {f"{prefix}.query": (queries, dv), f"{prefix}.pos_embed": (queries, dv),
            f"{prefix}.attn.in_proj_weight": (3 * dv, dv), f"{prefix}.attn.in_proj_bias": (3 * dv,),
            f"{prefix}.attn.out_proj.weight": (dv, dv), f"{prefix}.attn.out_proj.bias": (dv,),
            **{f"{prefix}.{ln}.{p}": (dv,) for ln in ("ln_q", "ln_kv", "ln_post") for p in ("weight", "bias")}}


def slime_visual_release(dv: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The visual tensors of a SliME release (GatedBlock + TextGuidedSampler, MODEL_SPEC A2/A3)."""
    return {"model.mm_projector.projection.0.weight": (hidden, dv), "model.mm_projector.projection.0.bias": (hidden,),
            "model.mm_projector.projection.2.weight": (hidden, hidden), "model.mm_projector.projection.2.bias": (hidden,),
            "model.mm_projector.w_gate": (dv, 2), "model.mm_projector.w_noise": (dv, 2),
            "model.mm_projector.mean": (1,), "model.mm_projector.std": (1,),
            **resampler_keys("model.mm_projector.attn", 576, dv),
            **resampler_keys("model.sampler.post_qformer", 144, dv)}


def llm_release(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> dict[str, tuple[int, ...]]:
    head = hidden // heads
    keys = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in (0, layers - 1):
        p = f"model.layers.{i}"
        keys.update({f"{p}.self_attn.q_proj.weight": (hidden, hidden), f"{p}.self_attn.k_proj.weight": (kv * head, hidden),
                     f"{p}.self_attn.v_proj.weight": (kv * head, hidden), f"{p}.self_attn.o_proj.weight": (hidden, hidden),
                     f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
                     f"{p}.mlp.down_proj.weight": (hidden, inter), f"{p}.input_layernorm.weight": (hidden,),
                     f"{p}.post_attention_layernorm.weight": (hidden,)})
    return keys


CLIP_L_RELEASE = {  # model.vision_tower.vision_tower.vision_model.* of CLIP ViT-L/14-336 (24 blocks)
    "embeddings.class_embedding": (1024,), "embeddings.patch_embedding.weight": (1024, 3, 14, 14),
    "embeddings.position_embedding.weight": (577, 1024), "pre_layrnorm.weight": (1024,),
    "encoder.layers.23.self_attn.q_proj.weight": (1024, 1024), "encoder.layers.23.mlp.fc1.weight": (4096, 1024),
    "post_layernorm.bias": (1024,)}


def our_shapes(cfg, llm_vocab: int | None = None) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        parts = build_visual_parts(cfg, cfg.llm.hidden_dim)
        shapes = {f"{name}.{k}": tuple(v.shape) for name, mod in parts.items() if mod is not None
                  for k, v in mod.state_dict().items()}
        if llm_vocab:
            llm = build_llm(replace(cfg.llm, vocab_size=llm_vocab), llm_vocab)
            shapes.update({f"llm.{k}": tuple(v.shape) for k, v in llm.state_dict().items()})
    return shapes


@pytest.mark.parametrize(("name", "llm"), [("slime-7b", (4096, 11008, 32, 32, 32, 32000)),
                                           ("slime-8b", (4096, 14336, 32, 32, 8, 128256)),
                                           ("slime-13b", (5120, 13824, 40, 40, 40, 32000))])
def test_every_tensor_of_a_slime_release_has_our_shape(name, llm):
    cfg = preset(name)
    assert cfg.global_branch.num_heads == cfg.local.num_heads == 1024 // 128  # upstream: mm_hidden_size // 128
    release = {**slime_visual_release(1024, llm[0]), **llm_release(*llm),
               **{f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in CLIP_L_RELEASE.items()}}
    mapped, dropped = import_state_dict({k: torch.empty(v, device="meta") for k, v in release.items()}, "slime")
    assert sorted(dropped) == ["model.mm_projector.mean", "model.mm_projector.std"]
    ours = our_shapes(cfg, llm_vocab=llm[5])
    for key, tensor in mapped.items():
        assert key in ours, key
        assert ours[key] == tuple(tensor.shape), (key, ours[key], tuple(tensor.shape))
    # and ours holds nothing a release lacks but the SliME-only gate noise (zeros upstream) and nothing else visual
    visual = {k for k in ours if not k.startswith(("llm.", "vision."))}
    assert visual == {k for k in mapped if not k.startswith(("llm.", "vision."))}


@pytest.mark.parametrize(("size", "crops", "total"), [((336, 336), 2, 865), ((640, 480), 4, 1153),
                                                      ((1920, 1080), 6, 1441), ((2000, 500), 5, 1297),
                                                      ((4000, 300), 7, 1585)])
def test_token_counts_at_clip_l_geometry(size, crops, total):
    cfg = preset("slime-8b")
    b = count_visual_tokens(*size, cfg, gamma=1.0)
    assert (b.crops, b.total_tokens) == (crops, total)  # 576 + 1 + 144 n (MODEL_SPEC A1)
    kept = count_visual_tokens(*size, cfg, gamma=0.75)
    assert kept.total_tokens == 577 + -(-3 * 144 * crops // 4)


@pytest.mark.parametrize(("vision", "kind", "tokens", "width"),
                         [("clip", "mlp", 576, 1024), ("clip", "sti", 720, 1024), ("clip", "sci", 576, 3072),
                          ("clip", "dci", 576, 3072), ("siglip", "sti", 911, 1152), ("siglip", "dci", 729, 3456)])
def test_dense_connector_at_real_geometry(vision, kind, tokens, width):
    cfg = preset("slime-7b")
    tower = cfg.vision if vision == "clip" else SIGLIP_SO400M
    cfg = replace(cfg, vision=tower, connector=ConnectorConfig(kind=kind), global_branch=GlobalConfig(kind="mlp"),
                  visual_mode="global")
    with torch.device("meta"):
        parts = build_visual_parts(cfg, 4096)
        states = parts["vision"](torch.empty(1, 3, tower.image_size, tower.image_size))
        fused = parts["connector"](states)
    assert len(states) == tower.num_layers + 1
    assert tuple(fused.shape) == (1, tokens, width)  # MODEL_SPEC B2
    assert tuple(parts["projector"].linear_1.weight.shape) == (4096, width)
    assert count_visual_tokens(1000, 700, cfg, mode="global").total_tokens == tokens
