"""The decoder of the Llama family and its relatives in plain torch: Llama, Mistral, Qwen2,
Qwen3, Qwen3-MoE, Mixtral, Phi-3, Gemma 2 and Gemma 3 (text).

Runs in the scheduler process under the ModelRunner: `forward(input_ids, positions,
forward_batch) -> hidden_states [T, hidden]` over the flattened tokens of a step, attention
through the AttentionBackend's paged KV cache; `compute_logits` turns them into fp32 logits of
each sequence's last token. `load_weights` takes HF checkpoint (name, tensor) pairs and fuses
q/k/v into qkv_proj and gate/up into gate_up_proj.

Parallelism (srt.distributed): under tensor parallel each rank holds its heads (q/k/v column
parallel, o_proj row parallel), its slice of the MLP (gate/up column, down row parallel; each
expert's intermediate slice in a MoE) and its block of the vocab (embedding and lm_head); under
pipeline parallel each stage builds only its layers (`pp_layer_range`), the first the
embedding and the last the norm and lm_head, and `forward` takes and returns the (hidden,
residual) pair crossing stages.

The families differ only in `DecoderOptions`, read from the HF config by each model class's
`decoder_options` (q/k/v biases, q/k norms, Gemma's norms and scaled embeddings, attention
scale, sliding windows per layer, soft-caps, sparse-MoE layers), and in how their checkpoints
name tensors (`checkpoint_tensors`); the other model modules subclass `LlamaForCausalLM`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from srt.distributed.parallel_state import get_parallel_state, get_tp_rank, get_tp_size
from srt.layers.activation import gated_activation
from srt.layers.attention.base import AttentionBackend
from srt.layers.attention.layer import AttentionLayer
from srt.layers.linear import (
    RowParallelLinear,
    StackedLinear,
    column_parallel,
    default_weight_loader,
)
from srt.layers.logits import LogitsProcessor
from srt.layers.moe import SparseMoE
from srt.layers.norm import GemmaRMSNorm, RMSNorm
from srt.layers.quantization import GGUFWeight
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
# One expert's projection in a per-expert checkpoint -> (grouped parameter, shard kind).
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PARAM = {"gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}


@dataclass(frozen=True)
class MoEOptions:
    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    renormalize: bool  # top-k weights divided by their sum
    dense_layers: frozenset[int] = frozenset()  # layers with a dense MLP instead


@dataclass(frozen=True)
class DecoderOptions:
    """What differs between the families this decoder serves."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k, before RoPE (Qwen3, Gemma 3)
    gemma_norm: bool = False  # RMSNorms scale by (1 + weight) in fp32 (Gemma)
    sandwich_norm: bool = False  # norms after attention and around the MLP too (Gemma 2/3)
    embed_scale: float | None = None  # embeddings times this (Gemma: sqrt(hidden_size))
    hidden_act: str = "silu"
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None  # on the logits
    sliding_windows: tuple[int | None, ...] = ()  # per layer; () for none
    local_rope: bool = False  # sliding layers have their own RoPE settings (Gemma 3)
    moe: MoEOptions | None = None

    def window(self, layer_id: int) -> int | None:
        return self.sliding_windows[layer_id] if self.sliding_windows else None


