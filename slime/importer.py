"""Map the official SliME and Dense Connector (LLaVA-1.5 style) weight names onto SlimeModel's.

Upstream layout (``LlavaLlamaForCausalLM``):
    model.embed_tokens / model.layers.* / model.norm / lm_head          -> llm.model.* / llm.lm_head
    model.vision_tower.vision_tower.vision_model.*  (CLIP or DC SigLIP) -> vision.encoder.*
    SliME  model.mm_projector.projection.{0,2}.*  (shared MLP P)        -> projector.linear_{1,2}.*
           model.mm_projector.attn.*              (attention expert R)  -> global_adapter.resampler.*
           model.mm_projector.w_gate / w_noise    [Din, 2] (x @ W)      -> global_adapter.gate/noise.weight [2, Din]
           model.sampler.post_qformer.*           (local compressor)    -> compressor.resampler.*
    DC     model.mm_projector.{0,2}.*             (mlp2x_gelu)          -> projector.linear_{1,2}.*

The resamplers' fixed sin-cos tables (``pos_embed``) are loaded like weights: the release's own table is
the one that runs. Only the gate's ``mean``/``std`` buffers (a Normal for a load statistic upstream
never uses at k = 2 of 2 experts) are dropped. The checks against the official code are
tests/test_upstream_parity.py, on releases the official classes wrote (tests/assets/upstream).
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from slime.connectors import float16_bits

Kind = Literal["slime", "dense_connector"]

_COMMON = [
    # transformers 5 flattened CLIPVisionModel / SiglipVisionModel: upstream "vision_model.X" is our "encoder.X".
    (r"^model\.vision_tower\.vision_tower\.vision_model\.(.*)$", r"vision.encoder.\1"),
    (r"^model\.(embed_tokens|layers|norm)(\..*)$", r"llm.model.\1\2"),
    (r"^lm_head\.(.*)$", r"llm.lm_head.\1"),
]
_RESAMPLER = r"(query|pos_embed|attn\..*|ln_q\..*|ln_kv\..*|ln_post\..*)"
_SLIME = [
    (r"^model\.mm_projector\.projection\.0\.(.*)$", r"projector.linear_1.\1"),
    (r"^model\.mm_projector\.projection\.2\.(.*)$", r"projector.linear_2.\1"),
    (rf"^model\.mm_projector\.attn\.{_RESAMPLER}$", r"global_adapter.resampler.\1"),
    (rf"^model\.sampler\.post_qformer\.{_RESAMPLER}$", r"compressor.resampler.\1"),
]
_DC = [
    (r"^model\.mm_projector\.0\.(.*)$", r"projector.linear_1.\1"),
    (r"^model\.mm_projector\.2\.(.*)$", r"projector.linear_2.\1"),
]
_GATES = {"model.mm_projector.w_gate": "global_adapter.gate.weight",
          "model.mm_projector.w_noise": "global_adapter.noise.weight"}
_DROPPED = re.compile(r"^model\.mm_projector\.(mean|std)$|rotary_emb\.inv_freq$")


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
            elif key == "model.image_newline":
                raise KeyError("the release has model.image_newline (LLaVA-NeXT AnyRes), which slime-ray does not "
                               "support")
            else:
                raise KeyError(f"upstream weight {key!r} has no counterpart in SlimeModel ({kind})")
    return out, dropped


def load_upstream(model, upstream: dict[str, torch.Tensor], kind: Kind) -> dict[str, list[str]]:
    """Load released weights into a built SlimeModel (values cast to the model's dtypes). Returns what was
    dropped and what kept its init (e.g. the attention expert and compressor of a Dense Connector release)."""
    mapped, dropped = import_state_dict(upstream, kind)
    own = model.state_dict()
    for key, value in mapped.items():
        if key not in own:
            raise KeyError(f"mapped weight {key!r} does not exist in this model (check the connector kind)")
        if own[key].shape != value.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(own[key].shape)}")
    # position tables: a release's (bf16) values cast to float16 as upstream's loader does, kept as their bits
    mapped = {k: float16_bits(v) if k.endswith(".pos_embed") else v.to(own[k].dtype) for k, v in mapped.items()}
    model.load_state_dict(mapped, strict=False)
    kept_init = sorted(k for k in own if k not in mapped)
    return {"dropped": dropped, "kept_init": kept_init}
