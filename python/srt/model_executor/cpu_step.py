"""CpuStepRunner: decode and prefill steps of a CPU model as one native call each, in the
scheduler process.

The CPU's counterpart of the CudaGraphRunner. A step of the torch forward is a few hundred
small operations; for the models srt runs on a CPU each one's Python and dispatch cost exceeds
its arithmetic, and its kernel either runs on one core or wakes a thread pool for microseconds
of work. srt-kernels' decoder (`srt._native.NativeDecoder`) runs the whole step (embedding,
layers, final norm, logits) in one call, on a team of threads that walks the step's operations
together, with the same kernels the layers call one by one. For the GGUF formats its logits are
bit for bit those of the torch forward, in decode and in prefill.

Built by the ModelRunner once the KV pool is bound (`maybe_create`): it reads the model's
modules once (numpy views of the weights and of the KV pool, shared, not copied), then
`can_run(batch)` / `run(batch)` stand in for the forward of a decode batch of up to
`MAX_BATCH` sequences, or of any extend (prefill) batch, which computes the logits of each
sequence's last token and of the batch's `extra_logit_indices` only. It applies to the
Llama-family decoder (`models/llama.py`) with GGUF weights (`--quantization gguf`, or `auto`
where it picks them) in float32, on one process; other models and setups keep the torch
forward and the log says why. `--disable-native-decode` turns it off.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from srt.cpu_share import CoreShare
from srt.layers.activation import GeluAndMul, SiluAndMul
from srt.layers.attention.torch_native import TorchNativeAttnBackend
from srt.layers.norm import GemmaRMSNorm, RMSNorm
from srt.layers.quantization import GGUFBlocks
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.native_step import NativeStep
from srt.models.llama import LlamaForCausalLM, LlamaMLP

if TYPE_CHECKING:
    from srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Larger decode batches take the torch forward. Measured on the default model (2 threads):
# 56 / 95 / 186 ms a step at 32 / 64 / 128 sequences, against the torch forward's 92 / 206 /
# 271 (its GGUF layers multiply dequantized weights above 32 rows).
MAX_BATCH = 256
# KV pool dtypes the native step reads, as numpy sees them.
_POOL_VIEWS = {torch.float32: torch.float32, torch.bfloat16: torch.int16}


class CpuStepRunner:
    def __init__(self, runner: ModelRunner, model: LlamaForCausalLM) -> None:
        self.max_bs = MAX_BATCH
        # NOTE: a bf16 pool crosses as its int16 bits (numpy has no bfloat16).
        view = _POOL_VIEWS[runner.kv_pool.dtype]
        kv = [
            (k.view(view).numpy(), v.view(view).numpy())
            for k, v in zip(runner.kv_pool.k_buffers, runner.kv_pool.v_buffers, strict=True)
        ]
        self.step = NativeStep(model_spec(model), kv, runner.req_to_token_pool.req_to_token.numpy())
        self.share = CoreShare(torch.get_num_threads(), fixed=runner.server_args.fixed_threads)

    @classmethod
    def maybe_create(cls, runner: ModelRunner) -> CpuStepRunner | None:
        reason = unsupported(runner)
        if reason is not None:
            if runner.device.type == "cpu":
                logger.info("native CPU step off: %s", reason)
            return None
        assert isinstance(runner.model, LlamaForCausalLM)
        return cls(runner, runner.model)

    def can_run(self, batch: ForwardBatch) -> bool:
        return 0 < batch.batch_size and (not batch.is_decode or batch.batch_size <= self.max_bs)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits of the batch as the torch forward returns them (each sequence's last
        token, then an extend batch's `extra_logit_indices`); the tokens' K/V go to the pool."""
        seq_lens = batch.seq_lens_cpu
        if seq_lens is None:
            seq_lens = batch.seq_lens.numpy()
        prefix, extend = batch.extend_prefix_lens_cpu, batch.extend_seq_lens_cpu
        if not batch.is_decode and (prefix is None or extend is None):
            assert batch.extend_prefix_lens is not None and batch.extend_seq_lens is not None
            prefix, extend = batch.extend_prefix_lens.numpy(), batch.extend_seq_lens.numpy()
        extra = batch.extra_logit_indices
        logits = self.step.forward(
            batch.is_decode,
            batch.input_ids.numpy(),
            batch.positions.numpy(),
            batch.out_cache_loc.numpy(),
            batch.req_pool_indices.numpy(),
            seq_lens,
            prefix,
            extend,
            None if extra is None else extra.numpy(),
            self.share.threads(),
        )
        return torch.from_numpy(logits)


