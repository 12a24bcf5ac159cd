"""Rotary position embedding (RoPE), neox style (rotate_half) as in HF Llama/Qwen.

The cos/sin table is computed once in fp32 for every position up to `max_position` and indexed
by the step's positions, so a step costs one gather. Supports the plain ("default") frequencies,
"linear" scaling and Llama-3.1 style "llama3" scaling. `rope_settings(hf_config)` reads the rope
settings of both config styles: transformers 5 `rope_parameters` (rope_theta inside) and older
`rope_theta` + `rope_scaling`. On CUDA (with a bf16/fp16 default dtype at construction) the
rotation is FlashInfer's one in-place kernel over q and k, reading the same fp32 table; on the
CPU (fp32 / bf16) it is srt-kernels' in-place kernel, bit for bit the torch expression.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from srt._native import rope_neox_inplace
from srt.layers import flashinfer_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# CPU dtypes the native kernel rotates, and the dtype numpy sees them as.
_NATIVE_VIEW = {torch.float32: torch.float32, torch.bfloat16: torch.int16}


def rope_settings(hf_config: Any) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling dict with at least "rope_type") from either config style."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = dict(params)
        theta = float(scaling.pop("rope_theta"))
    else:
        theta = float(getattr(hf_config, "rope_theta", None) or 10000.0)
        scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    # Old configs spell the kind "type".
    scaling["rope_type"] = scaling.get("rope_type", scaling.pop("type", None)) or "default"
    return theta, scaling


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    # Same expression as HF so fp32 results match bit for bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = scaling["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(
        f"unsupported rope_type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        scaling = scaling or {"rope_type": "default"}
        inv_freq = _inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        # NOTE: fp32 whatever the model dtype, cast per step like HF; not a state_dict entry.
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)
        self.max_position = max_position
        self.head_dim = head_dim
        self._fused = flashinfer_ops.kernels(self.cos_cache.device, torch.get_default_dtype())
        if self._fused is not None:
            half = head_dim // 2  # FlashInfer's table: [cos | sin] of the distinct frequencies
            table = torch.cat((self.cos_cache[:, :half], self.sin_cache[:, :half]), dim=-1)
            self.register_buffer("cos_sin_cache", table.contiguous(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hk, D] rotated by positions [T]. NOTE: the fused paths (CUDA,
        CPU) rotate q and k in place (each head's D values must be contiguous) and return
        them."""
        if self._fused is not None and q.stride(-1) == 1 and k.stride(-1) == 1:
            n = q.shape[0]
            self._fused.apply_rope_with_cos_sin_cache_inplace(
                positions, q.view(n, -1), k.view(n, -1), self.head_dim, self.cos_sin_cache
            )
            return q, k
        view = _NATIVE_VIEW.get(q.dtype)
        if (
            view is not None
            and q.device.type == "cpu"
            and k.dtype == q.dtype
            and self.cos_cache.dtype == torch.float32
            and q.stride(-1) == 1
            and k.stride(-1) == 1
        ):
            pos, cos, sin = positions.numpy(), self.cos_cache.numpy(), self.sin_cache.numpy()
            for x in (q, k):
                rope_neox_inplace(x.view(view).numpy(), pos, cos, sin)
            return q, k
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
