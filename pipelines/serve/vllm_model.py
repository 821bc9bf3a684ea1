"""SliME as an out-of-tree vLLM multimodal model (read like vLLM's own ``models/llava.py``).

    SlimeProcessingInfo          limits (one image per prompt) and token counts: ``count_visual_tokens``
    SlimeDummyInputsBuilder      the image with the most visual tokens, for vLLM's memory profiling
    SlimeMultiModalProcessor     tiles + normalises with ``SlimeProcessor``; puts the question's
                                 instruction ids and the resolved gamma into the per-image processor
                                 kwargs; expands the single ``<image>`` to the contract's count
    SlimeForConditionalGeneration  the ``slime`` modules (vision tower, Dense Connector, projector,
                                 mixture of adapters, query compressor, text-guided selector) wrapped
                                 as they are, plus vLLM's own Llama / Qwen2 as the language model

Caching trap: vLLM's multimodal hash (processor cache, encoder cache, prefix-cache blocks) covers the
image and the processor kwargs, never the prompt. SliME's visual tokens depend on the question, so
``apply`` always writes the instruction ids (and the gamma, resolved to a number) into the kwargs before
vLLM hashes them; a second question about the same image therefore gets its own selection.

Instruction ids: our front end (``pipelines.serve.engine``) sends exactly the ids ``SlimeProcessor`` marks
as the user's text (the same ones the HF ``Predictor`` scores against). A raw client that sends none
gets them derived from the prompt: the tokens after ``<image>`` and its newline, up to the generation
header (exact for the usual single-turn prompt).

vLLM-only: this file lives in ``pipelines/`` and ``slime/`` never imports vLLM.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature

from vllm.config import VllmConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement, PromptUpdate)
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsLoRA, SupportsMultiModal
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model

from pipelines.serve import timings
from pipelines.serve.vllm_plugin import ARCHITECTURE, SlimeVllmConfig
from slime.config import ModelConfig
from slime.model import SlimeModel, build_visual_parts
from slime.processing import SlimeProcessor
from slime.templates import IMAGE, render
from slime.tiling import count_visual_tokens

__all__ = ["ARCHITECTURE", "SlimeForConditionalGeneration"]


# --------------------------------------------------------------------------- processing


class SlimeProcessingInfo(BaseProcessingInfo):
    """One per engine. What depends only on the checkpoint is built once here: the parsed config, the
    processor (its constructor reads the tokenizer's vocabulary) and the largest-image size (a scan of 64
    sizes); every request used to rebuild them (issue 23: ~0.8 ms of parsing and processor set-up per call)."""

    def get_hf_config(self) -> SlimeVllmConfig:
        return self.ctx.get_hf_config(SlimeVllmConfig)

    @functools.cached_property
    def model_cfg(self) -> ModelConfig:
        return self.get_hf_config().model_cfg()

    @functools.cached_property
    def _processor(self) -> SlimeProcessor:
        return SlimeProcessor(self.model_cfg, self.get_tokenizer())

    def get_hf_processor(self, **kwargs: object) -> SlimeProcessor:
        return self._processor

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"images_kwargs": set()}  # gamma / instruction_ids stay flat: we consume them ourselves

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": 1}  # SliME is a single-image model

    def get_num_image_tokens(self, *, image_width: int, image_height: int, gamma: float | None = None) -> int:
        return count_visual_tokens(image_width, image_height, self.model_cfg, gamma,
                                   self.get_hf_config().visual_mode).total_tokens

    @functools.cached_property
    def _most_features(self) -> ImageSize:
        side = self.model_cfg.vision.image_size
        sizes = [(w * side, h * side) for w in range(1, 9) for h in range(1, 9)]
        w, h = max(sizes, key=lambda s: self.get_num_image_tokens(image_width=s[0], image_height=s[1], gamma=1.0))
        return ImageSize(width=w, height=h)

    def get_image_size_with_most_features(self) -> ImageSize:
        return self._most_features

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        size = self.get_image_size_with_most_features()
        return {"image": self.get_num_image_tokens(image_width=size.width, image_height=size.height, gamma=1.0)}


class SlimeDummyInputsBuilder(BaseDummyInputsBuilder[SlimeProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        return {"image": self._get_dummy_images(width=size.width, height=size.height,
                                                num_images=mm_counts.get("image", 0),
                                                overrides=(mm_options or {}).get("image"))}


def derive_instruction_ids(prompt: list[int], cfg: ModelConfig, tokenizer, image_token_id: int) -> list[int]:
    """For prompts that arrive without ``instruction_ids``: the ids after ``<image>`` (and the newline
    the template puts after it) up to what the template writes after a question (end of turn and
    generation header); with ``local.text='prompt'`` every id but the image's."""
    if image_token_id not in prompt:
        return []
    if cfg.local.text == "prompt":  # upstream scores against the whole prompt but the image
        return [i for i in prompt if i != image_token_id]
    start = prompt.index(image_token_id) + 1
    while start < len(prompt) and prompt[start] == image_token_id:
        start += 1
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if prompt[start:start + len(newline)] == newline:
        start += len(newline)
    # What the template writes after the question (end of turn, generation header), token by token.
    segments = render(cfg.template, [{"role": "user", "content": IMAGE + "\nx"}], for_generation=True)
    last = max((i for i, seg in enumerate(segments) if seg.instruction), default=len(segments) - 1)
    tail = [i for seg in segments[last + 1:] for i in tokenizer(seg.text, add_special_tokens=False)["input_ids"]]
    end = len(prompt) - len(tail) if tail and prompt[-len(tail):] == tail else len(prompt)
    return list(prompt[start:max(start, end)])


