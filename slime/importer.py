"""Map the official SliME and Dense Connector (LLaVA-1.5 style) weight names onto SlimeModel's.

Upstream layout (``LlavaLlamaForCausalLM``):
    model.embed_tokens / model.layers.* / model.norm / lm_head          -> llm.model.* / llm.lm_head
    model.vision_tower.vision_tower.vision_model.*                      -> vision.encoder.*
    SliME  model.mm_projector.projection.{0,2}.*  (shared MLP P)        -> projector.linear_{1,2}.*
           model.mm_projector.attn.*              (attention expert R)  -> global_adapter.resampler.*
           model.mm_projector.w_gate / w_noise    [Din, 2] (x @ W)      -> global_adapter.gate/noise.weight [2, Din]
           model.sampler.post_qformer.*           (local compressor)    -> compressor.resampler.*
    DC     model.mm_projector.{0,2}.*             (mlp2x_gelu)          -> projector.linear_{1,2}.*

Fixed sin-cos tables (``pos_embed``) and the gate's unused ``mean``/``std`` buffers are dropped: ours
are recomputed from geometry. Loading released weights therefore needs no upstream code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch

Kind = Literal["slime", "dense_connector"]

_COMMON = [
    # transformers 5 flattened CLIPVisionModel: upstream "vision_model.X" is our "encoder.X".
    (r"^model\.vision_tower\.vision_tower\.vision_model\.(.*)$", r"vision.encoder.\1"),
    (r"^model\.(embed_tokens|layers|norm)(\..*)$", r"llm.model.\1\2"),
    (r"^lm_head\.(.*)$", r"llm.lm_head.\1"),
]
_SLIME = [
    (r"^model\.mm_projector\.projection\.0\.(.*)$", r"projector.linear_1.\1"),
    (r"^model\.mm_projector\.projection\.2\.(.*)$", r"projector.linear_2.\1"),
    (r"^model\.mm_projector\.attn\.(query|attn\..*|ln_q\..*|ln_kv\..*|ln_post\..*)$", r"global_adapter.resampler.\1"),
    (r"^model\.sampler\.post_qformer\.(query|attn\..*|ln_q\..*|ln_kv\..*|ln_post\..*)$", r"compressor.resampler.\1"),
]
_DC = [
    (r"^model\.mm_projector\.0\.(.*)$", r"projector.linear_1.\1"),
    (r"^model\.mm_projector\.2\.(.*)$", r"projector.linear_2.\1"),
]
_GATES = {"model.mm_projector.w_gate": "global_adapter.gate.weight",
          "model.mm_projector.w_noise": "global_adapter.noise.weight"}
_DROPPED = re.compile(r"(pos_embed$|^model\.mm_projector\.(mean|std)$|kv_proj|\.proj\.|rotary_emb)")


def import_state_dict(upstream: dict[str, torch.Tensor], kind: Kind) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Upstream names -> ours. Returns (state dict, upstream keys deliberately dropped).
    An upstream key that maps nowhere and is not a known-dead key is an error naming it."""
    rules = _COMMON + (_SLIME if kind == "slime" else _DC)
    out, dropped = {}, []
    for key, value in upstream.items():
        if kind == "slime" and key in _GATES:
            out[_GATES[key]] = value.t().contiguous()  # upstream computes x @ W; nn.Linear stores W^T
            continue
        for pattern, repl in rules:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            if _DROPPED.search(key):
                dropped.append(key)
            else:
                raise KeyError(f"upstream weight {key!r} has no counterpart in SlimeModel ({kind})")
    return out, dropped


def export_state_dict(ours: dict[str, torch.Tensor], kind: Kind) -> dict[str, torch.Tensor]:
    """Ours -> upstream names (the inverse mapping; used to check the importer round-trips)."""
    inverse = {v: k for k, v in _GATES.items()}
    rules = [(r"^vision\.encoder\.(.*)$", r"model.vision_tower.vision_tower.vision_model.\1"),
             (r"^llm\.model\.(.*)$", r"model.\1"), (r"^llm\.lm_head\.(.*)$", r"lm_head.\1")]
    if kind == "slime":
        rules += [(r"^projector\.linear_1\.(.*)$", r"model.mm_projector.projection.0.\1"),
                  (r"^projector\.linear_2\.(.*)$", r"model.mm_projector.projection.2.\1"),
                  (r"^global_adapter\.resampler\.(.*)$", r"model.mm_projector.attn.\1"),
                  (r"^compressor\.resampler\.(.*)$", r"model.sampler.post_qformer.\1")]
    else:
        rules += [(r"^projector\.linear_1\.(.*)$", r"model.mm_projector.0.\1"),
                  (r"^projector\.linear_2\.(.*)$", r"model.mm_projector.2.\1")]
    out = {}
    for key, value in ours.items():
        if key in inverse:
            if kind == "slime":
                out[inverse[key]] = value.t().contiguous()
            continue
        for pattern, repl in rules:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
    return out


def read_upstream_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every *.safetensors (or, failing that, *.bin loaded with weights_only=True: no code runs) in a dir."""
    from safetensors.torch import load_file

    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            state.update(load_file(str(f)))
        return state
    for f in sorted(root.glob("*.bin")):
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    if not state:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {root}")
    return state


def load_upstream(model, upstream: dict[str, torch.Tensor], kind: Kind) -> dict[str, list[str]]:
    """Load released weights into a built SlimeModel. Returns what was dropped and what kept its init
    (e.g. the attention expert and compressor when importing a Dense Connector checkpoint)."""
    mapped, dropped = import_state_dict(upstream, kind)
    own = model.state_dict()
    for key, value in mapped.items():
        if key not in own:
            raise KeyError(f"mapped weight {key!r} does not exist in this model (check the preset / connector kind)")
        if own[key].shape != value.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(own[key].shape)}")
    model.load_state_dict(mapped, strict=False)
    kept_init = sorted(k for k in own if k not in mapped)
    return {"dropped": dropped, "kept_init": kept_init}
