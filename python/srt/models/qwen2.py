"""Qwen2 / Qwen2.5: the Llama decoder with biases on the q/k/v projections (none on o_proj)."""

from __future__ import annotations

import dataclasses
from typing import Any

from srt.models.llama import DecoderOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        base = super().decoder_options(config)
        return dataclasses.replace(base, qkv_bias=True, o_bias=False)
