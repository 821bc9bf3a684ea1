"""Named model configurations.

``tiny`` builds a random tiny CLIP + tiny Llama and an offline tokenizer: the whole pipeline runs on a
laptop CPU with it; ``mini`` is the same a little larger, enough to learn the fidelity tasks (demo,
benchmarks.learning). The real presets describe the released SliME configurations and build nothing
until they are given checkpoint paths (local or s3://).
"""

from __future__ import annotations

from pathlib import Path

from slime.config import (ConnectorConfig, GlobalConfig, LLMConfig, LocalConfig, ModelConfig, TilingConfig,
                          VisionConfig, replace)

CLIP_L_336 = VisionConfig(kind="clip", image_size=336, patch_size=14, hidden_dim=1024, intermediate_dim=4096,
                          num_layers=24, num_heads=16, select_layer=-2)


def tiny() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(kind="clip", image_size=56, patch_size=14, hidden_dim=32, intermediate_dim=64,
                            num_layers=4, num_heads=2, select_layer=-2),
        connector=ConnectorConfig(kind="mlp", extra_layers=(1, 2), sti_pool=8),
        global_branch=GlobalConfig(kind="moa", num_heads=2),
        local=LocalConfig(num_queries=4, num_heads=2, gamma=1.0),
        tiling=TilingConfig(),
        # 2 heads of 32: vLLM's CPU attention kernels take no head size below 32, so tiny runs on the default engine
        llm=LLMConfig(kind="llama", hidden_dim=64, intermediate_dim=128, num_layers=2, num_heads=2, num_kv_heads=1,
                      vocab_size=1024, max_position=1024),
        template="vicuna_v1",
        max_length=256,
    )


def tiny_vllm(kind: str = "llama") -> ModelConfig:
    """``tiny`` with the LLM family ``kind``; ``qwen2`` pairs with the chatml template."""
    cfg = tiny()
    return replace(cfg, template="vicuna_v1" if kind == "llama" else "chatml", llm=replace(cfg.llm, kind=kind))


def mini() -> ModelConfig:
    """tiny() made just large enough to learn the fidelity tasks in minutes on a CPU: 112 px tiles (8x8
    patches of 14 px), a 64-wide 4-block random CLIP, 16 queries per crop, a 128-wide 4-layer Llama."""
    t = tiny()
    return replace(t, vision=replace(t.vision, image_size=112, patch_size=14, hidden_dim=64, intermediate_dim=128,
                                     num_layers=4, num_heads=4),
                   local=replace(t.local, num_queries=16, num_heads=4),
                   llm=replace(t.llm, hidden_dim=128, intermediate_dim=256, num_layers=4, num_heads=4, num_kv_heads=2),
                   max_length=320)


def _real(llm: LLMConfig, template: str) -> ModelConfig:
    return ModelConfig(vision=CLIP_L_336, connector=ConnectorConfig(kind="mlp"), global_branch=GlobalConfig(),
                       # upstream compressor (no locality prior): the released weights were trained without it
                       local=LocalConfig(num_queries=144, num_heads=8, gamma=0.95, compressor="upstream"),
                       tiling=TilingConfig(),
                       llm=llm, template=template, max_length=2048, dtype="bfloat16")


PRESETS = {
    "tiny": tiny,
    "mini": mini,
    "slime-7b": lambda: _real(LLMConfig(kind="llama", hidden_dim=4096, intermediate_dim=11008, num_layers=32,
                                        num_heads=32, num_kv_heads=32, vocab_size=32000), "vicuna_v1"),
    "slime-8b": lambda: _real(LLMConfig(kind="llama", hidden_dim=4096, intermediate_dim=14336, num_layers=32,
                                        num_heads=32, num_kv_heads=8, vocab_size=128256, max_position=8192), "llama3"),
    "slime-13b": lambda: _real(LLMConfig(kind="llama", hidden_dim=5120, intermediate_dim=13824, num_layers=40,
                                         num_heads=40, num_kv_heads=40, vocab_size=32000), "vicuna_v1"),
}


def preset(name: str, *, vision_path: str | None = None, llm_path: str | None = None) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    if vision_path:
        cfg = replace(cfg, vision=replace(cfg.vision, path=vision_path))
    if llm_path:
        cfg = replace(cfg, llm=replace(cfg.llm, path=llm_path))
    return cfg


def require_weights(name: str, cfg: ModelConfig) -> None:
    """Real presets never build multi-billion-parameter random models: they need checkpoint paths."""
    if name not in ("tiny", "mini") and not (cfg.vision.path and cfg.llm.path):
        raise ValueError(f"preset {name!r} builds nothing without checkpoint paths: pass vision.path (e.g. a local "
                         f"or s3:// copy of clip-vit-large-patch14-336) and llm.path")


def build_tiny(seed: int = 0, cfg: ModelConfig | None = None):
    """(model, tokenizer) for the tiny preset, deterministic under ``seed``."""
    import torch

    from slime.model import build_model
    from slime.tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    cfg = cfg or tiny()
    tokenizer = build_tiny_tokenizer(cfg.llm.vocab_size)
    return build_model(cfg, tokenizer), tokenizer


def save_tiny_checkpoint(out_dir: str | Path, seed: int = 0, cfg: ModelConfig | None = None) -> Path:
    """Build the tiny model + offline tokenizer and save them as a self-describing checkpoint."""
    from slime.checkpoint import save_pretrained

    model, tokenizer = build_tiny(seed, cfg)
    return save_pretrained(model, tokenizer, out_dir, metadata={"preset": "tiny", "seed": seed})
