"""SiluAndMul: the gated activation of Llama/Qwen MLPs, applied to the fused gate_up output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srt.layers import flashinfer_ops


class SiluAndMul(nn.Module):
    """[..., 2 * d] (gate then up) -> silu(gate) * up of shape [..., d].

    Built under the model's default device and dtype, it uses FlashInfer's fused kernel when
    those are CUDA and bf16/fp16."""

    def __init__(self) -> None:
        super().__init__()
        self._fused = flashinfer_ops.kernels(torch.get_default_device(), torch.get_default_dtype())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None and x.is_contiguous():
            return self._fused.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
