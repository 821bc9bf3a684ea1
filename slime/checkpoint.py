"""Self-describing model directories: config + safetensors + tokenizer + metadata. No pickles.

    <dir>/slime_config.yaml     ModelConfig (paths cleared: the weights live here)
    <dir>/llm_config.json       HF config of the language model (rebuilds the exact architecture)
    <dir>/vision_config.json    HF config of the vision encoder
    <dir>/model.safetensors     every parameter and saved buffer of SlimeModel (the resamplers' sin-cos tables too)
    <dir>/tokenizer/            the tokenizer, saved with the model (nothing is downloaded)
    <dir>/metadata.json         format version, parameter counts, training provenance (``serving``: the
                                visual mode, gamma and selector settings the weights were trained with)

The config's ``visual_mode`` and ``local.gamma`` are the model's serving defaults: what the Predictor,
the vLLM engine, evaluation and explain use when a request or config does not say. Training writes the
phase's own (``serving_config``), so a model is served as it was trained.

Writes are atomic for local directories (a temp dir renamed into place); ``load_pretrained`` accepts a
local path or any fsspec URI (s3://...).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from slime.config import ModelConfig, VisualMode, from_dict, replace, to_dict
from slime.storage import local_copy
from slime.tokenizer import load_tokenizer

FORMAT_VERSION = 2  # 2: the resamplers' position tables are saved


def serving_config(cfg: ModelConfig, *, visual_mode: VisualMode, gamma: float) -> ModelConfig:
    """``cfg`` with the visual tokens and local keep ratio the weights were trained with as serving defaults."""
    return replace(cfg, visual_mode=visual_mode, local=replace(cfg.local, gamma=gamma))


def serving_metadata(cfg: ModelConfig) -> dict:
    """What metadata.json says the model is served with (the same numbers as its slime_config.yaml)."""
    return {"visual_mode": cfg.visual_mode, "gamma": cfg.local.gamma, "local": to_dict(cfg.local)}


def save_pretrained(model, tokenizer, out_dir: str | Path, metadata: dict | None = None,
                    cfg: ModelConfig | None = None) -> Path:
    """Write a model directory; ``cfg`` (default ``model.cfg``) is the config written, e.g. with the
    trained phase's serving defaults (``serving_config``); it must describe the same architecture."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg = cfg or model.cfg
    cfg = replace(cfg, vision=replace(cfg.vision, path=None), llm=replace(cfg.llm, path=None), tokenizer_path=None)
    (tmp / "slime_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    llm_conf = model.llm.config.to_dict()
    llm_conf["vocab_size"] = model.llm.get_input_embeddings().weight.shape[0]
    (tmp / "llm_config.json").write_text(json.dumps(llm_conf, indent=2, default=str))
    (tmp / "vision_config.json").write_text(json.dumps(model.vision.encoder.config.to_dict(), indent=2, default=str))
    # safetensors refuses tensors that share storage (tied embeddings): copy only the second sharer.
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        state[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    meta = {"format_version": FORMAT_VERSION, "created": time.time(),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "image_token_id": model.image_token_id, "separator_id": model.separator_id,
            "serving": serving_metadata(cfg), **(metadata or {})}
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def architecture_config(hf_config: dict) -> dict:
    """An HF config dict reduced to the architecture (what ``build_model`` rebuilds from): the saved
    class names, versions, source path and remote-code hooks are provenance, not shape."""
    drop = ("architectures", "transformers_version", "_name_or_path", "auto_map")
    return {k: v for k, v in hf_config.items() if k not in drop}


def load_config(path: str | Path) -> ModelConfig:
    return from_dict(ModelConfig, yaml.safe_load((Path(path) / "slime_config.yaml").read_text()))


def load_pretrained(path: str, device: str | torch.device = "cpu", dtype: str | None = None):
    """(model, tokenizer) from a model directory (local path or s3://...); adapters: slime.lora.load_model."""
    from slime.model import build_model

    local = Path(local_copy(str(path)))
    if not (local / "slime_config.yaml").exists():
        raise FileNotFoundError(f"{path} is not a slime model directory (no slime_config.yaml)")
    cfg = load_config(local)
    if dtype:
        cfg = replace(cfg, dtype=dtype)
    tokenizer = load_tokenizer(local / "tokenizer")
    llm_conf = architecture_config(json.loads((local / "llm_config.json").read_text()))
    vision_conf = json.loads((local / "vision_config.json").read_text())
    model = build_model(cfg, tokenizer, llm_hf_config=llm_conf, vision_hf_config=vision_conf)
    state = load_file(str(local / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Format 1 directories predate saved position tables: theirs are rebuilt (upstream's formula).
    missing = [k for k in missing if not k.endswith(".pos_embed")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    target = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    return model.to(device=device, dtype=target).eval(), tokenizer
