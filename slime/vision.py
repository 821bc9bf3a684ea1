"""VisionTower: the frozen image encoder (CLIP ViT or SigLIP) that every tile goes through.

MODEL_SPEC A0/B1: features come from ``hidden_states`` (index 0 = stem, i = block i). CLIP drops the
CLS token from every layer; SigLIP has no CLS and its last block is removed (as Dense Connector does).
The tower is frozen in every phase: no parameter requires grad and it always runs in eval mode.

Shape legend: M tiles · S tile side · P patches/tile · Dv vision width · L blocks run.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from slime.config import VisionConfig
from slime.storage import local_copy


class VisionTower(nn.Module):
    def __init__(self, encoder: nn.Module, cfg: VisionConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        self.drop_cls = cfg.kind == "clip"
        self.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> VisionTower:
        # Frozen tower: dropout and friends stay off even when the model trains.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[M, 3, S, S] -> L+1 hidden states, each [M, P, Dv]."""
        dtype = next(self.encoder.parameters()).dtype
        out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        states = out.hidden_states
        if self.drop_cls:
            states = tuple(h[:, 1:] for h in states)
        return states


def _hf_config(cfg: VisionConfig) -> CLIPVisionConfig | SiglipVisionConfig:
    common = dict(hidden_size=cfg.hidden_dim, intermediate_size=cfg.intermediate_dim,
                  num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size)
    if cfg.kind == "clip":
        return CLIPVisionConfig(num_hidden_layers=cfg.num_layers, **common)
    # One extra block: it is removed right after building, exactly like a loaded SigLIP checkpoint.
    return SiglipVisionConfig(num_hidden_layers=cfg.num_layers + 1, **common)


def _truncate_siglip(model: SiglipVisionModel) -> None:
    # transformers 5 flattened SiglipVisionModel (no .vision_model wrapper); 4.x still has it.
    encoder = getattr(model, "vision_model", model).encoder
    layers = encoder.layers
    encoder.layers = nn.ModuleList(list(layers)[:-1])
    model.config.num_hidden_layers = len(layers) - 1


def build_vision_tower(cfg: VisionConfig, hf_config: dict | None = None) -> VisionTower:
    """Load from ``cfg.path`` (local or s3://), or build from ``hf_config`` / the architecture fields."""
    cls = CLIPVisionModel if cfg.kind == "clip" else SiglipVisionModel
    if cfg.path:
        encoder = cls.from_pretrained(local_copy(cfg.path))
    else:
        conf_cls = CLIPVisionConfig if cfg.kind == "clip" else SiglipVisionConfig
        conf = conf_cls(**hf_config) if hf_config else _hf_config(cfg)
        encoder = cls(conf)
    if cfg.kind == "siglip" and (cfg.path or not hf_config):
        _truncate_siglip(encoder)
    got = encoder.config
    for name, want, have in [("image_size", cfg.image_size, got.image_size), ("patch_size", cfg.patch_size, got.patch_size),
                             ("hidden_dim", cfg.hidden_dim, got.hidden_size),
                             ("num_layers", cfg.num_layers, got.num_hidden_layers)]:
        if want != have:
            raise ValueError(f"vision.{name} is {want} in the config but the encoder has {have}")
    return VisionTower(encoder, cfg)
