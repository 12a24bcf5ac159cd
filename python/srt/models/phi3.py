"""Phi-3 (and Phi-3.5 / Phi-4-mini, same architecture): the Llama decoder, with q/k/v stored as
one fused `qkv_proj` tensor and gate/up as one `gate_up_proj` in the checkpoint, and LongRoPE
("longrope" / "su") scaling in the long-context variants (srt.layers.rotary).

The fused tensors are cut into their projections at load (`checkpoint_tensors`), so tensor
parallel takes each rank's heads and MLP slice from them like from separate ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from srt.models.llama import LlamaForCausalLM, head_dim_of


class Phi3ForCausalLM(LlamaForCausalLM):
    def checkpoint_tensors(
        self, name: str, tensor: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.config
        if name.endswith(".self_attn.qkv_proj.weight"):
            d = head_dim_of(cfg)
            q = cfg.num_attention_heads * d
            kv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * d
            if tensor.shape[0] != q + 2 * kv:
                raise ValueError(
                    f"{name} has {tensor.shape[0]} rows; q, k and v need {q} + {kv} + {kv}"
                )
            parts = tensor.split([q, kv, kv])
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                yield name.replace(".qkv_proj.", f".{proj}."), part
        elif name.endswith(".mlp.gate_up_proj.weight"):
            n = cfg.intermediate_size
            if tensor.shape[0] != 2 * n:
                raise ValueError(f"{name} has {tensor.shape[0]} rows; gate and up need 2 x {n}")
            gate, up = tensor.split([n, n])
            yield name.replace(".gate_up_proj.", ".gate_proj."), gate
            yield name.replace(".gate_up_proj.", ".up_proj."), up
        else:
            yield name, tensor
