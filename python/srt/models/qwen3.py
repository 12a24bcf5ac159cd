"""Qwen3: the Llama decoder with per-head RMSNorm on q and k (before RoPE) and an explicit
head_dim (which may differ from hidden_size / num_heads)."""

from __future__ import annotations

from typing import Any

from srt.models.llama import AttentionVariant, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_variant(cls, config: Any) -> AttentionVariant:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionVariant(qkv_bias=bias, o_bias=bias, qk_norm=True)
