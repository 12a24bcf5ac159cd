"""Qwen3: the Llama decoder with per-head RMSNorm on q and k (before RoPE) and an explicit
head_dim (which may differ from hidden_size / num_heads)."""

from __future__ import annotations

import dataclasses
from typing import Any

from srt.models.llama import DecoderOptions, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        return dataclasses.replace(super().decoder_options(config), qk_norm=True)
