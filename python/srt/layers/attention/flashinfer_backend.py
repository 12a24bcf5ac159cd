"""FlashInfer attention over the paged KV pool (CUDA, bf16/fp16), in the scheduler process.

FlashInfer's paged-KV wrappers see the pool as pages: layer l's K (and V) buffer of shape
[size + page_size, Hkv, D] is viewed as [num_pages, page_size, Hkv, D], page 0 being the padding
page. Once per step `init_forward_metadata` turns the ForwardBatch into a page table in
FlashInfer's CSR form and plans; every layer then runs the planned kernel:
- extend: `BatchPrefillWithPagedKVCacheWrapper`, causal (bottom-right aligned), the new tokens'
  queries against the cached prefix plus the new keys, all read from the pool (`forward` stores
  the new K/V before attending).
- decode: `BatchDecodeWithPagedKVCacheWrapper` with tensor-core kernels.

The page table: indptr and last-page lengths are built on the host from the batch's Python
lists (FlashInfer's planner reads them there, so no device-to-host copy); page indices are
gathered on the GPU from `req_to_token` (`page_table`), so planning never waits for the GPU.
Page size 1 makes every KV slot its own page (indices = slots); for larger pages the page of
position j * page_size is its slot // page_size (sequences are laid out page-aligned).

Layer kinds: layers that differ in scale, sliding window or logit soft-cap (Gemma 2/3 alternate
local and global layers) are planned separately, one prefill and one decode wrapper per kind
(`LayerKind`), all sharing the page table; FlashInfer's `window_left` is the number of keys
left of the query's own, so HF's window W (W keys including its own) is `window_left = W - 1`,
and `logits_soft_cap` applies cap * tanh(scores / cap) to the scaled scores, as HF does.

CUDA graphs: one decode wrapper per captured batch size and layer kind, all over the same fixed
index buffers (`init_cuda_graph_state`); replanning before a replay only rewrites those buffers.

flashinfer is imported when the backend is built, never at module import: CPU installs
(and CI) do not need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from srt.layers.attention.base import AttentionBackend, LayerKind
from srt.layers.attention.layer import AttentionLayer
from srt.model_executor.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from srt.mem_cache.memory_pool import KVPool, ReqToTokenPool

# Float scratch of the split-KV kernels, shared by every wrapper (they never run concurrently).
WORKSPACE_BYTES = 256 << 20
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


def page_table(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: np.ndarray,
    page_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's paged-KV description of sequences `seq_lens` long:
    (indptr [B + 1] int32 on the host, page indices [indptr[-1]] int32 on req_to_token's device,
    last_page_len [B] int32 on the host).

    No device-to-host copy: the host parts come from `seq_lens_cpu` (equal to `seq_lens`,
    which is on the device).
    """
    P = page_size
    lens = np.asarray(seq_lens_cpu, dtype=np.int64)
    pages = -(-lens // P)
    indptr = torch.from_numpy(np.concatenate(([0], np.cumsum(pages))).astype(np.int32))
    last = torch.from_numpy((lens - (pages - 1) * P).astype(np.int32))
    total = int(indptr[-1])
    dev = req_to_token.device
    num_pages = (seq_lens.to(dev) + (P - 1)) // P
    # Sequence of each page, then the page's rank inside its sequence.
    seq = torch.repeat_interleave(
        torch.arange(len(pages), device=dev), num_pages, output_size=total
    )
    first = (torch.cumsum(num_pages, 0) - num_pages)[seq]
    col = torch.arange(total, device=dev) - first
    if P > 1:
        col = col * P
    slots = req_to_token[req_pool_indices.to(dev)[seq], col]
    indices = slots // P if P > 1 else slots
    return indptr, indices.to(torch.int32), last


class FlashInferAttnBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(
        self,
        num_qo_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        import flashinfer

        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"the flashinfer attention backend needs a CUDA device, got {device}")
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"the flashinfer attention backend runs bf16 or fp16, not {dtype}; "
                "pass --dtype bfloat16 or --attention-backend torch_native"
            )
        self._fi: Any = flashinfer
        self.num_qo_heads = num_qo_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # One wrapper per layer kind (made on first use); `_decode` maps each kind to the
        # wrapper planned for this step's decode (a CUDA graph's, or the plain one).
        self._prefill_wrappers: dict[LayerKind, Any] = {}
        self._decode_wrappers: dict[LayerKind, Any] = {}
        self._decode: dict[LayerKind, Any] = {}
        self._kv_pages: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._first_layer = 0  # layer id of _kv_pages[0] (a pipeline stage holds a slice)
        # CUDA graph state (init_cuda_graph_state).
        self._graph_wrappers: dict[tuple[int, LayerKind], Any] = {}
        self._graph_indptr: torch.Tensor | None = None
        self._graph_indices: torch.Tensor | None = None
        self._graph_last: torch.Tensor | None = None

    def bind_pools(self, req_to_token_pool: ReqToTokenPool, kv_pool: KVPool) -> None:
        super().bind_pools(req_to_token_pool, kv_pool)
        if kv_pool.dtype != self.dtype:
            raise ValueError(f"KV pool dtype {kv_pool.dtype} differs from the model's {self.dtype}")
        P, H, D = kv_pool.page_size, kv_pool.num_kv_heads, kv_pool.head_dim
        self._first_layer = getattr(kv_pool, "start_layer", 0)
        self._kv_pages = [
            (k.view(-1, P, H, D), v.view(-1, P, H, D))
            for k, v in zip(kv_pool.k_buffers, kv_pool.v_buffers, strict=True)
        ]

    # ---- planning ------------------------------------------------------------------------

    def _pages(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.req_to_token_pool is not None and self.kv_pool is not None
        # NOTE: ForwardBatch.from_step sets seq_lens_cpu; reading the device tensor is a
        # fallback that waits for the GPU.
        seq_lens_cpu = fb.seq_lens_cpu
        if seq_lens_cpu is None:
            seq_lens_cpu = fb.seq_lens.cpu().numpy()
        return page_table(
            self.req_to_token_pool.req_to_token,
            fb.req_pool_indices,
            fb.seq_lens,
            seq_lens_cpu,
            self.kv_pool.page_size,
        )

    def _kinds(self) -> list[LayerKind]:
        kinds = sorted(set(self.layer_kinds.values()), key=repr)
        if not kinds:
            raise RuntimeError("no attention layer registered with the flashinfer backend")
        return kinds

    def _plan_args(self, kind: LayerKind) -> dict[str, Any]:
        assert self.kv_pool is not None
        window = kind.sliding_window
        return dict(
            num_qo_heads=self.num_qo_heads,
            num_kv_heads=self.kv_pool.num_kv_heads,
            page_size=self.kv_pool.page_size,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            sm_scale=kind.scaling,
            # HF's window counts the query's own key; FlashInfer's counts the keys left of it.
            window_left=-1 if window is None else window - 1,
            logits_soft_cap=kind.logit_softcap or 0.0,
        )

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        indptr, indices, last = self._pages(forward_batch)
        if forward_batch.is_decode:
            self._decode = {}
            for kind in self._kinds():
                wrapper = self._decode_wrappers.get(kind)
                if wrapper is None:
                    wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                        self.workspace, "NHD", use_tensor_cores=True
                    )
                    self._decode_wrappers[kind] = wrapper
                wrapper.plan(indptr, indices, last, head_dim=self.head_dim, **self._plan_args(kind))
                self._decode[kind] = wrapper
            return
        extend_lens = forward_batch.extend_seq_lens_cpu
        if extend_lens is None:
            assert forward_batch.extend_seq_lens is not None
            extend_lens = forward_batch.extend_seq_lens.cpu().numpy()
        qo_indptr = torch.from_numpy(np.concatenate(([0], np.cumsum(extend_lens))).astype(np.int32))
        for kind in self._kinds():
            wrapper = self._prefill_wrappers.get(kind)
            if wrapper is None:
                wrapper = self._fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
                self._prefill_wrappers[kind] = wrapper
            wrapper.plan(
                qo_indptr,
                indptr,
                indices,
                last,
                head_dim_qk=self.head_dim,
                causal=True,
                **self._plan_args(kind),
            )

    def init_cuda_graph_state(self, max_bs: int, max_context_len: int) -> None:
        assert self.kv_pool is not None, "bind_pools() must be called first"
        max_pages = max_bs * -(-max_context_len // self.kv_pool.page_size)
        self._graph_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device)
        self._graph_indices = torch.zeros(max_pages, dtype=torch.int32, device=self.device)
        self._graph_last = torch.zeros(max_bs, dtype=torch.int32, device=self.device)

    def init_forward_metadata_cuda_graph(self, forward_batch: ForwardBatch) -> None:
        assert forward_batch.is_decode
        assert self._graph_indptr is not None, "init_cuda_graph_state() must be called first"
        bs = forward_batch.batch_size
        indptr, indices, last = self._pages(forward_batch)
        self._decode = {}
        for kind in self._kinds():
            wrapper = self._graph_wrappers.get((bs, kind))
            if wrapper is None:
                # The wrapper's buffers are views of the shared ones; its batch size is fixed.
                # NOTE: every kind's wrapper reads the same index buffers: one page table.
                wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace,
                    "NHD",
                    use_cuda_graph=True,
                    use_tensor_cores=True,
                    paged_kv_indptr_buffer=self._graph_indptr[: bs + 1],
                    paged_kv_indices_buffer=self._graph_indices,
                    paged_kv_last_page_len_buffer=self._graph_last[:bs],
                )
                self._graph_wrappers[(bs, kind)] = wrapper
            wrapper.plan(indptr, indices, last, head_dim=self.head_dim, **self._plan_args(kind))
            self._decode[kind] = wrapper

    # ---- attention -----------------------------------------------------------------------

    def _check(self, layer: AttentionLayer) -> None:
        if layer.num_heads != self.num_qo_heads:
            raise ValueError(
                f"layer {layer.layer_id} has {layer.num_heads} heads; "
                f"the flashinfer backend was planned for {self.num_qo_heads}"
            )

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayer,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        self._check(layer)
        wrapper = self._prefill_wrappers[self.layer_kinds[layer.layer_id]]
        o = wrapper.run(q.contiguous(), self._kv_pages[layer.layer_id - self._first_layer])
        return o.view(q.shape[0], -1)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayer,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        self._check(layer)
        wrapper = self._decode[self.layer_kinds[layer.layer_id]]
        o = wrapper.run(q.contiguous(), self._kv_pages[layer.layer_id - self._first_layer])
        return o.view(q.shape[0], -1)
