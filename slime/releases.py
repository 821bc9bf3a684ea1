"""Released SliME and Dense Connector checkpoints: what a release directory holds and what it says.

A release comes in one of three layouts, as the official training code writes them:

    full      ``LlavaLlamaForCausalLM.save_pretrained``: config.json (the LLM's fields + ``mm_*``), weights
              as *.safetensors (with ``model.safetensors.index.json``) or *.bin, the base LLM's tokenizer
    adapters  an adapter-only stage (``tune_mm_mlp_adapter``): ``mm_projector.bin`` / ``sampler.bin`` with
              full ``model.`` names + config.json; the LLM and tokenizer come from ``base``
    lora      PEFT ``adapter_config.json`` + ``adapter_model.*``, ``non_lora_trainables.bin`` + config.json;
              the LoRA deltas are merged into ``base`` on load (W += scale * B @ A)

``read_release`` turns one into (ModelConfig, the LLM's HF config, upstream-named weights). Every visual
setting comes from config.json; a caller's value only fills what the release lacks, and one that
contradicts it is an error naming both. Every problem is a ``ReleaseError`` with a one-line message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slime.config import (ConnectorConfig, GlobalConfig, LLMConfig, LocalConfig, ModelConfig, TilingConfig,
                          VisionConfig)

# Towers the official releases name in ``mm_vision_tower`` (architecture only; weights come from the
# release or --vision-path). Heads cannot be read off weight shapes, hence this table.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(kind="clip", image_size=336, patch_size=14, hidden_dim=1024,
                                              intermediate_dim=4096, num_layers=24, num_heads=16),
    "google/siglip-so400m-patch14-384": dict(kind="siglip", image_size=384, patch_size=14, hidden_dim=1152,
                                             intermediate_dim=4304, num_layers=26, num_heads=16),
}
TOWER_PREFIX = "model.vision_tower.vision_tower."


class ReleaseError(ValueError):
    """A release that cannot be loaded as asked; the message is one line naming the cause."""


@dataclass
class Release:
    cfg: ModelConfig
    llm_config: dict  # the LLM's HF config (architecture fields only)
    weights: dict[str, torch.Tensor]  # upstream names (LoRA merged)
    tokenizer_dir: Path
    tokenizer: object  # the release's own (or its base's), as loaded: no <image> yet
    layout: str
    kind: str
    vision_hf_config: dict | None  # the tower's HF config when the release holds its weights
    notes: list[str] = field(default_factory=list)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReleaseError(f"{path.parent} has no {path.name}: not a SliME / Dense Connector release") from None
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{path} is not valid JSON: {e}") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a pickle can run code; tensors and plain containers are all a release needs
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise ReleaseError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def read_weights(root: Path) -> dict[str, torch.Tensor]:
    """Every weight file of a full release: the shards the index names (or every *.safetensors), else *.bin."""
    from safetensors.torch import load_file

    index = root / "model.safetensors.index.json"
    files = (sorted({root / f for f in _load_json(index)["weight_map"].values()}) if index.exists()
             else sorted(root.glob("*.safetensors")))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise ReleaseError(f"{index} names {f.name}, which is missing")
        state.update(load_file(str(f)))
    if not files:
        for f in sorted(root.glob("pytorch_model*.bin")) or sorted(root.glob("*.bin")):
            state.update(_read_bin(f))
    if not state:
        raise ReleaseError(f"no *.safetensors or *.bin weights in {root}")
    return state


def _layout(root: Path) -> str:
    if (root / "adapter_config.json").exists():
        return "lora"
    if (root / "mm_projector.bin").exists() and not any(root.glob("*.safetensors")):
        return "adapters"
    return "full"


def merge_lora(base: dict[str, torch.Tensor], root: Path) -> tuple[dict[str, torch.Tensor], int]:
    """PEFT LoRA deltas of ``root`` merged into ``base`` (upstream names): W += (alpha / r) * B @ A."""
    conf = _load_json(root / "adapter_config.json")
    if conf.get("use_dora"):
        raise ReleaseError(f"{root}: DoRA adapters are not supported (use_dora is set)")
    r, alpha = int(conf["r"]), float(conf["lora_alpha"])
    scale = alpha / (r ** 0.5) if conf.get("use_rslora") else alpha / r
    files = [root / "adapter_model.safetensors", root / "adapter_model.bin"]
    found = next((f for f in files if f.exists()), None)
    if found is None:
        raise ReleaseError(f"{root} has adapter_config.json but no adapter_model.safetensors or .bin")
    if found.suffix == ".safetensors":
        from safetensors.torch import load_file
        adapter = load_file(str(found))
    else:
        adapter = _read_bin(found)
    merged, count = dict(base), 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        target = re.sub(r"^base_model\.model\.", "", key.replace(".lora_A", "")).replace(".default", "")
        if target not in merged:
            raise ReleaseError(f"LoRA weight {key} targets {target}, which the base model does not have")
        # kept in float32: a merged weight is no longer representable in the base's bf16
        merged[target] = merged[target].float() + scale * (b.float() @ a.float())
        count += 1
    if not count:
        raise ReleaseError(f"{found} holds no lora_A / lora_B weights")
    return merged, count


def _non_lora(root: Path) -> dict[str, torch.Tensor]:
    """``non_lora_trainables.bin`` with the names upstream's loader gives them (``base_model.model.`` off)."""
    path = root / "non_lora_trainables.bin"
    if not path.exists():
        return {}
    state = {re.sub(r"^base_model\.model\.", "", k): v for k, v in _read_bin(path).items()}
    return {(k[len("model."):] if k.startswith("model.model.") else k): v for k, v in state.items()}


