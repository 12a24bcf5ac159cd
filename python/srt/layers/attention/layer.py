"""AttentionLayer: the attention op of one decoder layer (after q/k/v projection and RoPE).

Holds the layer's shape, its id in the KV pool and its attention options, and hands the work
to the model's AttentionBackend:
- `sliding_window` W: a query at position p attends only to keys at positions > p - W (the W
  most recent, itself included), HF's convention; positions are absolute, so it holds the same
  whether the keys came from this step, an earlier chunk or the prefix cache. None: all keys.
- `logit_softcap` c: scores become c * tanh(scores / c) before the softmax (Gemma 2).
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
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding window must be at least 1 token, got {sliding_window}")
        if logit_softcap is not None and logit_softcap <= 0:
            raise ValueError(f"attention logit soft-cap must be positive, got {logit_softcap}")
        self.backend = backend
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        backend.register_layer(self)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        return self.backend.forward(q, k, v, self, forward_batch)
