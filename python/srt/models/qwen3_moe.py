"""Qwen3-MoE: Qwen3's attention (q/k norms) with a sparse MoE in place of the MLP
(srt.layers.moe): softmax over `num_experts`, the top k kept, renormalised when
`norm_topk_prob`. Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` grid,
keep a dense MLP of `intermediate_size`."""

from __future__ import annotations

import dataclasses
from typing import Any

from srt.models.llama import DecoderOptions, MoEOptions
from srt.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        num_experts = config.num_experts
        step = getattr(config, "decoder_sparse_step", 1) or 1
        only_mlp = set(getattr(config, "mlp_only_layers", None) or ())
        dense = frozenset(
            i
            for i in range(config.num_hidden_layers)
            if i in only_mlp or not (num_experts > 0 and (i + 1) % step == 0)
        )
        moe = MoEOptions(
            num_experts=num_experts,
            top_k=config.num_experts_per_tok,
            intermediate_size=config.moe_intermediate_size,
            renormalize=bool(getattr(config, "norm_topk_prob", False)),
            dense_layers=dense,
        )
        return dataclasses.replace(super().decoder_options(config), moe=moe)
