"""Vocab-parallel embedding and lm_head: each TP rank holds a contiguous block of vocab rows.

The vocabulary is padded to a multiple of the TP size; rank r holds rows
`[r * per_rank, (r + 1) * per_rank)`, the padding rows (past the real vocab) zero after loading.
- embedding: each rank looks up the ids in its block (zero elsewhere), then all-reduce;
- lm_head (`lm_head_logits`): each rank computes the logits of its block, then an all-gather
  along the vocab dim, trimmed to the real vocab size.
A tied lm_head is the embedding itself (same block on the same rank).

Given a `GGUFWeight`, the loader keeps its block rows (`self.gguf`; all-zero blocks pad, which
dequantize to zeros in every supported type) and drops the fp32 weight: the lookup dequantizes
just the looked-up rows and the lm_head multiplies through the GGUF kernels (see GGUFBlocks:
one copy, repacked, serves both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srt.distributed.parallel_state import (
    get_tp_rank,
    get_tp_size,
    tp_all_gather_last,
    tp_all_reduce,
)
from srt.layers.quantization import GGUFBlocks, GGUFWeight


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        tp = get_tp_size()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.per_rank = -(-num_embeddings // tp)
        self.start = get_tp_rank() * self.per_rank
        self.end = self.start + self.per_rank
        self.sharded = tp > 1
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(self.per_rank, embedding_dim), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader
        self.gguf: GGUFBlocks | None = None

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor | GGUFWeight) -> None:
        expected = (self.num_embeddings, self.embedding_dim)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"weight shape {tuple(loaded.shape)} does not match {expected}")
        real = max(0, min(self.end, self.num_embeddings) - self.start)
        if isinstance(loaded, GGUFWeight):
            blocks = torch.zeros((self.per_rank, loaded.blocks.shape[1]), dtype=torch.uint8)
            blocks[:real].copy_(loaded.blocks[self.start : self.start + real])
            self.gguf = GGUFBlocks(GGUFWeight(loaded.qtype, blocks, self.embedding_dim))
            self.gguf_dtype = param.dtype  # what the lookup returns, as the fp32 path would
            self.weight = None  # NOTE: the fp32 copy is freed once the loader lets go of it
            return
        param.data[:real].copy_(loaded[self.start : self.start + real])
        param.data[real:].zero_()

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.gguf is None:
            return F.embedding(ids, self.weight)
        rows = self.gguf.lookup(ids.reshape(-1)).to(self.gguf_dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return self._lookup(input_ids)
        outside = (input_ids < self.start) | (input_ids >= self.end)
        local = (input_ids - self.start).masked_fill(outside, 0)
        out = self._lookup(local).masked_fill(outside.unsqueeze(-1), 0)
        return tp_all_reduce(out)

    def lm_head_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> fp32 logits [N, vocab] over the whole vocabulary."""
        if self.gguf is not None:
            h = hidden_states.to(torch.float32).contiguous()
            logits = torch.empty((h.shape[0], self.per_rank), dtype=torch.float32)
            self.gguf.multiply(h, logits, 0)
        else:
            logits = torch.matmul(hidden_states, self.weight.t()).float()
        if not self.sharded:
            return logits
        return tp_all_gather_last(logits)[:, : self.num_embeddings]