class SlimeMultiModalProcessor(BaseMultiModalProcessor[SlimeProcessingInfo]):
    def apply(self, inputs, timing_ctx):
        # Before vLLM hashes the kwargs (see the module docstring): instruction ids + resolved gamma.
        hf, cfg = self.info.get_hf_config(), self.info.model_cfg
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        gamma = kwargs.get("gamma")
        gamma = cfg.local.gamma if gamma is None else float(gamma)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        ids = kwargs.get("instruction_ids")
        if ids is None:
            ids = derive_instruction_ids(list(inputs.prompt), cfg, self.info.get_tokenizer(), hf.image_token_id)
        kwargs.update(gamma=gamma, instruction_ids=[int(i) for i in ids])
        with timings.timed("mm_processor"):  # free unless SLIME_SERVE_TIMINGS is set
            return super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        processor = self.info.get_hf_processor()
        images = hf_data.get("images", [])
        tiles = [processor.image_inputs(img.convert("RGB")) for img in images]
        ids = torch.tensor([int(i) for i in hf_kwargs.get("instruction_ids", [])], dtype=torch.long)
        n = len(tiles)
        return BatchFeature({
            "pixel_values": torch.stack([torch.from_numpy(t["pixel_values"]) for t in tiles]),  # [n, M, 3, S, S]
            "tile_mask": torch.stack([torch.from_numpy(t["tile_mask"]) for t in tiles]),  # [n, M]
            "grid": torch.stack([torch.from_numpy(t["grid"]) for t in tiles]),  # [n, 2]
            "instruction_ids": ids[None].expand(n, -1).clone(),  # [n, T]
            "gamma": torch.full((n,), float(hf_kwargs.get("gamma", 1.0)), dtype=torch.float64),
        })

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        fields = ("pixel_values", "tile_mask", "grid", "instruction_ids", "gamma")
        return {name: MultiModalFieldConfig.batched("image") for name in fields}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id
        gamma = hf_processor_mm_kwargs.get("gamma")

        def replacement(item_idx: int) -> list[int]:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            n = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height, gamma=gamma)
            return [image_token_id] * n

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


# --------------------------------------------------------------------------- model


