"""Linear layers of the models, with weight loaders for checkpoint tensors.

Parameters are created with `torch.empty` (no random init: they are overwritten by the loader or
by dummy init). `StackedLinear` is one matmul over several checkpoint projections concatenated
along the output dim (q/k/v -> qkv_proj, gate/up -> gate_up_proj); its parameters carry a
`weight_loader(param, tensor, shard_id)` that copies one checkpoint tensor into its slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"weight shape {tuple(loaded.shape)} does not match parameter {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class StackedLinear(Linear):
    """Output = concatenation of the shards `shards[i]` of sizes `shard_sizes[i]`."""

    def __init__(
        self,
        in_features: int,
        shards: Sequence[str],
        shard_sizes: Sequence[int],
        bias: bool = False,
    ) -> None:
        super().__init__(in_features, sum(shard_sizes), bias)
        offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.shard_slices = {
            s: (o, n) for s, o, n in zip(shards, offsets, shard_sizes, strict=True)
        }
        for p in self.parameters():
            p.weight_loader = self.weight_loader
            p.shard_ids = tuple(shards)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str) -> None:
        offset, size = self.shard_slices[shard_id]
        target = param.data.narrow(0, offset, size)
        if target.shape != loaded.shape:
            raise ValueError(
                f"shard {shard_id!r}: weight shape {tuple(loaded.shape)} does not match "
                f"{tuple(target.shape)}"
            )
        target.copy_(loaded)
