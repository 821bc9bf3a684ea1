"""Self-describing checkpoints (save -> load round-trip) and the importer of official SliME / Dense
Connector weight names."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from slime.checkpoint import load_pretrained, save_pretrained
from slime.config import ConnectorConfig, GlobalConfig, VisionConfig, replace
from slime.model import build_model
from slime.presets import tiny
from slime.tokenizer import build_tiny_tokenizer

HAS_IMPORTER = importlib.util.find_spec("slime.importer") is not None
needs_importer = pytest.mark.skipif(not HAS_IMPORTER, reason="slime/importer.py not written yet")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(1024)


def make(cfg, tok, seed):
    torch.manual_seed(seed)
    return build_model(cfg, tok).eval()


def inputs(model, seed=0) -> dict[str, torch.Tensor]:
    """One image sample (2 x 2 crops) and its expanded prompt, built directly from the contract."""
    from slime.tiling import count_visual_tokens

    cfg = model.cfg
    b = count_visual_tokens(640, 480, cfg)
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(20, 600, (16,), generator=g)
    ids = torch.cat([text[:8], torch.full((b.total_tokens,), model.image_token_id), text[8:]])[None]
    pix = torch.zeros(1, cfg.tiling.max_tiles, 3, 56, 56)
    pix[0, : 1 + b.crops] = torch.randn(1 + b.crops, 3, 56, 56, generator=g)
    mask = torch.zeros(1, cfg.tiling.max_tiles, dtype=torch.bool)
    mask[0, : 1 + b.crops] = True
    instr = torch.zeros_like(ids, dtype=torch.bool)
    instr[0, :8] = True
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix, tile_mask=mask,
                grid=torch.tensor([list(b.grid)]), instruction_mask=instr, has_image=torch.tensor([True]))


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(**batch).logits


SIGLIP = VisionConfig(kind="siglip", image_size=56, patch_size=14, hidden_dim=32, intermediate_dim=64, num_layers=3,
                      num_heads=2, select_layer=-1)


@pytest.mark.parametrize(("connector", "vision", "llm"), [("mlp", "clip", "llama"), ("dci", "clip", "llama"),
                                                          ("sti", "siglip", "qwen2")])
def test_save_load_identical_logits(tmp_path, tok, connector, vision, llm):
    cfg = replace(tiny(), connector=ConnectorConfig(kind=connector, extra_layers=(1, 2)),
                  llm=replace(tiny().llm, kind=llm), vision=SIGLIP if vision == "siglip" else tiny().vision)
    model = make(cfg, tok, seed=1)
    out = save_pretrained(model, tok, tmp_path / "ckpt", metadata={"phase": "sft"})
    loaded, tok2 = load_pretrained(str(out))
    assert loaded.cfg == model.cfg
    batch = inputs(model)
    assert torch.equal(logits(model, batch), logits(loaded, batch))
    assert tok2.get_vocab() == tok.get_vocab() and loaded.image_token_id == model.image_token_id
    # a reloaded SigLIP is not truncated a second time
    assert len(loaded.vision.encoder.encoder.layers) == cfg.vision.num_layers


def test_checkpoint_describes_itself(tmp_path, tok):
    model = make(tiny(), tok, seed=2)
    out = save_pretrained(model, tok, tmp_path / "ckpt", metadata={"phase": "pretrain", "step": 7})
    names = {p.name for p in out.iterdir()}
    assert {"slime_config.yaml", "llm_config.json", "vision_config.json", "model.safetensors", "tokenizer",
            "metadata.json"} <= names
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickles
    assert (out / "tokenizer" / "tokenizer.json").exists()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["format_version"] == 1 and meta["phase"] == "pretrain" and meta["step"] == 7
    assert meta["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert meta["image_token_id"] == model.image_token_id
    assert not list(tmp_path.glob(".ckpt.tmp*"))  # the temp dir was renamed into place
    save_pretrained(model, tok, out)  # overwriting an existing checkpoint works
    assert json.loads((out / "metadata.json").read_text()).get("phase") is None


def test_loading_a_non_checkpoint_dir_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="not a slime model directory"):
        load_pretrained(str(tmp_path))


def test_load_with_dtype(tmp_path, tok):
    out = save_pretrained(make(tiny(), tok, seed=3), tok, tmp_path / "ckpt")
    loaded, _ = load_pretrained(str(out), dtype="bfloat16")
    assert loaded.projector.linear_1.weight.dtype == torch.bfloat16 and loaded.cfg.dtype == "bfloat16"


# ------------------------------------------------------------------ importer


UPSTREAM_SLIME = ["model.mm_projector.projection.0.weight", "model.mm_projector.projection.2.bias",
                  "model.mm_projector.attn.query", "model.mm_projector.attn.attn.in_proj_weight",
                  "model.mm_projector.attn.attn.out_proj.weight", "model.mm_projector.attn.ln_q.weight",
                  "model.mm_projector.attn.ln_kv.bias", "model.mm_projector.attn.ln_post.weight",
                  "model.mm_projector.w_gate", "model.mm_projector.w_noise", "model.sampler.post_qformer.query",
                  "model.sampler.post_qformer.attn.in_proj_bias", "model.sampler.post_qformer.ln_post.bias",
                  "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
                  "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                  "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight",
                  "lm_head.weight"]


@needs_importer
def test_importer_round_trip_slime(tok):
    from slime.importer import export_state_dict, import_state_dict, load_upstream

    src = make(tiny(), tok, seed=4)
    with torch.no_grad():  # a trained gate (zero at init would hide a missing transpose)
        src.global_adapter.gate.weight.copy_(torch.randn_like(src.global_adapter.gate.weight))
        src.global_adapter.noise.weight.copy_(torch.randn_like(src.global_adapter.noise.weight))
    upstream = export_state_dict(src.state_dict(), "slime")
    assert set(UPSTREAM_SLIME) <= set(upstream), sorted(set(UPSTREAM_SLIME) - set(upstream))
    din = src.projector.linear_1.in_features
    assert upstream["model.mm_projector.w_gate"].shape == (din, 2)  # upstream computes x @ W_g
    assert torch.equal(upstream["model.mm_projector.w_gate"], src.global_adapter.gate.weight.t())
    # fixed tables and dead buffers ride along in released files and are dropped
    upstream["model.mm_projector.attn.pos_embed"] = torch.zeros(16, din)
    upstream["model.sampler.post_qformer.pos_embed"] = torch.zeros(4, din)
    mapped, dropped = import_state_dict(upstream, "slime")
    assert sorted(dropped) == ["model.mm_projector.attn.pos_embed", "model.sampler.post_qformer.pos_embed"]
    dst = make(tiny(), tok, seed=5)
    batch = inputs(src)
    assert not torch.equal(logits(src, batch), logits(dst, batch))
    report = load_upstream(dst, upstream, "slime")
    assert report["kept_init"] == []  # every weight came from the checkpoint
    assert torch.equal(logits(src, batch), logits(dst, batch))


@needs_importer
def test_importer_dense_connector_names(tok):
    from slime.importer import export_state_dict, load_upstream

    cfg = replace(tiny(), connector=ConnectorConfig(kind="dci", extra_layers=(1, 2)),
                  global_branch=GlobalConfig(kind="mlp"))
    src = make(cfg, tok, seed=6)
    upstream = export_state_dict(src.state_dict(), "dense_connector")
    projector = sorted(k for k in upstream if "mm_projector" in k)
    assert projector == ["model.mm_projector.0.bias", "model.mm_projector.0.weight", "model.mm_projector.2.bias",
                         "model.mm_projector.2.weight"]
    assert upstream["model.mm_projector.0.weight"].shape == (64, 96)  # Linear(3 * Dv -> D)
    upstream = {k: v for k, v in upstream.items() if not k.startswith("model.sampler.")}  # LLaVA has no sampler
    dst = make(cfg, tok, seed=7)
    report = load_upstream(dst, upstream, "dense_connector")
    assert report["kept_init"] and all(k.startswith("compressor.") for k in report["kept_init"])
    assert torch.equal(dst.projector.linear_1.weight, src.projector.linear_1.weight)
    assert torch.equal(dst.vision.encoder.state_dict()["embeddings.patch_embedding.weight"],
                       src.vision.encoder.state_dict()["embeddings.patch_embedding.weight"])


@needs_importer
def test_importer_rejects_unknown_and_mismatched(tok):
    from slime.importer import import_state_dict, load_upstream

    with pytest.raises(KeyError, match="model.mm_projector.mystery"):
        import_state_dict({"model.mm_projector.mystery": torch.zeros(1)}, "slime")
    model = make(tiny(), tok, seed=8)
    with pytest.raises(ValueError, match="projector.linear_1.weight"):
        load_upstream(model, {"model.mm_projector.projection.0.weight": torch.zeros(64, 99)}, "slime")
