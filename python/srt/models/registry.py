"""HF architecture name -> srt model class. Imports model code only on lookup, so reading the
list of supported architectures (ModelConfig, in any process) does not import torch."""

from __future__ import annotations

import importlib
from typing import Any

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("srt.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("srt.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("srt.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("srt.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("srt.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "MixtralForCausalLM": ("srt.models.mixtral", "MixtralForCausalLM"),
    "Phi3ForCausalLM": ("srt.models.phi3", "Phi3ForCausalLM"),
    "Gemma2ForCausalLM": ("srt.models.gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("srt.models.gemma", "Gemma3ForCausalLM"),
    # Gemma 3's multimodal checkpoints, served as text models (the vision tower unused).
    "Gemma3ForConditionalGeneration": ("srt.models.gemma", "Gemma3TextOnly"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def get_model_class(architecture: str) -> Any:
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
