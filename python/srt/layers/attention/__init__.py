"""Attention backends by name; the ModelRunner picks one once, at construction."""

from __future__ import annotations

from collections.abc import Callable

from srt.layers.attention.base import AttentionBackend


def _torch_native() -> AttentionBackend:
    from srt.layers.attention.torch_native import TorchNativeAttnBackend

    return TorchNativeAttnBackend()


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"torch_native": _torch_native}

ATTENTION_BACKENDS = tuple(_BACKENDS)


def create_attention_backend(name: str = "torch_native") -> AttentionBackend:
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(ATTENTION_BACKENDS)}"
        ) from None
    return factory()


__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "create_attention_backend"]
