"""RMSNorm as in HF Llama/Qwen: normalize in fp32, scale in the input dtype; and Gemma's
variant (`GemmaRMSNorm`), which scales by (1 + weight) in fp32 and rounds once.

Used by the models of the scheduler process; `forward(x, residual)` fuses the residual add that
precedes every norm of a decoder layer and returns the new residual too. On CUDA in bf16/fp16,
2-D inputs go through FlashInfer's one-kernel (residual-add +) RMSNorm (`flashinfer_ops`),
which updates `x` and `residual` in place.
"""

from __future__ import annotations

import torch
from torch import nn

from srt.layers import flashinfer_ops


class RMSNorm(nn.Module):
    # FlashInfer's kernels of this norm: (norm, residual-add + norm in place).
    _kernel_names = ("rmsnorm", "fused_add_rmsnorm")

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        fused = flashinfer_ops.kernels(self.weight.device, self.weight.dtype)
        kernels = [getattr(fused, n, None) for n in self._kernel_names]
        self._fused = kernels if fused is not None and all(kernels) else None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self._fused is not None and x.dim() == 2 and x.is_contiguous():
            norm, add_norm = self._fused
            if residual is None:
                return norm(x, self.weight, self.eps)
            # NOTE: in place: residual += x, then x = norm(residual); both are this step's.
            add_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._norm(x)
        # Add in the activation dtype, as HF does, so bf16 runs round the same way.
        residual = residual + x
        return self._norm(residual), residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in fp32, rounded to x's dtype once. The
    checkpoint stores the offset from one (zero-initialised)."""

    _kernel_names = ("gemma_rmsnorm", "gemma_fused_add_rmsnorm")

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)
