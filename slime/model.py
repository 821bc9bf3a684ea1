"""SlimeModel: global view + text-selected local tokens spliced into any HF causal LM (SliME A0, A4).

forward reads like the paper's figure:
    tiles -> VisionTower -> DenseConnector -> global: MixtureOfAdapters      -> [G, D]
                                           -> local:  QueryCompressor -> raster layout
                                                      -> TextGuidedSelector  -> [K, D]
    <image> positions <- [G global][1 separator = emb(",")][K local]  ->  LLM  ->  loss

``mode`` says which visual tokens are fed (global / local / both: the training phases need all three),
``forced_expert`` pins the global branch to one expert (phases I-a and I-b). Nothing is dispatched on
tensor shapes. Before scattering, the number of visual tokens produced is checked against the
``<image>`` positions the processor wrote (ValueError with both numbers).

Shape legend: B batch · M tiles/sample (padded) · S tile side · P' tokens/tile · Din fused width ·
G global tokens · n crops · Q queries/crop · L = n*Q local tokens · K kept · D LLM width · T sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slime.config import ModelConfig, VisualMode
from slime.connectors import DenseConnector, MixtureOfAdapters, MLPProjector, Resampler
from slime.local import LOCALITY, QueryCompressor, TextGuidedSelector, raster_layout

IGNORE_INDEX = -100
# Fields of the sample contract (slime.processing, pipelines.data.ingest) that the training batches carry and
# forward does not read: the loop logs num_visual_tokens; the model counts its own tokens from <image>.
UNREAD_BATCH_KEYS = frozenset({"image_size", "num_visual_tokens"})


@dataclass
class SlimeOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    num_visual_tokens: torch.Tensor  # [B]
    kept_local_fraction: float


class SlimeModel(nn.Module):
    def __init__(self, cfg: ModelConfig, *, vision: nn.Module, connector: DenseConnector, projector: MLPProjector,
                 global_adapter: MixtureOfAdapters | None, compressor: QueryCompressor,
                 selector: TextGuidedSelector, llm: nn.Module, image_token_id: int, separator_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.connector = connector
        self.projector = projector
        self.global_adapter = global_adapter
        self.compressor = compressor
        self.selector = selector
        self.llm = llm
        self.image_token_id = image_token_id
        self.separator_id = separator_id

    # ------------------------------------------------------------------ visual tokens

    def tile_features(self, pixel_values: torch.Tensor | None, vision_features: torch.Tensor | None,
                      need: torch.Tensor) -> torch.Tensor:
        """Fused features of the tiles marked in ``need`` [B, M] -> [sum(need), P', Din] (batch-major)."""
        if vision_features is not None:  # shipped by the data pipeline's features mode
            return vision_features[need].to(self.projector.linear_1.weight.dtype)
        return self.connector(self.vision(pixel_values[need])).to(self.projector.linear_1.weight.dtype)

    def global_tokens(self, feats: torch.Tensor, forced_expert: int | None) -> torch.Tensor:
        """[Bi, P', Din] -> [Bi, G, D]."""
        if self.global_adapter is None:
            return self.projector(feats)
        return self.global_adapter(feats, self.projector, forced_expert)

    def visual_blocks(self, pixel_values, tile_mask, grid, has_image, text_embeds: list[torch.Tensor],
                      mode: VisualMode, gammas: list[float], forced_expert: int | None,
                      vision_features=None) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
        """Per image-bearing sample: (tokens [V, D], valid [V], kept local, local before selection), where
        tokens = [global][sep][kept local] per ``mode``."""
        batch, num_tiles = tile_mask.shape
        slot = torch.arange(num_tiles, device=tile_mask.device)[None]
        want = {"global": slot == 0, "local": slot > 0, "both": torch.ones_like(slot, dtype=torch.bool)}[mode]
        need = tile_mask.bool() & want & has_image.bool()[:, None]
        feats = self.tile_features(pixel_values, vision_features, need)  # [sum(need), P', Din]
        per_sample = feats.split(need.sum(1).tolist())
        images = [b for b in range(batch) if has_image[b]]
        glob = loc = None
        if mode in ("global", "both"):
            glob = self.global_tokens(torch.stack([per_sample[b][0] for b in images]), forced_expert)  # [Bi, G, D]
        if mode in ("local", "both"):
            first = 1 if mode == "both" else 0
            crops = torch.cat([per_sample[b][first:] for b in images])  # [sum n, P', Din]
            loc = self.compressor(crops, self.projector).split([len(per_sample[b]) - first for b in images])
        sep = self.llm.get_input_embeddings().weight[self.separator_id][None]  # [1, D]
        blocks = []
        for i, b in enumerate(images):
            parts, valid, kept_n, local_n = [], [], 0, 0
            if glob is not None:
                parts.append(glob[i])
                valid.append(torch.ones(glob.shape[1], dtype=torch.bool, device=glob.device))
            if mode == "both":
                parts.append(sep.to(glob.dtype))
                valid.append(torch.ones(1, dtype=torch.bool, device=sep.device))
            if loc is not None:
                cols, rows = (int(v) for v in grid[b])
                tokens = raster_layout(loc[i], cols, rows)  # [L, D]
                kept, ok = self.selector(tokens, text_embeds[b], gammas[b])  # [K, D]
                parts.append(kept)
                valid.append(ok)
                kept_n, local_n = int(ok.sum()), tokens.shape[0]
            blocks.append((torch.cat(parts), torch.cat(valid), kept_n, local_n))
        return blocks

    # ------------------------------------------------------------------ splice + LM

    def prepare_inputs(self, input_ids, attention_mask, pixel_values=None, tile_mask=None, grid=None,
                       instruction_mask=None, has_image=None, vision_features=None, mode: VisualMode = "both",
                       gamma=None, forced_expert=None):
        """-> (inputs_embeds [B, T, D], attention_mask [B, T], position_ids [B, T], stats dict)."""
        embed = self.llm.get_input_embeddings()
        batch = input_ids.shape[0]
        placeholders = input_ids == self.image_token_id
        # <image> may lie outside the LLM's rows (a released LLM keeps its vocabulary; upstream's
        # placeholder is id -200): its positions are overwritten below, so they embed as id 0.
        embeds = embed(input_ids.masked_fill(placeholders, 0))  # [B, T, D]
        counts = placeholders.sum(1)
        attention_mask = attention_mask.clone()
        stats = {"num_visual_tokens": counts, "kept": 0, "local": 0}
        if has_image is None:
            has_image = tile_mask.any(1) if tile_mask is not None else torch.zeros(batch, dtype=torch.bool)
        for b in range(batch):
            if not has_image[b] and counts[b]:
                raise ValueError(f"sample {b} has {int(counts[b])} <image> positions but no image")
        if has_image.any():
            gammas = self._gammas(gamma, batch)
            if instruction_mask is None:
                instruction_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            text = [embeds[b][instruction_mask[b].bool()].detach() for b in range(batch)]
            blocks = self.visual_blocks(pixel_values, tile_mask, grid, has_image, text, mode, gammas,
                                        forced_expert, vision_features)
            images = [b for b in range(batch) if has_image[b]]
            for (tokens, *_), b in zip(blocks, images):
                if tokens.shape[0] != int(counts[b]):
                    raise ValueError(f"sample {b}: the prompt has {int(counts[b])} <image> positions but the model "
                                     f"produced {tokens.shape[0]} visual tokens (mode={mode}); the processor and "
                                     f"the model disagree on the token contract")
            visual = torch.cat([blk[0] for blk in blocks]).to(embeds.dtype)
            valid = torch.cat([blk[1] for blk in blocks])
            # masked_scatter fills positions in row-major order = sample order, then sequence order.
            embeds = embeds.masked_scatter(placeholders[..., None], visual)
            attention_mask[placeholders] = valid.to(attention_mask.dtype)  # unused nucleus slots drop out
            stats.update(kept=sum(blk[2] for blk in blocks), local=sum(blk[3] for blk in blocks))
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return embeds, attention_mask, position_ids, stats

    def _gammas(self, gamma, batch: int) -> list[float]:
        if gamma is None:
            return [self.cfg.local.gamma] * batch
        if isinstance(gamma, torch.Tensor):
            return [float(g) for g in gamma.reshape(-1).tolist()] if gamma.numel() > 1 else [float(gamma)] * batch
        if isinstance(gamma, (list, tuple)):
            return [float(g) for g in gamma]
        return [float(gamma)] * batch

    def forward(self, input_ids, attention_mask, labels=None, pixel_values=None, tile_mask=None, grid=None,
                instruction_mask=None, has_image=None, vision_features=None, mode: VisualMode = "both",
                gamma=None, forced_expert=None, **batch_rest) -> SlimeOutput:
        # A misspelt key (say ``instruction_masks``) would otherwise be dropped and silently change the
        # selection; only the contract's unread fields may pass.
        unknown = sorted(set(batch_rest) - UNREAD_BATCH_KEYS)
        if unknown:
            raise TypeError(f"SlimeModel.forward got an unknown batch key {unknown[0]!r}; it takes input_ids, "
                            "attention_mask, labels, pixel_values, tile_mask, grid, instruction_mask, has_image, "
                            f"vision_features, mode, gamma, forced_expert and ignores {sorted(UNREAD_BATCH_KEYS)}")
        embeds, attn, pos, stats = self.prepare_inputs(input_ids, attention_mask, pixel_values, tile_mask, grid,
                                                       instruction_mask, has_image, vision_features, mode, gamma,
                                                       forced_expert)
        if labels is not None:
            labels = labels.masked_fill((input_ids == self.image_token_id) | (attn == 0), IGNORE_INDEX)
        out = self.llm(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, labels=labels, use_cache=False)
        frac = stats["kept"] / stats["local"] if stats["local"] else 0.0
        return SlimeOutput(out.loss, out.logits, stats["num_visual_tokens"], frac)


def set_trainable(model: nn.Module, prefixes: list[str] | tuple[str, ...]) -> list[str]:
    """Only parameters whose name starts with one of ``prefixes`` train; returns their names.
    The vision tower stays frozen whatever the prefixes say."""
    names = []
    for name, p in model.named_parameters():
        train = any(name == pre or name.startswith(pre.rstrip(".") + ".") for pre in prefixes)
        train = train and not name.startswith("vision.")
        p.requires_grad_(train)
        if train:
            names.append(name)
    if prefixes and not names:
        raise ValueError(f"trainable prefixes {list(prefixes)} match no parameter")
    return names


def build_visual_parts(cfg: ModelConfig, llm_width: int, vision_hf_config: dict | None = None,
                       vision: nn.Module | None = None) -> dict[str, nn.Module]:
    """Every SlimeModel part except the LLM, for an LLM of width ``llm_width``: the keyword arguments
    ``SlimeModel`` takes (vision, connector, projector, global_adapter, compressor, selector). Serving
    engines that bring their own LLM implementation (the vLLM adapter) build these and nothing else."""
    from slime.vision import build_vision_tower

    vision = vision if vision is not None else build_vision_tower(cfg.vision, vision_hf_config)
    connector = DenseConnector(cfg.connector, cfg.vision)
    din = connector.out_dim
    projector = MLPProjector(din, llm_width)
    global_adapter = None
    if cfg.global_branch.kind == "moa":
        # One query per global token, placed where that token sits: the gate mixes like with like.
        resampler = Resampler(connector.num_tokens, din, cfg.global_branch.num_heads, connector.positions,
                              queries_on_keys=True, pooled=connector.pooled)
        global_adapter = MixtureOfAdapters(resampler, din, cfg.global_branch.gate_noise)
    locality = LOCALITY if cfg.local.compressor == "local" else None
    compressor = QueryCompressor(Resampler(cfg.local.num_queries, din, cfg.local.num_heads, connector.positions,
                                           pooled=connector.pooled, locality=locality))
    return dict(vision=vision, connector=connector, projector=projector, global_adapter=global_adapter,
                compressor=compressor, selector=TextGuidedSelector(cfg.local))


def build_model(cfg: ModelConfig, tokenizer, *, llm_hf_config: dict | None = None,
                vision_hf_config: dict | None = None) -> SlimeModel:
    """Wire the parts: load from paths (local or s3://) or build from the config's architecture fields."""
    from slime.llm import build_llm
    from slime.vision import build_vision_tower

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no <image> token; add it with slime.tokenizer.ensure_image_token")
    separator_id = tokenizer(cfg.separator, add_special_tokens=False)["input_ids"][-1]
    vision = build_vision_tower(cfg.vision, vision_hf_config)  # before the LLM: seeded inits keep their order
    # The LLM needs rows for every token but an <image> appended after its vocabulary (see prepare_inputs).
    rows = len(tokenizer) - 1 if image_token_id == len(tokenizer) - 1 else len(tokenizer)
    llm = build_llm(cfg.llm, rows, llm_hf_config)
    width = llm.get_input_embeddings().weight.shape[1]
    parts = build_visual_parts(cfg, width, vision=vision)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    model = SlimeModel(cfg, **parts, llm=llm, image_token_id=image_token_id, separator_id=separator_id)
    return model.to(dtype)
