"""Attention backends by name; the ModelRunner picks one once, at construction.

"auto" resolves to flashinfer on a CUDA device in bf16/fp16 when the flashinfer package imports,
else to torch_native. flashinfer is imported only when chosen.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from srt.layers.attention.base import AttentionBackend

if TYPE_CHECKING:
    from srt.configs.model_config import ModelConfig

logger = logging.getLogger(__name__)


def _torch_native(model_config: ModelConfig | None) -> AttentionBackend:
    from srt.layers.attention.torch_native import TorchNativeAttnBackend

    return TorchNativeAttnBackend()


def _flashinfer(model_config: ModelConfig | None) -> AttentionBackend:
    from srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    if model_config is None:
        raise ValueError("the flashinfer backend needs the model config (head count and dtype)")
    from srt.distributed.parallel_state import get_parallel_state

    # Each tensor-parallel rank attends with its own share of the query heads.
    tp_size = get_parallel_state().tp_size
    return FlashInferAttnBackend(
        num_qo_heads=model_config.num_heads // tp_size,
        head_dim=model_config.head_dim,
        dtype=model_config.torch_dtype,
        device=model_config.device,
    )


_BACKENDS: dict[str, Callable[[ModelConfig | None], AttentionBackend]] = {
    "torch_native": _torch_native,
    "flashinfer": _flashinfer,
}

ATTENTION_BACKENDS = tuple(_BACKENDS)


def flashinfer_available() -> bool:
    """Whether the flashinfer package imports here (its import needs a CUDA-capable setup)."""
    if importlib.util.find_spec("flashinfer") is None:
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # a broken install must not stop a server that can run without it
        logger.warning("flashinfer is installed but does not import (%s); using torch_native", e)
        return False
    return True


def resolve_attention_backend(name: str, device: str, dtype: torch.dtype) -> str:
    """The backend "auto" stands for on this device and dtype; other names are returned as is."""
    if name != "auto":
        return name
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and dtype in (torch.bfloat16, torch.float16) and flashinfer_available():
        return "flashinfer"
    return "torch_native"


def create_attention_backend(
    name: str = "torch_native", model_config: ModelConfig | None = None
) -> AttentionBackend:
    if name == "auto":
        if model_config is None:
            raise ValueError('attention backend "auto" needs the model config')
        name = resolve_attention_backend(name, model_config.device, model_config.torch_dtype)
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(ATTENTION_BACKENDS)}"
        ) from None
    return factory(model_config)


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "create_attention_backend",
    "resolve_attention_backend",
]
