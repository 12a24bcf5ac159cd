"""Qwen2 / Qwen2.5: the Llama decoder with biases on the q/k/v projections (none on o_proj)."""

from __future__ import annotations

from typing import Any

from srt.models.llama import AttentionVariant, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_variant(cls, config: Any) -> AttentionVariant:
        return AttentionVariant(qkv_bias=True, o_bias=False)