def _tower(conf: dict, root: Path, vision_path: str | None) -> tuple[dict, str | None, dict | None]:
    """(tower architecture as VisionConfig fields, a tower dir to read weights from or None, the tower's HF
    config as the release's weights need it or None)."""
    name = str(conf.get("mm_vision_tower") or conf.get("vision_tower") or "")
    # A relative name is the training run's working-directory path: try the release dir and its parents.
    here = [root, *list(root.resolve().parents)[:3]]
    candidates = [Path(vision_path)] if vision_path else ([Path(name)] + [d / name for d in here] if name else [])
    for cand in candidates:
        if (cand / "config.json").exists():
            hf = _load_json(cand / "config.json")
            hf = hf.get("vision_config", hf)  # a full CLIP/SigLIP model dir nests it
            kind = "siglip" if "siglip" in (str(hf.get("model_type", "")) + name).lower() else "clip"
            hf = {k: v for k, v in hf.items() if k not in ("architectures", "transformers_version", "_name_or_path",
                                                            "model_type", "auto_map")}
            if kind == "siglip":  # Dense Connector deletes SigLIP's last block and its head
                hf.update(num_hidden_layers=int(hf["num_hidden_layers"]) - 1, vision_use_head=False)
            arch = dict(kind=kind, image_size=int(hf["image_size"]), patch_size=int(hf["patch_size"]),
                        hidden_dim=int(hf["hidden_size"]), intermediate_dim=int(hf["intermediate_size"]),
                        num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]))
            return arch, str(cand), hf
    if vision_path:
        raise ReleaseError(f"--vision-path {vision_path} has no config.json of a CLIP or SigLIP vision tower")
    for known, arch in KNOWN_TOWERS.items():
        if name.rstrip("/").endswith(known):
            return dict(arch), None, None
    raise ReleaseError(f"config.json names the vision tower {name!r}, which is neither a local directory nor a "
                       f"known tower ({', '.join(KNOWN_TOWERS)}); pass --vision-path")


def _check(flag_name: str, flag, release_value, what: str):
    """A caller's value fills what the release lacks; one that contradicts it is an error naming both."""
    if flag is not None and release_value is not None and flag != release_value:
        raise ReleaseError(f"{flag_name} {flag} contradicts the release's {what} {release_value}")
    return release_value if release_value is not None else flag


def release_kind(conf: dict) -> str:
    projector = conf.get("mm_projector_type")
    if projector not in ("gated", "mlp2x_gelu", None):
        raise ReleaseError(f"mm_projector_type {projector!r} is not supported (slime-ray loads 'gated' SliME and "
                           f"'mlp2x_gelu' LLaVA-1.5 / Dense Connector releases)")
    if projector == "gated" or conf.get("mm_resampler_type") not in (None, "identity", "spatial"):
        return "slime"
    if projector in ("mlp2x_gelu", None):
        return "dense_connector"
    raise ReleaseError(f"mm_projector_type {projector!r} is not supported (slime-ray loads 'gated' SliME and "
                       f"'mlp2x_gelu' LLaVA-1.5 / Dense Connector releases)")