class _EmbeddingTable:
    """What ``SlimeModel`` needs of its LLM outside the forward pass (the separator's embedding row),
    pointing at vLLM's embedding. A plain object on purpose: the LLM stays registered only once, as
    ``language_model``."""

    def __init__(self, language_model: nn.Module) -> None:
        self._lm = language_model

    def get_input_embeddings(self) -> nn.Module:
        # With LoRA enabled vLLM wraps the table; the wrapper maps rows to the scheduled batch's tokens, so
        # the question's ids (not part of the batch) go through the plain table: adapters never touch it.
        embed = self._lm.model.embed_tokens
        return getattr(embed, "base_layer", embed)


@MULTIMODAL_REGISTRY.register_processor(SlimeMultiModalProcessor, info=SlimeProcessingInfo,
                                        dummy_inputs=SlimeDummyInputsBuilder)
class SlimeForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsLoRA):
    # Checkpoint names are SlimeModel's (slime.checkpoint.save_pretrained); the LLM is vLLM's own. A LoRA
    # adapter (slime.lora: a PEFT adapter of the HF LLM alone) names the LLM's modules without ``llm.``:
    # ``model.layers.0.self_attn.q_proj`` -> ``language_model.model.layers.0.self_attn.q_proj``.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "llm.": "language_model.",
        "model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
        **{f"{part}.": f"slime.{part}." for part in ("vision", "connector", "projector", "global_adapter",
                                                      "compressor", "selector")},
    })
    # vLLM's Llama and Qwen2 fuse these projections; a LoRA on q/k/v (gate/up) lands on the fused layer's slices
    packed_modules_mapping = {  # noqa: RUF012 (vLLM reads it as a class attribute, like its own models)
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def get_mm_mapping(self) -> MultiModelKeys:
        """LoRA adapts the language model only; the visual modules are the base's (slime.lora's rule for vLLM)."""
        return MultiModelKeys.from_string_field(language_model="language_model", connector="slime.projector",
                                                tower_model="slime.vision")

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE
        raise ValueError("only images are supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: SlimeVllmConfig = vllm_config.model_config.hf_config
        cfg = config.model_cfg()
        if cfg.local.selection != "topk":
            # Nucleus selection masks unused slots out of attention; vLLM has no per-token attention mask.
            raise NotImplementedError("the vLLM engine serves local.selection='topk' only; use the HF Predictor")
        self.config, self.mode = config, config.visual_mode
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size,
                                         mm_token_ids=[config.image_token_id])
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(vllm_config=vllm_config, hf_config=config.text_config,
                                                             prefix=f"{prefix}.language_model" if prefix
                                                             else "language_model")
        with self._mark_tower_model(vllm_config, "image"):
            parts = build_visual_parts(cfg, config.text_config.hidden_size, config.vision_config)
            self.slime = SlimeModel(cfg, **parts, llm=_EmbeddingTable(self.language_model),
                                    image_token_id=config.image_token_id, separator_id=config.separator_id).eval()
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        tile_mask, grid, gamma = kwargs["tile_mask"], kwargs["grid"], kwargs["gamma"]
        ids = kwargs["instruction_ids"]  # a tensor [N, T] when lengths agree, else a list of [T_i]
        ids = list(ids) if isinstance(ids, (list, tuple)) or ids.dim() == 2 else [ids]
        pixel_values = pixel_values if isinstance(pixel_values, torch.Tensor) else torch.stack(list(pixel_values))
        tile_mask = tile_mask if isinstance(tile_mask, torch.Tensor) else torch.stack(list(tile_mask))
        grid = grid if isinstance(grid, torch.Tensor) else torch.stack(list(grid))
        gammas = [float(g) for g in (gamma.tolist() if isinstance(gamma, torch.Tensor) else gamma)]
        table = self.slime.llm.get_input_embeddings()
        text = [table(i.to(pixel_values.device).long()) for i in ids]
        has_image = torch.ones(pixel_values.shape[0], dtype=torch.bool, device=pixel_values.device)
        with timings.timed("visual", items=pixel_values.shape[0]):  # free unless SLIME_SERVE_TIMINGS is set
            blocks = self.slime.visual_blocks(pixel_values, tile_mask.bool(), grid, has_image, text, self.mode,
                                              gammas, forced_expert=None)
        return [tokens for tokens, *_ in blocks]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
