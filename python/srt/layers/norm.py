"""RMSNorm as in HF Llama/Qwen: normalize in fp32, scale in the input dtype; and Gemma's
variant (`GemmaRMSNorm`), which scales by (1 + weight) in fp32 and rounds once.

Used by the models of the scheduler process; `forward(x, residual)` fuses the residual add that
precedes every norm of a decoder layer and returns the new residual too. On CUDA in bf16/fp16,
2-D inputs go through FlashInfer's one-kernel (residual-add +) RMSNorm (`flashinfer_ops`),
which updates `x` and `residual` in place. On the CPU in fp32/bf16 they go through
srt-kernels' `rms_norm` (one call instead of eight torch ops), which updates `residual` in
place.
"""

from __future__ import annotations

import torch
from torch import nn

from srt._native import rms_norm as native_rms_norm
from srt.layers import flashinfer_ops

# CPU dtypes the native norm takes, and the dtype numpy sees them as.
_NATIVE_VIEW = {torch.float32: torch.float32, torch.bfloat16: torch.int16}


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

    # Gemma's (1 + weight) scaling, in the native kernel.
    _gemma = False

    def _native(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """The norm through srt-kernels, or None where it does not apply."""
        view = _NATIVE_VIEW.get(x.dtype)
        if (
            view is None
            or x.device.type != "cpu"
            or x.dim() != 2
            or self.weight.dtype != x.dtype
            or not x.is_contiguous()
            or (
                residual is not None and (residual.dtype != x.dtype or not residual.is_contiguous())
            )
        ):
            return None
        out = torch.empty_like(x)
        native_rms_norm(
            x.view(view).numpy(),
            None if residual is None else residual.view(view).numpy(),
            self.weight.view(view).numpy(),
            out.view(view).numpy(),
            self.eps,
            self._gemma,
            torch.get_num_threads(),
        )
        return out if residual is None else (out, residual)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        native = self._native(x, residual)
        if native is not None:
            return native
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
    _gemma = True

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)
