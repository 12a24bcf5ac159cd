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

A loader given a `GGUFWeight` (srt.layers.quantization) keeps its blocks instead of the fp32
weight: the layer then holds a `GGUFLinear` in `self.gguf`, its fp32 `weight` is dropped, and the
forward multiplies through the GGUF kernels. A `StackedLinear` keeps blocks only when every shard
came as blocks (else it dequantizes them into its fp32 weight); a `RowParallelLinear` only when
its input slice falls on block boundaries (else likewise).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from srt.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from srt.layers.quantization import GGUFLinear, GGUFWeight

logger = logging.getLogger(__name__)

WeightIn = torch.Tensor | GGUFWeight


def default_weight_loader(param: torch.Tensor, loaded: WeightIn) -> None:
    """Copies `loaded` into `param`; a GGUF weight is dequantized (a plain parameter cannot
    hold blocks)."""
    if isinstance(loaded, GGUFWeight):
        loaded = loaded.dequantize()
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
        self.gguf: GGUFLinear | None = None
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: torch.Tensor, loaded: WeightIn) -> None:
        if param is not self.weight or not isinstance(loaded, GGUFWeight):
            default_weight_loader(param, loaded)
            return
        if loaded.shape != tuple(param.shape):
            raise ValueError(
                f"weight shape {loaded.shape} does not match parameter {tuple(param.shape)}"
            )
        self._keep_blocks([loaded])

    def _keep_blocks(self, parts: list[GGUFWeight]) -> None:
        self.gguf = GGUFLinear(self.in_features, parts)
        self.weight = None  # NOTE: the fp32 copy is freed once the loader lets go of it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gguf is not None:
            return self.gguf(x, self.bias)
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
        # Weight shards that came as GGUF blocks, held until every shard has come.
        self._pending: dict[str, GGUFWeight] = {}
        self._dense_shards: set[str] = set()

    def weight_loader(self, param: torch.Tensor, loaded: WeightIn, shard_id: str) -> None:
        offset, size, (parts, index) = self.shard_slices[shard_id]
        target = param.data.narrow(0, offset, size)
        if loaded.shape[0] != size * parts or tuple(loaded.shape[1:]) != tuple(target.shape[1:]):
            raise ValueError(
                f"shard {shard_id!r}: weight shape {tuple(loaded.shape)} does not match "
                f"{(size * parts, *target.shape[1:])}"
            )
        mine = loaded.narrow(0, index * size, size)
        if param is not self.weight:  # the bias
            target.copy_(mine.dequantize() if isinstance(mine, GGUFWeight) else mine)
            return
        if isinstance(mine, GGUFWeight):
            self._pending[shard_id] = mine
        else:
            target.copy_(mine)
            self._dense_shards.add(shard_id)
        if len(self._pending) + len(self._dense_shards) < len(self.shard_slices):
            return
        if not self._dense_shards:  # all blocks: keep them, in output order
            self._keep_blocks([self._pending[s] for s in self.shard_slices])
        else:  # mixed: one fp32 weight for all
            for s, w in self._pending.items():
                o, n, _ = self.shard_slices[s]
                param.data.narrow(0, o, n).copy_(w.dequantize())
        self._pending.clear()


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
        self.gguf: GGUFLinear | None = None

    def weight_loader(self, param: torch.Tensor, loaded: WeightIn) -> None:
        expected = (self.out_features, self.in_features)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"weight shape {tuple(loaded.shape)} does not match {expected}")
        start = self.tp_rank * self.in_per_rank
        if isinstance(loaded, GGUFWeight):
            if loaded.input_slice_aligned(start, self.in_per_rank):
                self.gguf = GGUFLinear(
                    self.in_per_rank, [loaded.narrow(1, start, self.in_per_rank)]
                )
                self.weight = None
                return
            logger.warning(
                "%s input slice [%d, %d) is not aligned to its %d-weight blocks: dequantized",
                loaded.qtype,
                start,
                start + self.in_per_rank,
                loaded.block_size,
            )
            loaded = loaded.dequantize()
        param.data.copy_(loaded.narrow(1, start, self.in_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gguf is not None:
            out = tp_all_reduce(self.gguf(x))
        else:
            out = tp_all_reduce(F.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out
