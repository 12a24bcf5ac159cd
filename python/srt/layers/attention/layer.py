"""AttentionLayer: the attention op of one decoder layer (after q/k/v projection and RoPE).

Holds the layer's shape and its id in the KV pool, and hands the work to the model's
AttentionBackend.
"""

from __future__ import annotations

import torch
from torch import nn

from srt.layers.attention.base import AttentionBackend
from srt.model_executor.forward_batch import ForwardBatch


class AttentionLayer(nn.Module):
    def __init__(
        self,
        backend: AttentionBackend,
        layer_id: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scaling: float,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        return self.backend.forward(q, k, v, self, forward_batch)