def sliding_windows(config: Any) -> tuple[int | None, ...]:
    """Each layer's sliding window, as HF applies it: the layers `layer_types` calls
    "sliding_attention" when the config lists types (Gemma, Qwen2), else every layer when
    `sliding_window` is set (Mistral, Mixtral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return ()
    types = getattr(config, "layer_types", None)
    if types is None:
        return (int(window),) * config.num_hidden_layers
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _norm(opts: DecoderOptions, size: int, eps: float) -> RMSNorm:
    return GemmaRMSNorm(size, eps) if opts.gemma_norm else RMSNorm(size, eps)


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_id: int,
        opts: DecoderOptions,
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
            bias=opts.qkv_bias,
            shard_parts=[(tp, rank), (kv_parts, kv_index), (kv_parts, kv_index)],
        )
        self.o_proj = RowParallelLinear(
            total_heads * self.head_dim, config.hidden_size, bias=opts.o_bias
        )
        self.qk_norm = opts.qk_norm
        if opts.qk_norm:
            self.q_norm = _norm(opts, self.head_dim, config.rms_norm_eps)
            self.k_norm = _norm(opts, self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # one table shared by all layers (of a kind)
        self.attn = AttentionLayer(
            backend,
            layer_id,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scaling=opts.attn_scale or self.head_dim**-0.5,
            sliding_window=opts.window(layer_id),
            logit_softcap=opts.attn_softcap,
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
    def __init__(self, config: Any, opts: DecoderOptions) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        n = config.intermediate_size
        self.gate_up_proj = column_parallel(config.hidden_size, ("gate", "up"), (n, n), bias=bias)
        self.down_proj = RowParallelLinear(n, config.hidden_size, bias=bias)
        self.act_fn = gated_activation(opts.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_id: int,
        opts: DecoderOptions,
        backend: AttentionBackend,
        rotary_emb: RotaryEmbedding,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, opts, backend, rotary_emb)
        moe = opts.moe
        self.mlp: nn.Module
        if moe is not None and layer_id not in moe.dense_layers:
            self.mlp = SparseMoE(
                config.hidden_size,
                moe.intermediate_size,
                moe.num_experts,
                moe.top_k,
                moe.renormalize,
                opts.hidden_act,
            )
        else:
            self.mlp = LlamaMLP(config, opts)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = _norm(opts, size, eps)
        self.post_attention_layernorm = _norm(opts, size, eps)
        self.sandwich_norm = opts.sandwich_norm
        if opts.sandwich_norm:
            self.pre_feedforward_layernorm = _norm(opts, size, eps)
            self.post_feedforward_layernorm = _norm(opts, size, eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        forward_batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) in and out: the layer's input is their sum (residual None: the
        embeddings alone), its output likewise; the sum is taken by the next norm."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, forward_batch)
        if self.sandwich_norm:  # Gemma: norm the attention output, then the MLP's in and out
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
            return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual
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
        self, config: Any, opts: DecoderOptions, backend: AttentionBackend, max_position: int
    ) -> None:
        super().__init__()
        pp = get_parallel_state()
        self.is_first_stage, self.is_last_stage = pp.is_first_stage, pp.is_last_stage
        self.start_layer, self.end_layer = pp_layer_range(
            config.num_hidden_layers, pp.pp_size, pp.pp_rank
        )
        if self.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        scale = None
        if opts.embed_scale is not None:
            # NOTE: rounded to the model dtype, as HF does; a buffer, so a captured CUDA graph
            # reads it from the device.
            scale = torch.tensor(opts.embed_scale, dtype=torch.get_default_dtype())
        self.embed_scale: torch.Tensor | None
        self.register_buffer("embed_scale", scale, persistent=False)
        head_dim = head_dim_of(config)
        theta, scaling = rope_settings(config)
        self.rotary_emb = RotaryEmbedding(head_dim, max_position, theta, scaling)
        local_rotary = self.rotary_emb
        if opts.local_rope:  # the sliding layers' own table
            theta, scaling = rope_settings(config, "sliding_attention")
            local_rotary = RotaryEmbedding(head_dim, max_position, theta, scaling)
            self.local_rotary_emb = local_rotary
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                config, i, opts, backend, local_rotary if opts.window(i) else self.rotary_emb
            )
            if self.start_layer <= i < self.end_layer
            else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )
        if self.is_last_stage:
            self.norm = _norm(opts, config.hidden_size, config.rms_norm_eps)

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
            if self.embed_scale is not None:
                hidden_states = hidden_states * self.embed_scale
        else:
            assert intermediate is not None, "a later pipeline stage needs the hidden states"
            hidden_states, residual = intermediate
        if self.rotary_emb.long_threshold is not None:  # LongRoPE reads a table per sequence
            positions = self.rotary_emb.table_positions(positions, _seq_len_of_token(forward_batch))
        for layer in self.layers[self.start_layer : self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual, forward_batch)
        if not self.is_last_stage:
            assert residual is not None
            return hidden_states, residual
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


def _seq_len_of_token(forward_batch: ForwardBatch) -> torch.Tensor:
    """The length (after this step) of the sequence of each token of the step."""
    if forward_batch.is_decode:
        return forward_batch.seq_lens
    assert forward_batch.extend_seq_lens is not None
    return torch.repeat_interleave(forward_batch.seq_lens, forward_batch.extend_seq_lens)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, config: Any, attn_backend: AttentionBackend, max_position: int | None = None
    ) -> None:
        """`max_position`: longest sequence to support (the RoPE table); at least the model's."""
        super().__init__()
        self.config = config
        model_max = getattr(config, "max_position_embeddings", None) or 0
        max_position = max(model_max, max_position or 0) or 4096
        self.options = self.decoder_options(config)
        self.model = LlamaModel(config, self.options, attn_backend, max_position)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head: VocabParallelEmbedding | None = None
        if self.model.is_last_stage:
            if self.tie_word_embeddings and self.model.is_first_stage:
                self.lm_head = self.model.embed_tokens
            else:  # untied, or tied with the embedding on another stage: a copy of it
                self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.logits_processor = LogitsProcessor()

    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(
            qkv_bias=bias,
            o_bias=bias,
            hidden_act=getattr(config, "hidden_act", None) or "silu",
            sliding_windows=sliding_windows(config),
        )

    def checkpoint_tensors(
        self, name: str, tensor: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The (name, tensor) pairs one checkpoint tensor stands for, in this decoder's
        names: itself here; families that fuse or rename tensors override it."""
        yield name, tensor

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
        logits = self.logits_processor(hidden_states, self.lm_head, forward_batch)
        cap = self.options.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

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
        for name, tensor in weights:
            for ckpt_name, t in self.checkpoint_tensors(name, tensor):
                self._load_checkpoint_tensor(params, ckpt_name, t, loaded)
        missing = sorted(f"{n}[{s}]" if s else n for n, s in expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing)}")

    def _load_checkpoint_tensor(
        self,
        params: dict[str, nn.Parameter],
        ckpt_name: str,
        tensor: torch.Tensor,
        loaded: set[tuple[str, str | None]],
    ) -> None:
        if "rotary_emb.inv_freq" in ckpt_name:
            return  # recomputed from the config
        if self.tie_word_embeddings and ckpt_name == "lm_head.weight":
            return  # some tied checkpoints still store the (identical) copy
        targets = [ckpt_name]
        if self.tie_word_embeddings and ckpt_name == "model.embed_tokens.weight":
            targets = [n for n in (ckpt_name, "lm_head.weight") if n in params]
        if not self._on_this_stage(ckpt_name):
            return
        for target in targets:
            self._load_one(params, target, ckpt_name, tensor, loaded)

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
        expert = _EXPERT.match(name)
        if isinstance(tensor, GGUFWeight) and (
            expert is not None or name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        ):
            tensor = tensor.dequantize()  # NOTE: MoE experts stay dense
        if expert is not None:  # one expert's projection into the grouped tensor
            prefix, e, proj = expert.groups()
            grouped, kind = _EXPERT_PARAM.get(proj, ("down_proj", "down"))
            param = self._param(params, f"{prefix}.{grouped}", ckpt_name)
            param.weight_loader(param, tensor, f"{e}.{kind}")
            loaded.add((f"{prefix}.{grouped}", f"{e}.{kind}"))
            return
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):  # grouped already
            param = self._param(params, name, ckpt_name)
            param.weight_loader(param, tensor, None)
            loaded.update((name, s) for s in param.shard_ids)
            return
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
    """Llama with a sliding window on every layer when the config sets `sliding_window`."""
