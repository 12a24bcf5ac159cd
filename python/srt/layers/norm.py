"""RMSNorm as in HF Llama/Qwen: normalize in fp32, scale in the input dtype.

Used by the models of the scheduler process; `forward(x, residual)` fuses the residual add that
precedes every norm of a decoder layer and returns the new residual too.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        # Add in the activation dtype, as HF does, so bf16 runs round the same way.
        residual = residual + x
        return self._norm(residual), residual
