"""Rotary position embedding (RoPE), neox style (rotate_half) as in HF Llama/Qwen.

The cos/sin table is computed once in fp32 for every position up to `max_position` and indexed
by the step's positions, so a step costs one gather. Supports the plain ("default") frequencies,
"linear" scaling, Llama-3.1 style "llama3" scaling and Phi-3's "longrope" (LongRoPE / "su"):
two tables, the short factors' and the long factors', both scaled by the attention factor; a
sequence uses the long one while it is longer than the original context, as HF does per forward
(`table_positions` picks the rows). A `partial_rotary_factor` below 1 rotates only the first
part of each head. `rope_settings(hf_config)` reads the rope settings of both config styles:
transformers 5 `rope_parameters` (rope_theta inside, or one dict per layer type as Gemma 3's)
and older `rope_theta` + `rope_scaling`. On CUDA (with a bf16/fp16 default dtype at
construction) the rotation is FlashInfer's one in-place kernel over q and k, reading the same
fp32 table; on the CPU (fp32 / bf16) it is srt-kernels' in-place kernel, bit for bit the torch
expression.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from srt._native import rope_neox_inplace
from srt.layers import flashinfer_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# CPU dtypes the native kernel rotates, and the dtype numpy sees them as.
_NATIVE_VIEW = {torch.float32: torch.float32, torch.bfloat16: torch.int16}


def rope_settings(hf_config: Any, layer_type: str | None = None) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling dict with at least "rope_type") from either config style, for the
    layers of `layer_type` ("full_attention" / "sliding_attention") where the config sets
    RoPE per layer type (Gemma 3)."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and all(isinstance(v, dict) for v in params.values()) and params:
        params = params.get(layer_type or "full_attention") or params.get("full_attention")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = dict(params)
        theta = float(scaling.pop("rope_theta"))
    else:
        theta = float(getattr(hf_config, "rope_theta", None) or 10000.0)
        scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
        local_theta = getattr(hf_config, "rope_local_base_freq", None)
        if layer_type == "sliding_attention" and local_theta is not None:  # old Gemma 3 style
            theta, scaling = float(local_theta), {}
    # Old configs spell the kind "type"; "su" is LongRoPE's old name.
    kind = scaling.get("rope_type", scaling.pop("type", None)) or "default"
    scaling["rope_type"] = "longrope" if kind == "su" else kind
    if scaling["rope_type"] == "longrope":
        for key in ("original_max_position_embeddings", "max_position_embeddings"):
            if key not in scaling and getattr(hf_config, key, None) is not None:
                scaling[key] = int(getattr(hf_config, key))
    if "partial_rotary_factor" not in scaling:
        factor = getattr(hf_config, "partial_rotary_factor", None)
        if factor is not None:
            scaling["partial_rotary_factor"] = float(factor)
    return theta, scaling


def _longrope_attention_factor(scaling: dict[str, Any]) -> float:
    """LongRoPE's cos/sin multiplier: given, or sqrt(1 + ln(factor) / ln(original length))."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = float(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor")
    if factor is None:  # Phi-3 states it as the ratio of the two context lengths
        factor = float(scaling.get("max_position_embeddings", original)) / original
    factor = float(factor)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any], factors: str = "short_factor"
) -> torch.Tensor:
    # Same expression as HF so fp32 results match bit for bit.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    kind = scaling["rope_type"]
    if kind == "longrope":
        ext = torch.tensor(scaling[factors], dtype=torch.float32)
        if ext.shape != exponents.shape:
            raise ValueError(
                f"longrope {factors} has {ext.numel()} entries; the rotary dim needs "
                f"{exponents.numel()}"
            )
        return 1.0 / (ext * theta**exponents)
    inv_freq = 1.0 / (theta**exponents)
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
        rotary_dim = int(head_dim * float(scaling.get("partial_rotary_factor", 1.0)))
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"partial_rotary_factor gives an odd or empty rotary dim {rotary_dim}")
        positions = torch.arange(max_position, dtype=torch.float32)
        tables = [torch.outer(positions, _inv_freq(rotary_dim, theta, scaling))]
        # LongRoPE: [short table; long table] (`table_positions` offsets into the second).
        self.long_threshold: int | None = None
        if scaling["rope_type"] == "longrope":
            tables.append(
                torch.outer(positions, _inv_freq(rotary_dim, theta, scaling, "long_factor"))
            )
            self.long_threshold = int(scaling["original_max_position_embeddings"])
        freqs = torch.cat(tables)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if scaling["rope_type"] == "longrope":
            mult = _longrope_attention_factor(scaling)
            cos, sin = cos * mult, sin * mult
        # NOTE: fp32 whatever the model dtype, cast per step like HF; not a state_dict entry.
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)
        self.max_position = max_position
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        # The kernels rotate whole heads; a partial rotation takes the torch path.
        partial = rotary_dim != head_dim
        fused_dtype = torch.get_default_dtype()
        self._fused = None if partial else flashinfer_ops.kernels(cos.device, fused_dtype)
        self._native = not partial
        # (cos_cache, its numpy view, sin_cache's), made on the first native rotation
        self._tables: tuple[torch.Tensor, np.ndarray, np.ndarray] | None = None
        if self._fused is not None:
            half = head_dim // 2  # FlashInfer's table: [cos | sin] of the distinct frequencies
            table = torch.cat((self.cos_cache[:, :half], self.sin_cache[:, :half]), dim=-1)
            self.register_buffer("cos_sin_cache", table.contiguous(), persistent=False)

    def table_positions(
        self, positions: torch.Tensor, seq_len_of_token: torch.Tensor | None
    ) -> torch.Tensor:
        """The table rows of the tokens at `positions`: the positions themselves, except under
        LongRoPE, where a token whose sequence is longer than the original context (after
        this step: `seq_len_of_token`) reads the long table."""
        if self.long_threshold is None or seq_len_of_token is None:
            return positions
        long = (seq_len_of_token.to(positions.device) > self.long_threshold).to(positions.dtype)
        return positions + long * self.max_position

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
            self._native
            and view is not None
            and q.device.type == "cpu"
            and k.dtype == q.dtype
            and self.cos_cache.dtype == torch.float32
            and q.stride(-1) == 1
            and k.stride(-1) == 1
        ):
            if self._tables is None or self._tables[0] is not self.cos_cache:
                # NOTE: numpy views of the tables, made once (not per layer and step).
                self._tables = (self.cos_cache, self.cos_cache.numpy(), self.sin_cache.numpy())
            pos, cos, sin = positions.numpy(), self._tables[1], self._tables[2]
            for x in (q, k):
                rope_neox_inplace(x.view(view).numpy(), pos, cos, sin)
            return q, k
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        r = self.rotary_dim
        if r == self.head_dim:
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        q_rot, k_rot = q[..., :r], k[..., :r]
        q_rot = q_rot * cos + rotate_half(q_rot) * sin
        k_rot = k_rot * cos + rotate_half(k_rot) * sin
        return torch.cat((q_rot, q[..., r:]), -1), torch.cat((k_rot, k[..., r:]), -1)