def unsupported(runner: ModelRunner) -> str | None:
    """Why the native step does not apply to this runner's model, or None."""
    model = runner.model
    if runner.server_args.disable_native_decode:
        return "--disable-native-decode"
    if runner.device.type != "cpu":
        return "not on a CPU"
    if runner.parallel.world_size > 1:
        return "tensor / pipeline parallel"
    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-family decoder"
    if runner.dtype != torch.float32:
        return f"dtype {runner.dtype} (the native step runs float32 GGUF models)"
    if runner.kv_pool.dtype not in _POOL_VIEWS:
        return f"KV cache dtype {runner.kv_pool.dtype}"
    if not any(isinstance(m, GGUFBlocks) for m in model.modules()):
        return "no GGUF weights (the native step runs float32 GGUF models)"
    if not isinstance(runner.attn_backend, TorchNativeAttnBackend):
        return f"attention backend {type(runner.attn_backend).__name__}"
    opts = model.options
    if opts.moe is not None:
        return "mixture-of-experts layers"
    inner = model.model
    for rotary in {id(r): r for r in _rotaries(inner)}.values():
        if rotary.long_threshold is not None or rotary.rotary_dim != rotary.head_dim:
            return "LongRoPE or partial rotary embeddings"
        if rotary.cos_cache.dtype != torch.float32:
            return "RoPE tables not in float32"
    mlp = inner.layers[0].mlp
    if not isinstance(mlp, LlamaMLP) or not isinstance(mlp.act_fn, SiluAndMul | GeluAndMul):
        return "an MLP other than the gated one"
    if isinstance(mlp.act_fn, GeluAndMul) and mlp.act_fn.approximate != "tanh":
        return "exact GELU"
    if getattr(model.config, "vocab_size", None) is None:
        return "no vocab_size in the config"
    return None


def _rotaries(inner: Any) -> list[Any]:
    return [layer.self_attn.rotary_emb for layer in inner.layers]


def _arr(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _part(weight: torch.Tensor | None, gguf: GGUFBlocks | None) -> tuple:
    if gguf is None:
        assert weight is not None
        return ("dense", _arr(weight))
    if gguf.bits:
        data, d, m = gguf._packed_np
        return ("packed", gguf.bits, data, d, m, gguf.k)
    assert gguf.blocks is not None
    return ("blocks", gguf.qtype, _arr(gguf.blocks), gguf.k)


def _linear(layer: Any) -> dict[str, Any]:
    if layer.gguf is not None:
        parts = [_part(None, p) for p in layer.gguf.parts]
    else:
        parts = [_part(layer.weight, None)]
    bias = layer.bias
    return {"parts": parts, "bias": None if bias is None else _arr(bias)}


def _norm(norm: RMSNorm | None) -> tuple | None:
    if norm is None:
        return None
    return (_arr(norm.weight), float(norm.eps), isinstance(norm, GemmaRMSNorm))


def model_spec(model: LlamaForCausalLM) -> dict[str, Any]:
    """The decoder's spec of `model` (srt-py's decoder.rs documents the format): numpy views
    of its weights, and its options."""
    inner = model.model
    opts = model.options
    first = inner.layers[0]
    attn, mlp = first.self_attn, first.mlp
    embed = inner.embed_tokens
    lm_head = model.lm_head
    assert lm_head is not None
    layers = []
    for i, layer in enumerate(inner.layers):
        a = layer.self_attn
        rotary = a.rotary_emb
        layers.append(
            {
                "input_norm": _norm(layer.input_layernorm),
                "qkv": _linear(a.qkv_proj),
                "q_norm": _norm(a.q_norm) if a.qk_norm else None,
                "k_norm": _norm(a.k_norm) if a.qk_norm else None,
                "cos": _arr(rotary.cos_cache),
                "sin": _arr(rotary.sin_cache),
                "scale": float(a.attn.scaling),
                "window": int(opts.window(i) or 0),
                "softcap": float(opts.attn_softcap or 0.0),
                "o": _linear(a.o_proj),
                "post_attn_norm": _norm(layer.post_attention_layernorm),
                "ff_norms": (
                    (
                        _norm(layer.pre_feedforward_layernorm),
                        _norm(layer.post_feedforward_layernorm),
                    )
                    if layer.sandwich_norm
                    else None
                ),
                "gate_up": _linear(layer.mlp.gate_up_proj),
                "down": _linear(layer.mlp.down_proj),
            }
        )
    embed_scale = None if inner.embed_scale is None else float(inner.embed_scale)
    lm_parts = (
        [_part(None, lm_head.gguf)] if lm_head.gguf is not None else [_part(lm_head.weight, None)]
    )
    return {
        "hidden": int(model.config.hidden_size),
        "heads": int(attn.num_heads),
        "kv_heads": int(attn.num_kv_heads),
        "head_dim": int(attn.head_dim),
        "intermediate": int(mlp.down_proj.in_per_rank),
        "vocab": int(embed.per_rank),
        "embed": _part(embed.weight, embed.gguf),
        "embed_scale": embed_scale,
        "layers": layers,
        "norm": _norm(inner.norm),
        "lm_head": {"parts": lm_parts, "bias": None},
        "final_softcap": float(opts.final_softcap or 0.0),
        "act": "silu" if isinstance(mlp.act_fn, SiluAndMul) else "gelu_tanh",
    }
