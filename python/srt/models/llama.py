"""Llama-family decoder (Llama, Mistral, SmolLM; the base of Qwen2 and Qwen3) in plain torch.

Runs in the scheduler process under the ModelRunner: `forward(input_ids, positions,
forward_batch) -> hidden_states [T, hidden]` over the flattened tokens of a step, attention
through the AttentionBackend's paged KV cache; `compute_logits` turns them into fp32 logits of
each sequence's last token. `load_weights` takes HF checkpoint (name, tensor) pairs and fuses
q/k/v into qkv_proj and gate/up into gate_up_proj.

Variants differ only in `AttentionVariant` (q/k/v bias, per-head q/k RMSNorm); the Qwen
modules subclass `LlamaForCausalLM` and override `attention_variant`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from srt.layers.activation import SiluAndMul
from srt.layers.attention.base import AttentionBackend
from srt.layers.attention.layer import AttentionLayer
from srt.layers.linear import Linear, StackedLinear, default_weight_loader
from srt.layers.logits import LogitsProcessor
from srt.layers.norm import RMSNorm
from srt.layers.rotary import RotaryEmbedding, rope_settings
from srt.model_executor.forward_batch import ForwardBatch

# (fused parameter, checkpoint projection, shard id)
STACKED_PARAMS = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", "gate"),
    ("gate_up_proj", "up_proj", "up"),
)


@dataclass(frozen=True)
class AttentionVariant:
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k, before RoPE (Qwen3)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_id: int,
        variant: AttentionVariant,
        backend: AttentionBackend,
        rotary_emb: RotaryEmbedding,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = StackedLinear(
            config.hidden_size,
            ("q", "k", "v"),
            (self.q_size, self.kv_size, self.kv_size),
            bias=variant.qkv_bias,
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=variant.o_bias)
        self.qk_norm = variant.qk_norm
        if variant.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # one table shared by all layers
        self.attn = AttentionLayer(
            backend,
            layer_id,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scaling=self.head_dim**-0.5,
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        n = hidden_states.shape[0]
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, forward_batch))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: only silu is implemented")
        bias = bool(getattr(config, "mlp_bias", False))
        n = config.intermediate_size
        self.gate_up_proj = StackedLinear(config.hidden_size, ("gate", "up"), (n, n), bias=bias)
        self.down_proj = Linear(n, config.hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_id: int,
        variant: AttentionVariant,
        backend: AttentionBackend,
        rotary_emb: RotaryEmbedding,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, variant, backend, rotary_emb)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        forward_batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, forward_batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(
        self, config: Any, variant: AttentionVariant, backend: AttentionBackend, max_position: int
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size),
            _freeze=True,
        )
        theta, scaling = rope_settings(config)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), max_position, theta, scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, variant, backend, self.rotary_emb)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, forward_batch)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, config: Any, attn_backend: AttentionBackend, max_position: int | None = None
    ) -> None:
        """`max_position`: longest sequence to support (the RoPE table); at least the model's."""
        super().__init__()
        self.config = config
        model_max = getattr(config, "max_position_embeddings", None) or 0
        max_position = max(model_max, max_position or 0) or 4096
        self.model = LlamaModel(config, self.attention_variant(config), attn_backend, max_position)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.logits_processor = LogitsProcessor()

    @classmethod
    def attention_variant(cls, config: Any) -> AttentionVariant:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionVariant(qkv_bias=bias, o_bias=bias)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        return self.model(input_ids, positions, forward_batch)

    def compute_logits(
        self, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        return self.logits_processor(hidden_states, self.lm_head.weight, forward_batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF checkpoint tensors into the parameters; every parameter must be covered."""
        params = dict(self.named_parameters())  # a tied lm_head shares embed_tokens' entry
        expected = {
            (name, shard)
            for name, p in params.items()
            for shard in getattr(p, "shard_ids", (None,))
        }
        loaded: set[tuple[str, str | None]] = set()
        for ckpt_name, tensor in weights:
            if "rotary_emb.inv_freq" in ckpt_name:
                continue  # recomputed from the config
            if self.tie_word_embeddings and ckpt_name == "lm_head.weight":
                continue  # some tied checkpoints still store the (identical) copy
            for fused, proj, shard in STACKED_PARAMS:
                if f".{proj}." in ckpt_name:
                    name = ckpt_name.replace(f".{proj}.", f".{fused}.")
                    param = self._param(params, name, ckpt_name)
                    param.weight_loader(param, tensor, shard)
                    loaded.add((name, shard))
                    break
            else:
                default_weight_loader(self._param(params, ckpt_name, ckpt_name), tensor)
                loaded.add((ckpt_name, None))
        missing = sorted(f"{n}[{s}]" if s else n for n, s in expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing)}")

    @staticmethod
    def _param(params: dict[str, nn.Parameter], name: str, ckpt_name: str) -> nn.Parameter:
        try:
            return params[name]
        except KeyError:
            raise ValueError(
                f"checkpoint weight {ckpt_name!r} matches no model parameter"
            ) from None


class MistralForCausalLM(LlamaForCausalLM):
    pass
