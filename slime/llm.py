"""The language model: any HF causal LM, loaded from a path (local or s3://) or built from config.

Tested with Llama and Qwen2 architectures. The embedding matrix grows only when the tokenizer holds more
text tokens than it has rows; an ``<image>`` added after the vocabulary never gets a row (the released
models keep exactly their LLM's vocabulary, as upstream's id -200 placeholder does).
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from slime.config import LLMConfig
from slime.storage import local_copy


def hf_llm_config(cfg: LLMConfig):
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_dim, intermediate_size=cfg.intermediate_dim,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position,
                  tie_word_embeddings=False)
    return LlamaConfig(**common) if cfg.kind == "llama" else Qwen2Config(**common)


def build_llm(cfg: LLMConfig, vocab_size: int, hf_config: dict | None = None) -> nn.Module:
    if cfg.path:
        llm = AutoModelForCausalLM.from_pretrained(local_copy(cfg.path), attn_implementation=cfg.attn_implementation)
    else:
        conf = AutoConfig.for_model(**hf_config) if hf_config else hf_llm_config(cfg)
        llm = AutoModelForCausalLM.from_config(conf, attn_implementation=cfg.attn_implementation)
    if llm.get_input_embeddings().weight.shape[0] < vocab_size:
        llm.resize_token_embeddings(vocab_size)
    return llm
