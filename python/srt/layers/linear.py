"""Linear layers of the models, with weight loaders for checkpoint tensors, tensor parallel.

Parameters are created with `torch.empty` (no random init: they are overwritten by the loader or
by dummy init). Under tensor parallelism (srt.distributed) each rank holds a shard:

- `StackedLinear` is column parallel: one matmul over several checkpoint projections
  concatenated along the output dim (q/k/v -> qkv_proj, gate/up -> gate_up_proj), each rank
  holding its slice of every projection; its parameters carry a
  `weight_loader(param, tensor, shard_id)` that copies that rank's slice of one checkpoint
  tensor. No communication: the output stays sharded.
- `RowParallelLinear` takes the sharded input, multiplies by its slice of the input dim and
  all-reduces; the bias is added once, after the sum.
- `Linear` is replicated (every rank holds all of it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from srt.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce


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
    """Output = concatenation of the shards `shards[i]`, each `shard_sizes[i]` rows of this
    rank's part of its checkpoint tensor.

    `shard_parts[i] = (parts, index)`: the checkpoint tensor of shard i is cut into `parts`
    equal row blocks along the output dim and this rank holds block `index` (default (1, 0):
    all of it). The blocks of q follow the TP rank; those of k/v follow the KV head group,
    which several ranks share when there are more ranks than KV heads.
    """

    def __init__(
        self,
        in_features: int,
        shards: Sequence[str],
        shard_sizes: Sequence[int],
        bias: bool = False,
        shard_parts: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(in_features, sum(shard_sizes), bias)
        parts = list(shard_parts) if shard_parts is not None else [(1, 0)] * len(shards)
        offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.shard_slices = {
            s: (o, n, p) for s, o, n, p in zip(shards, offsets, shard_sizes, parts, strict=True)
        }
        for p in self.parameters():
            p.weight_loader = self.weight_loader
            p.shard_ids = tuple(shards)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str) -> None:
        offset, size, (parts, index) = self.shard_slices[shard_id]
        target = param.data.narrow(0, offset, size)
        if loaded.shape[0] != size * parts or loaded.shape[1:] != target.shape[1:]:
            raise ValueError(
                f"shard {shard_id!r}: weight shape {tuple(loaded.shape)} does not match "
                f"{(size * parts, *target.shape[1:])}"
            )
        target.copy_(loaded.narrow(0, index * size, size))


def column_parallel(
    in_features: int,
    shards: Sequence[str],
    full_sizes: Sequence[int],
    bias: bool = False,
) -> StackedLinear:
    """A StackedLinear whose every shard is split evenly over the TP ranks."""
    tp, rank = get_tp_size(), get_tp_rank()
    for name, n in zip(shards, full_sizes, strict=True):
        if n % tp:
            raise ValueError(f"{name} output size {n} is not divisible by --tp-size {tp}")
    return StackedLinear(
        in_features,
        shards,
        [n // tp for n in full_sizes],
        bias=bias,
        shard_parts=[(tp, rank)] * len(shards),
    )


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard @ W_shard^T) + b, with W split along its input dim."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        tp = get_tp_size()
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by --tp-size {tp}")
        self.tp_rank = get_tp_rank()
        self.in_features = in_features
        self.in_per_rank = in_features // tp
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        expected = (self.out_features, self.in_features)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"weight shape {tuple(loaded.shape)} does not match {expected}")
        param.data.copy_(loaded.narrow(1, self.tp_rank * self.in_per_rank, self.in_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tp_all_reduce(F.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out
