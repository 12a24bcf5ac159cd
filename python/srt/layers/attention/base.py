"""AttentionBackend: how the attention layers of a model read and write the paged KV cache.

One backend object serves every layer of the model. The ModelRunner builds it by name
(`srt.layers.attention.create_attention_backend`), gives it the pools once they are sized
(`bind_pools`), calls `init_forward_metadata` once per step (index tensors shared by all layers),
then each layer calls `forward`, which stores the new tokens' K/V at `out_cache_loc` and attends.

Each AttentionLayer registers itself at construction (`register_layer`), so a backend that
plans per kind of layer (window, soft-cap, scale) knows the kinds before the first step.

A backend whose decode step can be captured in a CUDA graph sets `supports_cuda_graph` and
implements the two `*_cuda_graph` methods: the CudaGraphRunner calls `init_cuda_graph_state`
once, then `init_forward_metadata_cuda_graph` before capturing and before every replay of a
padded decode batch. That method does the host-side work (planning) and leaves every tensor the
captured kernels read at a fixed address.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from srt.model_executor.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from srt.layers.attention.layer import AttentionLayer
    from srt.mem_cache.memory_pool import KVPool, ReqToTokenPool


@dataclass(frozen=True)
class LayerKind:
    """The attention options a backend may have to plan or run differently."""

    scaling: float
    sliding_window: int | None
    logit_softcap: float | None

    @staticmethod
    def of(layer: AttentionLayer) -> LayerKind:
        return LayerKind(layer.scaling, layer.sliding_window, layer.logit_softcap)


class AttentionBackend(abc.ABC):
    supports_cuda_graph = False

    def __init__(self) -> None:
        self.req_to_token_pool: ReqToTokenPool | None = None
        self.kv_pool: KVPool | None = None
        self.layer_kinds: dict[int, LayerKind] = {}  # layer id -> its attention options

    def register_layer(self, layer: AttentionLayer) -> None:
        """Called by each AttentionLayer as it is built."""
        self.layer_kinds[layer.layer_id] = LayerKind.of(layer)

    def bind_pools(self, req_to_token_pool: ReqToTokenPool, kv_pool: KVPool) -> None:
        """Called once by the ModelRunner: the pools are sized after the weights are loaded."""
        self.req_to_token_pool = req_to_token_pool
        self.kv_pool = kv_pool

    @abc.abstractmethod
    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Prepares per-step state (e.g. KV slot index tensors) before the layers run."""

    def init_cuda_graph_state(self, max_bs: int, max_context_len: int) -> None:
        """Allocates the fixed buffers that captured decode graphs of up to `max_bs`
        sequences of up to `max_context_len` tokens read."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def init_forward_metadata_cuda_graph(self, forward_batch: ForwardBatch) -> None:
        """Like `init_forward_metadata` for a decode batch whose size is a captured one,
        writing only into the buffers of `init_cuda_graph_state`."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayer,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens -> attention output [T, Hq * D]."""
        assert self.kv_pool is not None, "bind_pools() must be called before forward"
        self.kv_pool.set_kv(layer.layer_id, forward_batch.out_cache_loc, k, v)
        if forward_batch.is_decode:
            return self.forward_decode(q, k, v, layer, forward_batch)
        return self.forward_extend(q, k, v, layer, forward_batch)

    @abc.abstractmethod
    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayer,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor: ...

    @abc.abstractmethod
    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayer,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor: ...
