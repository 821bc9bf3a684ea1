"""Self-describing checkpoints (save -> load round-trip) and the importer of official SliME / Dense
Connector weight names."""

from __future__ import annotations

import json

import pytest
import torch

from slime.checkpoint import load_pretrained, save_pretrained
from slime.config import ConnectorConfig, GlobalConfig, VisionConfig, replace
from slime.model import build_model
from slime.presets import tiny
from slime.tokenizer import build_tiny_tokenizer



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
    assert meta["format_version"] == 2 and meta["phase"] == "pretrain" and meta["step"] == 7
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


def test_importer_rejects_unknown_and_mismatched(tok):
    from slime.importer import import_state_dict, load_upstream

    with pytest.raises(KeyError, match="model.mm_projector.mystery"):
        import_state_dict({"model.mm_projector.mystery": torch.zeros(1)}, "slime")
    model = make(tiny(), tok, seed=8)
    with pytest.raises(ValueError, match="projector.linear_1.weight"):
        load_upstream(model, {"model.mm_projector.projection.0.weight": torch.zeros(64, 99)}, "slime")


def test_format_1_directories_without_position_tables_still_load(tmp_path, tok):
    from safetensors.torch import load_file, save_file

    out = save_pretrained(make(tiny(), tok, seed=4), tok, tmp_path / "old")
    state = load_file(str(out / "model.safetensors"))
    assert {k for k in state if k.endswith("pos_embed")} == {"global_adapter.resampler.pos_embed",
                                                             "compressor.resampler.pos_embed"}
    save_file({k: v for k, v in state.items() if not k.endswith("pos_embed")}, str(out / "model.safetensors"))
    loaded, _ = load_pretrained(str(out))
    assert torch.equal(loaded.compressor.resampler.pos_embed, state["compressor.resampler.pos_embed"])


def test_serving_defaults_travel_with_the_weights(tmp_path, tok):
    """A directory saved with the trained phase's visual mode and gamma (what training writes) is read back
    with them by every consumer: the Predictor (mode, token count of a request), explain and the view the
    vLLM engine opens."""
    from PIL import Image

    from pipelines.serve.engine import model_dir
    from slime.checkpoint import serving_config
    from slime.explain import explain_selection
    from slime.predictor import ChatRequest, Predictor
    from slime.tiling import count_visual_tokens

    model = make(tiny(), tok, seed=5)
    served = serving_config(model.cfg, visual_mode="both", gamma=0.5)
    out = save_pretrained(model, tok, tmp_path / "ckpt", cfg=served)
    assert model.cfg.local.gamma == 1.0  # the model in memory (training's) keeps its own config
    meta = json.loads((out / "metadata.json").read_text())["serving"]
    assert (meta["visual_mode"], meta["gamma"], meta["local"]["selection"]) == ("both", 0.5, "topk")
    predictor = Predictor.load(str(out))
    assert (predictor.mode, predictor.cfg.local.gamma) == ("both", 0.5)
    image = Image.new("RGB", (448, 336), (10, 200, 30))
    sample = predictor.encode(ChatRequest(messages=[{"role": "user", "content": "Colour?"}], images=[image]))
    assert int(sample["num_visual_tokens"]) == count_visual_tokens(448, 336, served).total_tokens \
        < count_visual_tokens(448, 336, model.cfg).total_tokens
    assert explain_selection(predictor, image, "Colour?").gamma == 0.5
    view = json.loads((model_dir(str(out), cache_root=str(tmp_path / "vllm")) / "config.json").read_text())
    assert (view["visual_mode"], view["slime"]["local"]["gamma"]) == ("both", 0.5)

    global_only = save_pretrained(model, tok, tmp_path / "g", cfg=serving_config(model.cfg, visual_mode="global",
                                                                                   gamma=1.0))
    assert Predictor.load(str(global_only)).mode == "global"
