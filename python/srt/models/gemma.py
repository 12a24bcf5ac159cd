"""Gemma 2 and Gemma 3 (text): the Llama decoder with Gemma's options.

Both: RMSNorms that scale by (1 + weight) in fp32, a norm after attention and one on each side
of the MLP (sandwich norms), embeddings scaled by sqrt(hidden_size), attention scaled by
query_pre_attn_scalar^-0.5 instead of head_dim^-0.5, tanh-approximated GELU, tied embeddings,
and local sliding-window layers alternating with global ones (`layer_types`). Gemma 2 soft-caps
the attention logits and the final logits; Gemma 3 adds RMSNorm on q and k and gives the
sliding layers their own RoPE base (rope_parameters per layer type, or rope_local_base_freq).

Gemma 3's larger checkpoints are multimodal (Gemma3ForConditionalGeneration); srt serves their
language model as a text model (`Gemma3TextOnly`): the vision tower and projector are not
loaded, and requests carry text only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from srt.layers.attention.base import AttentionBackend
from srt.models.llama import DecoderOptions, LlamaForCausalLM, sliding_windows

# Where multimodal checkpoints keep the language model (hub layout, then transformers 5's).
_LANGUAGE_MODEL = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
_VISION = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


class Gemma2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional (non-causal) Gemma attention is not supported")
        bias = bool(getattr(config, "attention_bias", False))
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        return DecoderOptions(
            qkv_bias=bias,
            o_bias=bias,
            gemma_norm=True,
            sandwich_norm=True,
            embed_scale=config.hidden_size**0.5,
            hidden_act=act,
            attn_scale=config.query_pre_attn_scalar**-0.5,
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            sliding_windows=sliding_windows(config),
        )


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        base = super().decoder_options(config)
        return dataclasses.replace(base, qk_norm=True, local_rope=True)


class Gemma3TextOnly(Gemma3ForCausalLM):
    """A Gemma3ForConditionalGeneration checkpoint's language model. As in HF's multimodal
    class, the logits are not soft-capped (Gemma 3 configs leave the cap unset anyway)."""

    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        return dataclasses.replace(super().decoder_options(config), final_softcap=None)

    def __init__(
        self, config: Any, attn_backend: AttentionBackend, max_position: int | None = None
    ) -> None:
        super().__init__(config.get_text_config(), attn_backend, max_position)

    def checkpoint_tensors(
        self, name: str, tensor: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        if name.startswith(_VISION):
            return  # images are not served
        for old, new in _LANGUAGE_MODEL:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        yield name, tensor
