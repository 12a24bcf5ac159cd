"""Mixtral: the Llama decoder with a sparse MoE in place of the MLP (srt.layers.moe): top-k of
`num_local_experts` experts per token, weights a softmax over the chosen experts' logits.
Checkpoints name the block `block_sparse_moe` and the expert projections w1 (gate), w3 (up)
and w2 (down); `checkpoint_tensors` renames them to the decoder's names."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import torch

from srt.models.llama import DecoderOptions, LlamaForCausalLM, MoEOptions

_MIXTRAL_EXPERT = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.")
_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


class MixtralForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        moe = MoEOptions(
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            intermediate_size=config.intermediate_size,
            renormalize=True,
        )
        return dataclasses.replace(super().decoder_options(config), moe=moe)

    def checkpoint_tensors(
        self, name: str, tensor: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        name = _MIXTRAL_EXPERT.sub(lambda m: f".mlp.experts.{m[1]}.{_PROJ[m[2]]}.", name)
        yield name.replace(".block_sparse_moe.", ".mlp."), tensor
