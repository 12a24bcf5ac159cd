"""Llama-family decoder (Llama, Mistral, SmolLM; the base of Qwen2 and Qwen3) in plain torch.

Runs in the scheduler process under the ModelRunner: `forward(input_ids, positions,
forward_batch) -> hidden_states [T, hidden]` over the flattened tokens of a step, attention
through the AttentionBackend's paged KV cache; `compute_logits` turns them into fp32 logits of
each sequence's last token. `load_weights` takes HF checkpoint (name, tensor) pairs and fuses
q/k/v into qkv_proj and gate/up into gate_up_proj.

Parallelism (srt.distributed): under tensor parallel each rank holds its heads (q/k/v column
parallel, o_proj row parallel), its slice of the MLP (gate/up column, down row parallel) and
its block of the vocab (embedding and lm_head); under pipeline parallel each stage builds only
its layers (`pp_layer_range`), the first the embedding and the last the norm and lm_head, and
`forward` takes and returns the (hidden, residual) pair crossing stages.

Variants differ only in `AttentionVariant` (q/k/v bias, per-head q/k RMSNorm); the Qwen
modules subclass `LlamaForCausalLM` and override `attention_variant`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from srt.distributed.parallel_state import get_parallel_state, get_tp_rank, get_tp_size
from srt.layers.activation import SiluAndMul
from srt.layers.attention.base import AttentionBackend
from srt.layers.attention.layer import AttentionLayer
from srt.layers.linear import (
    RowParallelLinear,
    StackedLinear,
    column_parallel,
    default_weight_loader,
)
from srt.layers.logits import LogitsProcessor
from srt.layers.norm import RMSNorm
from srt.layers.rotary import RotaryEmbedding, rope_settings
from srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
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
        tp, rank = get_tp_size(), get_tp_rank()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        if total_heads % tp:
            raise ValueError(f"{total_heads} attention heads are not divisible by --tp-size {tp}")
        if total_kv_heads >= tp:
            if total_kv_heads % tp:
                raise ValueError(f"{total_kv_heads} KV heads are not divisible by --tp-size {tp}")
            kv_parts, kv_index = tp, rank
        else:  # more ranks than KV heads: each KV head is replicated on tp / kv ranks
            if tp % total_kv_heads:
                raise ValueError(
                    f"--tp-size {tp} is not a multiple of the {total_kv_heads} KV heads"
                )
            kv_parts, kv_index = total_kv_heads, rank // (tp // total_kv_heads)
        self.num_heads = total_heads // tp
        self.num_kv_heads = total_kv_heads // kv_parts
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = StackedLinear(
            config.hidden_size,
            ("q", "k", "v"),
            (self.q_size, self.kv_size, self.kv_size),
            bias=variant.qkv_bias,
            shard_parts=[(tp, rank), (kv_parts, kv_index), (kv_parts, kv_index)],
        )
        self.o_proj = RowParallelLinear(
            total_heads * self.head_dim, config.hidden_size, bias=variant.o_bias
        )
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
        self.gate_up_proj = column_parallel(config.hidden_size, ("gate", "up"), (n, n), bias=bias)
        self.down_proj = RowParallelLinear(n, config.hidden_size, bias=bias)
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


class PPMissingLayer(nn.Module):
    """Stands in for a layer another pipeline stage holds (keeps the layer indices)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this layer belongs to another pipeline stage")


def pp_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """Layers [start, end) of stage `pp_rank`: an even split, the later stages one more."""
    if pp_size > num_layers:
        raise ValueError(f"--pp-size {pp_size} exceeds the model's {num_layers} layers")
    return (pp_rank * num_layers // pp_size, (pp_rank + 1) * num_layers // pp_size)


class LlamaModel(nn.Module):
    def __init__(
        self, config: Any, variant: AttentionVariant, backend: AttentionBackend, max_position: int
    ) -> None:
        super().__init__()
        pp = get_parallel_state()
        self.is_first_stage, self.is_last_stage = pp.is_first_stage, pp.is_last_stage
        self.start_layer, self.end_layer = pp_layer_range(
            config.num_hidden_layers, pp.pp_size, pp.pp_rank
        )
        if self.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        theta, scaling = rope_settings(config)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), max_position, theta, scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, variant, backend, self.rotary_emb)
            if self.start_layer <= i < self.end_layer
            else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )
        if self.is_last_stage:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The last stage returns the final hidden states; the others (hidden, residual) for
        the next stage, which passes them as `intermediate`."""
        residual: torch.Tensor | None
        if self.is_first_stage:
            hidden_states, residual = self.embed_tokens(input_ids), None
        else:
            assert intermediate is not None, "a later pipeline stage needs the hidden states"
            hidden_states, residual = intermediate
        for layer in self.layers[self.start_layer : self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual, forward_batch)
        if not self.is_last_stage:
            assert residual is not None
            return hidden_states, residual
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
        self.lm_head: VocabParallelEmbedding | None = None
        if self.model.is_last_stage:
            if self.tie_word_embeddings and self.model.is_first_stage:
                self.lm_head = self.model.embed_tokens
            else:  # untied, or tied with the embedding on another stage: a copy of it
                self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.logits_processor = LogitsProcessor()

    @classmethod
    def attention_variant(cls, config: Any) -> AttentionVariant:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionVariant(qkv_bias=bias, o_bias=bias)

    @property
    def layer_range(self) -> tuple[int, int]:
        return self.model.start_layer, self.model.end_layer

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads this rank's attention layers hold (and its KV pool stores)."""
        return self.model.layers[self.model.start_layer].self_attn.num_kv_heads

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.model(input_ids, positions, forward_batch, intermediate)

    def compute_logits(
        self, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        assert self.lm_head is not None, "only the last pipeline stage computes logits"
        return self.logits_processor(hidden_states, self.lm_head, forward_batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies this rank's part of the HF checkpoint tensors into the parameters; every
        parameter must be covered. Tensors of other pipeline stages are skipped."""
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
            targets = [ckpt_name]
            if self.tie_word_embeddings and ckpt_name == "model.embed_tokens.weight":
                targets = [n for n in (ckpt_name, "lm_head.weight") if n in params]
            if not self._on_this_stage(ckpt_name):
                continue
            for target in targets:
                self._load_one(params, target, ckpt_name, tensor, loaded)
        missing = sorted(f"{n}[{s}]" if s else n for n, s in expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing)}")

    def _on_this_stage(self, ckpt_name: str) -> bool:
        m = self.model
        if ckpt_name.startswith("model.layers."):
            index = ckpt_name.split(".")[2]
            return index.isdigit() and m.start_layer <= int(index) < m.end_layer
        if ckpt_name.startswith("model.embed_tokens."):
            return m.is_first_stage or (m.is_last_stage and self.tie_word_embeddings)
        if ckpt_name.startswith(("model.norm.", "lm_head.")):
            return m.is_last_stage
        return True  # anything else must match a parameter (or fail loudly below)

    def _load_one(
        self,
        params: dict[str, nn.Parameter],
        name: str,
        ckpt_name: str,
        tensor: torch.Tensor,
        loaded: set[tuple[str, str | None]],
    ) -> None:
        for fused, proj, shard in STACKED_PARAMS:
            if f".{proj}." in name:
                fused_name = name.replace(f".{proj}.", f".{fused}.")
                param = self._param(params, fused_name, ckpt_name)
                param.weight_loader(param, tensor, shard)
                loaded.add((fused_name, shard))
                return
        param = self._param(params, name, ckpt_name)
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        loaded.add((name, None))

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