def model_config(conf: dict, tower: dict, *, kind: str | None = None, connector: str | None = None,
                 template: str | None = None, tokenizer=None) -> ModelConfig:
    """ModelConfig of a release from its config.json (``conf``) and tower architecture."""
    kind = _check("--kind", kind, release_kind(conf), "kind")
    dc_type = conf.get("mm_dense_connector_type")
    width = tower["hidden_dim"]
    mm_hidden = conf.get("mm_hidden_size")
    if kind == "dense_connector" and dc_type is None and connector is None and mm_hidden == 3 * width:
        raise ReleaseError(f"mm_hidden_size {mm_hidden} is 3x the tower's {width} (SCI or DCI) but config.json has "
                           f"no mm_dense_connector_type; pass --connector sci or dci")
    conn_kind = _check("--connector", connector, dc_type, "mm_dense_connector_type") or "mlp"
    merge = conf.get("mm_patch_merge_type", "flat")
    if "unpad" in merge:
        raise ReleaseError(f"mm_patch_merge_type {merge!r} (LLaVA-NeXT AnyRes with image_newline) is not supported: "
                           f"slime-ray's local branch is SliME's, not LLaVA-NeXT's unpadded grid")
    if kind == "slime" and merge != "spatial":
        raise ReleaseError(f"mm_patch_merge_type {merge!r}: slime-ray lays SliME's local tokens out 'spatial'")
    feature = conf.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ReleaseError(f"mm_vision_select_feature {feature!r} is not supported (only 'patch')")
    # Dense Connector's SigLIP tower reads hidden_states[-1] whatever mm_vision_select_layer says
    select = int(conf.get("mm_vision_select_layer", -2)) if tower["kind"] == "clip" else -1
    vision = VisionConfig(**tower, select_layer=select)
    conn = ConnectorConfig(kind=conn_kind)
    out_dim = {"mlp": width, "sti": width, "sci": 3 * width, "dci": 3 * width}[conn_kind]
    if mm_hidden is not None and int(mm_hidden) != out_dim:
        raise ReleaseError(f"mm_hidden_size {mm_hidden} does not match a {conn_kind} connector on a {width}-wide "
                           f"tower ({out_dim})")
    heads = max(1, out_dim // 128)  # upstream: mm_hidden_size // 128 heads in both resamplers
    if kind == "slime":
        topp = float(conf.get("mm_resampler_topp", 1.0))
        local = LocalConfig(num_queries=int(conf.get("mm_resampler_dim", 144)), num_heads=heads, compressor="upstream",
                            gamma=topp, selection="topk", score="sum", text="prompt", noise="absolute",
                            noise_std=0.1, temperature=float(conf.get("mm_resampler_temp", 1.0)))
        glob = GlobalConfig(kind="moa", num_heads=heads, gate_noise=True)
        mode = "global" if conf.get("use_global_only") else "local" if conf.get("use_local_only") else "both"
    else:
        # no local branch in the release: the compressor exists but is never run (mode "global")
        local, glob, mode = LocalConfig(num_queries=144, num_heads=1), GlobalConfig(kind="mlp"), "global"
    aspect = conf.get("image_aspect_ratio", "square")
    tiling = TilingConfig(global_view="pad" if aspect == "pad" else "resize")
    if template is None and tokenizer is not None:
        llama3 = "<|start_header_id|>" in tokenizer.get_vocab()
        template = ("llama3" if kind == "slime" else "llama3_dc") if llama3 else "vicuna_v1"
    dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(str(conf.get("torch_dtype", "")), "float32")
    return ModelConfig(vision=vision, connector=conn, global_branch=glob, local=local, tiling=tiling,
                       llm=LLMConfig(kind="llama"), template=template or "vicuna_v1",
                       max_length=int(conf.get("tokenizer_model_max_length") or 2048), dtype=dtype,
                       visual_mode=mode)


def llm_architecture(conf: dict) -> dict:
    """The LLM's HF config from a release's config.json: LLaVA's multimodal keys and provenance dropped."""
    from slime.checkpoint import architecture_config

    out = {k: v for k, v in architecture_config(conf).items() if not k.startswith(("mm_", "use_mm", "tune_mm"))}
    for key in ("image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
                "seperator", "use_global_only", "use_local_only", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower"):
        out.pop(key, None)
    out["model_type"] = "llama"
    return out


def read_release(path: str | Path, *, base: str | None = None, vision_path: str | None = None,
                 kind: str | None = None, connector: str | None = None, template: str | None = None) -> Release:
    from transformers import AutoTokenizer

    root = Path(path)
    if not root.is_dir():
        raise ReleaseError(f"{root} is not a directory")
    conf = _load_json(root / "config.json")
    layout = _layout(root)
    notes = []
    if layout == "full":
        weights, llm_source, tok_dir = read_weights(root), conf, root
    else:
        if not base:
            raise ReleaseError(f"{root} is {'a LoRA release' if layout == 'lora' else 'an adapter-only stage'}: "
                               f"pass --base with the LLM it was trained from")
        base_root = Path(base)
        weights = {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v
                   for k, v in read_weights(base_root).items()}
        llm_source, tok_dir = _load_json(base_root / "config.json"), base_root
        if layout == "lora":
            weights, count = merge_lora(weights, root)
            weights.update(_non_lora(root))
            notes.append(f"merged {count} LoRA deltas into {base}")
        else:
            for name in ("mm_projector.bin", "sampler.bin"):
                if (root / name).exists():
                    weights.update(_read_bin(root / name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:  # noqa: BLE001 - e.g. a Vicuna tokenizer.model without sentencepiece
        raise ReleaseError(f"cannot load the tokenizer in {tok_dir}: {type(e).__name__}: {e}") from None
    tower, tower_dir, tower_hf = _tower(conf, root, vision_path)
    cfg = model_config(conf, tower, kind=kind, connector=connector, template=template, tokenizer=tokenizer)
    has_tower = any(k.startswith(TOWER_PREFIX) for k in weights)
    if not has_tower:
        if tower_dir is None:
            raise ReleaseError(f"the release holds no vision tower weights and {conf.get('mm_vision_tower')!r} is not "
                               f"a local directory; pass --vision-path")
        if not any(Path(tower_dir).glob("*.safetensors")) and not any(Path(tower_dir).glob("*.bin")):
            raise ReleaseError(f"the release holds no vision tower weights and {tower_dir} has none either; pass "
                               f"--vision-path with the tower it was trained with")
        cfg = _with_tower_path(cfg, tower_dir)
        notes.append(f"vision tower weights from {tower_dir}")
    llm = llm_architecture(llm_source)
    rows = int(llm.get("vocab_size", 0))
    if rows < len(tokenizer):
        raise ReleaseError(f"the LLM has {rows} vocabulary rows but the tokenizer has {len(tokenizer)} tokens")
    sep = conf.get("seperator")
    ours = tokenizer(cfg.separator, add_special_tokens=False)["input_ids"][-1]
    if sep is not None and int(sep) != ours:
        raise ReleaseError(f"config.json's seperator id {sep} is not the last id of "
                           f"tokenizer({cfg.separator!r}) = {ours}")
    vision_hf = (tower_hf or _tower_hf_config(cfg.vision)) if has_tower else None
    return Release(cfg=cfg, llm_config=llm, weights=weights, tokenizer_dir=tok_dir, tokenizer=tokenizer, layout=layout,
                   kind=release_kind(conf), vision_hf_config=vision_hf, notes=notes)


def _with_tower_path(cfg: ModelConfig, tower_dir: str) -> ModelConfig:
    from dataclasses import replace
    return replace(cfg, vision=replace(cfg.vision, path=tower_dir))


def _tower_hf_config(v: VisionConfig) -> dict:
    """HF config of a tower rebuilt from a release's own weights (SigLIP: Dense Connector's, headless and
    already one block short)."""
    conf = dict(hidden_size=v.hidden_dim, intermediate_size=v.intermediate_dim, num_attention_heads=v.num_heads,
                image_size=v.image_size, patch_size=v.patch_size, num_hidden_layers=v.num_layers)
    if v.kind == "siglip":
        conf["vision_use_head"] = False
    return conf
