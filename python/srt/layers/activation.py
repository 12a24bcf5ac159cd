"""Gated activations of the MLPs, applied to the fused gate_up output: SiLU (Llama, Qwen,
Mistral, Phi-3, the MoE experts) and tanh-approximated GELU (Gemma 2/3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srt._native import silu_and_mul as native_silu_and_mul
from srt.layers import flashinfer_ops

# CPU dtypes the native kernel takes, and the dtype numpy sees them as.
_NATIVE_VIEW = {torch.float32: torch.float32, torch.bfloat16: torch.int16}

# HF `hidden_act` / `hidden_activation` names -> the GELU approximation, or None for SiLU.
_GATED = {"silu": None, "gelu_pytorch_tanh": "tanh", "gelu": "none"}
SUPPORTED_ACTIVATIONS = tuple(_GATED)


class SiluAndMul(nn.Module):
    """[..., 2 * d] (gate then up) -> silu(gate) * up of shape [..., d].

    Built under the model's default device and dtype, it uses FlashInfer's fused kernel when
    those are CUDA and bf16/fp16; on the CPU (fp32/bf16) srt-kernels' `silu_and_mul`."""

    def __init__(self) -> None:
        super().__init__()
        self._fused = flashinfer_ops.kernels(torch.get_default_device(), torch.get_default_dtype())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None and x.is_contiguous():
            return self._fused.silu_and_mul(x)
        d = x.shape[-1] // 2
        view = _NATIVE_VIEW.get(x.dtype)
        if view is not None and x.device.type == "cpu" and x.dim() == 2 and x.is_contiguous():
            out = x.new_empty(x.shape[0], d)
            native_silu_and_mul(
                x.view(view).numpy(), out.view(view).numpy(), torch.get_num_threads()
            )
            return out
        return F.silu(x[..., :d]) * x[..., d:]


class GeluAndMul(nn.Module):
    """[..., 2 * d] (gate then up) -> gelu(gate) * up, exact or tanh-approximated GELU."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate
        fused = flashinfer_ops.kernels(torch.get_default_device(), torch.get_default_dtype())
        name = "gelu_tanh_and_mul" if approximate == "tanh" else "gelu_and_mul"
        self._fused_fn = getattr(fused, name, None) if fused is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_fn is not None and x.is_contiguous():
            return self._fused_fn(x)
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate) * x[..., d:]


def gated_activation(name: str) -> nn.Module:
    """The gated activation of an HF `hidden_act` name; a clear error for others."""
    if name not in _GATED:
        raise ValueError(
            f"unsupported hidden activation {name!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    approximate = _GATED[name]
    return SiluAndMul() if approximate is None else GeluAndMul(approximate)
