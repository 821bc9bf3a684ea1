"""vLLM general plugin (entry point ``vllm.general_plugins: slime``): registers SliME's config with
transformers and its model class with vLLM, in every process that builds an engine (API server,
engine core, Ray replicas). Light on purpose: the model module is registered by name and imported by
vLLM only when an engine loads it.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from slime.config import ModelConfig, from_dict

ARCHITECTURE = "SlimeForConditionalGeneration"
LLM_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class SlimeVllmConfig(PretrainedConfig):
    """``config.json`` of the vLLM view of a checkpoint: the slime config, the LLM's HF config as
    ``text_config`` (what vLLM sizes the KV cache from), the vision config and the token ids."""

    model_type = "slime"

    def __init__(self, slime: dict | None = None, text_config: dict | PretrainedConfig | None = None,
                 vision_config: dict | None = None, image_token_id: int = 0, separator_id: int = 0,
                 visual_mode: str = "both", **kwargs) -> None:
        self.slime = slime or {}
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.vision_config = vision_config or {}
        self.image_token_id = image_token_id
        self.separator_id = separator_id
        self.visual_mode = visual_mode
        super().__init__(**kwargs)

    def get_text_config(self, decoder: bool = False, encoder: bool = False) -> PretrainedConfig:
        return self.text_config

    def model_cfg(self) -> ModelConfig:
        return from_dict(ModelConfig, self.slime)


def register() -> None:
    from vllm import ModelRegistry

    try:
        AutoConfig.register(SlimeVllmConfig.model_type, SlimeVllmConfig)
    except ValueError:  # already registered in this process
        pass
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"pipelines.serve.vllm_model:{ARCHITECTURE}")
