"""Torch-native attention over the paged KV pool (CPU, and a GPU fallback): srt-kernels on the
CPU, SDPA elsewhere.

- extend: the queries of each sequence's new tokens attend causally to its prefix plus the new
  keys, read from the pool through `req_to_token[row, :seq_len]`. On the CPU with an fp32 or
  bf16 pool, srt-kernels' paged extend attention (`_native.paged_extend_attention`) takes the
  whole batch in one call (sliding window and soft-cap included), in parallel over
  (sequence, KV head, tile of new tokens). Elsewhere, a batch of many short
  sequences runs as one SDPA over queries and keys padded to the longest (`_PaddedExtend`,
  when the padded mask stays small and padding wastes little); otherwise one SDPA per sequence.
- decode: on the CPU with an fp32 or bf16 pool, srt-kernels' paged decode attention
  (`_native.paged_decode_attention`, sliding window and soft-cap included), which reads each
  sequence's keys and values in place through its table row, in parallel over sequences on
  torch's thread count. Elsewhere, one
  batched SDPA over the sequences' keys gathered and padded to the longest; padded positions
  point at the padding page and are masked out.
GQA is handled by SDPA's `enable_gqa`, or by folding a KV head's query heads into its query
rows (no materialized repeat of K/V).

Layer options (`AttentionLayer`): a sliding window narrows the mask to the keys at absolute
positions > p - W (one mask per window size per step, built on first use); a logit soft-cap
replaces SDPA by the explicit softmax(cap * tanh(scores / cap)) (`_attend`). The native decode
kernel takes both as arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from srt._native import paged_decode_attention, paged_extend_attention
from srt.layers.attention.base import AttentionBackend
from srt.layers.attention.layer import AttentionLayer
from srt.model_executor.forward_batch import ForwardBatch

# Pool dtypes the native decode kernel reads, and the dtype numpy sees them as.
_NATIVE_DECODE_VIEW = {torch.float32: torch.float32, torch.bfloat16: torch.int16}
# The padded extend path's mask holds at most this many elements (bytes) ...
_PADDED_MASK_MAX = 1 << 24
# ... and pads at most this factor more (query, key) pairs than the sequences have.
_PADDED_WASTE_MAX = 4


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    layer: AttentionLayer,
    gqa: bool = True,
) -> torch.Tensor:
    """SDPA over q [..., Hq, T, D] and k/v [..., Hkv, S, D] with `layer`'s scale, or, when the
    layer soft-caps its logits, the same attention written out (SDPA has no soft-cap). `mask`
    bool [..., T, S] (True: attend); None: causal, aligned at the top left (T == S)."""
    cap = layer.logit_softcap
    if cap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=layer.scaling, enable_gqa=gqa
        )
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * layer.scaling
    scores = torch.tanh(scores / cap) * cap
    if mask is None:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril_()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _window(mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, w: int) -> torch.Tensor:
    """`mask` [..., T, S] narrowed to keys at positions > query position - w."""
    return mask & (k_pos.unsqueeze(-2) > q_pos.unsqueeze(-1) - w)


@dataclass
class _PaddedExtend:
    """One SDPA for a whole extend batch: sequences padded to the longest."""

    query_index: torch.Tensor  # [B * Tmax] token of each padded query row (0 for padding)
    out_index: torch.Tensor  # [T] padded row of each token
    slots: torch.Tensor  # [B * Smax] KV slot of each padded key (0, the padding page, past an end)
    mask: torch.Tensor  # [B, 1, Tmax, Smax] bool: causal within each sequence, no padding keys
    shape: tuple[int, int, int]  # B, Tmax, Smax
    q_pos: torch.Tensor  # [B, 1, Tmax] position of each padded query row
    windowed: dict[int, torch.Tensor]  # window -> `mask` narrowed to it (built on first use)

    def mask_for(self, window: int | None) -> torch.Tensor:
        if window is None:
            return self.mask
        if window not in self.windowed:
            k_pos = torch.arange(self.shape[2], device=self.mask.device)
            self.windowed[window] = _window(self.mask, self.q_pos, k_pos, window)
        return self.windowed[window]


@dataclass
class _NativeDecode:
    """A decode step's arguments of the native kernel (host arrays, shared with the step)."""

    table: np.ndarray  # [rows, max_context] int32: the whole request-to-token table
    rows: np.ndarray  # [B] int64
    lens: np.ndarray  # [B] int64


@dataclass
class _NativeExtend:
    """An extend step's arguments of the native kernel (host arrays, shared with the step)."""

    table: np.ndarray  # [rows, max_context] int32: the whole request-to-token table
    rows: np.ndarray  # [B] int64
    prefix_lens: np.ndarray  # [B] int64
    extend_lens: np.ndarray  # [B] int64


@dataclass
class _ExtendSeq:
    start: int  # first row of this sequence in the step's tokens
    num_new: int
    prefix_len: int
    slots: torch.Tensor | None  # [seq_len] KV slots; None when there is no prefix
    mask: torch.Tensor | None  # [num_new, seq_len] bool; None when plain causal
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask_for(self, window: int | None, device: torch.device) -> torch.Tensor | None:
        if window is None or window >= self.prefix_len + self.num_new:
            return self.mask  # the window reaches back to position 0 for every query
        if window not in self.windowed:
            seq_len = self.prefix_len + self.num_new
            q_pos = torch.arange(self.prefix_len, seq_len, device=device)
            k_pos = torch.arange(seq_len, device=device)
            causal = k_pos[None, :] <= q_pos[:, None]
            self.windowed[window] = _window(causal, q_pos, k_pos, window)
        return self.windowed[window]


@dataclass
class _PaddedDecode:
    """A decode step as one SDPA over the sequences' keys padded to the longest."""

    slots: torch.Tensor  # [B * max_len] KV slot of each padded key
    mask: torch.Tensor  # [B, 1, 1, max_len] bool: the sequence's keys
    lens: torch.Tensor  # [B, 1, 1, 1] each sequence's length
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask_for(self, window: int | None) -> torch.Tensor:
        if window is None:
            return self.mask
        if window not in self.windowed:
            # The query sits at position len - 1: keys > len - 1 - window.
            k_pos = torch.arange(self.mask.shape[-1], device=self.mask.device)
            self.windowed[window] = self.mask & (k_pos >= self.lens - window)
        return self.windowed[window]


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self) -> None:
        super().__init__()
        self._extend: list[_ExtendSeq] = []
        self._padded: _PaddedExtend | None = None
        self._decode: _PaddedDecode | None = None
        self._native: _NativeDecode | None = None
        self._native_extend: _NativeExtend | None = None
        # layer id -> (the pool's K tensor, numpy views of K and V) for the native kernel
        self._pool_arrays: dict[int, tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}

    def _native_cpu(self) -> bool:
        """Whether steps run the native kernels: a CPU pool of a dtype they read."""
        assert self.kv_pool is not None
        return self.kv_pool.device.type == "cpu" and self.kv_pool.dtype in _NATIVE_DECODE_VIEW

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        assert self.req_to_token_pool is not None, "bind_pools() must be called first"
        table = self.req_to_token_pool.req_to_token
        self._native = None
        self._native_extend = None
        self._decode = None
        self._padded = None
        seq_lens = forward_batch.seq_lens_cpu
        if seq_lens is None:
            seq_lens = forward_batch.seq_lens.cpu().numpy()
        if forward_batch.is_decode and self._native_cpu():
            rows = forward_batch.req_pool_indices.numpy()
            self._native = _NativeDecode(table.numpy(), rows, np.asarray(seq_lens, np.int64))
            return
        if forward_batch.is_decode:
            self._decode = self._plan_decode(forward_batch, seq_lens)
            return
        prefix_lens = forward_batch.extend_prefix_lens_cpu
        if prefix_lens is None:
            assert forward_batch.extend_prefix_lens is not None
            prefix_lens = forward_batch.extend_prefix_lens.cpu().numpy()
        if self._native_cpu():
            rows = forward_batch.req_pool_indices.numpy()
            prefix = np.ascontiguousarray(prefix_lens, np.int64)
            self._native_extend = _NativeExtend(
                table.numpy(), rows, prefix, np.asarray(seq_lens, np.int64) - prefix
            )
            return
        self._padded = self._plan_padded(
            forward_batch, np.asarray(seq_lens), np.asarray(prefix_lens)
        )
        if self._padded is not None:
            return
        rows = forward_batch.req_pool_indices.tolist()
        seq_lens, prefix_lens = seq_lens.tolist(), np.asarray(prefix_lens).tolist()
        self._extend = []
        start = 0
        for row, seq_len, prefix_len in zip(rows, seq_lens, prefix_lens, strict=True):
            num_new = seq_len - prefix_len
            slots = mask = None
            if prefix_len > 0:
                slots = table[row, :seq_len].long()
                # New token j sits at position prefix_len + j and sees keys 0 ..= that position.
                q_pos = torch.arange(prefix_len, seq_len, device=table.device)
                mask = torch.arange(seq_len, device=table.device)[None, :] <= q_pos[:, None]
            self._extend.append(_ExtendSeq(start, num_new, prefix_len, slots, mask))
            start += num_new

    def _plan_decode(self, forward_batch: ForwardBatch, seq_lens: np.ndarray) -> _PaddedDecode:
        assert self.req_to_token_pool is not None
        table = self.req_to_token_pool.req_to_token
        max_len = int(seq_lens.max())
        device = table.device
        lens = forward_batch.seq_lens.to(device)
        valid = torch.arange(max_len, device=device)[None, :] < lens[:, None]
        rows = forward_batch.req_pool_indices.to(device)
        slots = table[:, :max_len].index_select(0, rows).long()
        # Stale entries past a sequence's end point at page 0 (finite, masked out).
        slots = slots.masked_fill_(~valid, 0).view(-1)
        return _PaddedDecode(slots, valid[:, None, None, :], lens.view(-1, 1, 1, 1))

    def _plan_padded(
        self, forward_batch: ForwardBatch, seq_lens: np.ndarray, prefix_lens: np.ndarray
    ) -> _PaddedExtend | None:
        """The padded plan of an extend batch of several sequences, or None when one SDPA per
        sequence is cheaper (a mask too large, or lengths too uneven)."""
        b = len(seq_lens)
        ext = seq_lens - prefix_lens
        t_max, s_max = int(ext.max()), int(seq_lens.max())
        padded = b * t_max * s_max
        if b < 2 or padded > _PADDED_MASK_MAX or padded > _PADDED_WASTE_MAX * int(ext @ seq_lens):
            return None
        assert self.req_to_token_pool is not None
        table = self.req_to_token_pool.req_to_token
        device = table.device
        # Host-side indices (the lengths are on the host), one copy each to the device.
        j = np.arange(t_max)
        q_valid = j[None, :] < ext[:, None]
        starts = np.concatenate(([0], np.cumsum(ext)[:-1]))
        query_index = np.where(q_valid, starts[:, None] + j[None, :], 0).reshape(-1)
        out_index = np.nonzero(q_valid.reshape(-1))[0]
        q_pos = torch.from_numpy(prefix_lens[:, None] + j[None, :]).to(device)
        lens = forward_batch.seq_lens.to(device)
        key_pos = torch.arange(s_max, device=device)
        key_valid = key_pos[None, :] < lens[:, None]
        rows = forward_batch.req_pool_indices.to(device)
        slots = table[:, :s_max].index_select(0, rows).long().masked_fill_(~key_valid, 0)
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
        return _PaddedExtend(
            query_index=torch.from_numpy(query_index).to(device),
            out_index=torch.from_numpy(out_index).to(device),
            slots=slots.view(-1),
            mask=mask[:, None],
            shape=(b, t_max, s_max),
            q_pos=q_pos[:, None],
            windowed={},
        )

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayer,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        assert self.kv_pool is not None
        k_buf, v_buf = self.kv_pool.get_kv(layer.layer_id)
        if self._native_extend is not None:
            plan = self._native_extend
            pool = self._pool_views(layer.layer_id, k_buf, v_buf)
            return self._run_native(
                q,
                k_buf.dtype,
                layer,
                lambda qa, oa, threads: paged_extend_attention(
                    qa,
                    pool[1],
                    pool[2],
                    plan.table,
                    plan.rows,
                    plan.prefix_lens,
                    plan.extend_lens,
                    layer.scaling,
                    oa,
                    threads,
                    layer.sliding_window or 0,
                    layer.logit_softcap or 0.0,
                ),
            )
        if self._padded is not None:
            return self._forward_padded(q, k_buf, v_buf, layer, self._padded)
        out = torch.empty(
            (q.shape[0], layer.num_heads * layer.head_dim), dtype=q.dtype, device=q.device
        )
        for seq in self._extend:
            rows = slice(seq.start, seq.start + seq.num_new)
            if seq.slots is None:
                # No prefix: the keys are exactly the new tokens' (already in the pool too).
                k_seq, v_seq = k[rows], v[rows]
            else:
                k_seq, v_seq = k_buf[seq.slots], v_buf[seq.slots]
            o = _attend(
                q[rows].transpose(0, 1),
                k_seq.transpose(0, 1).to(q.dtype),
                v_seq.transpose(0, 1).to(q.dtype),
                seq.mask_for(layer.sliding_window, q.device),
                layer,
            )
            out[rows] = o.transpose(0, 1).reshape(seq.num_new, -1)
        return out

    @staticmethod
    def _forward_padded(
        q: torch.Tensor,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        layer: AttentionLayer,
        plan: _PaddedExtend,
    ) -> torch.Tensor:
        b, t_max, s_max = plan.shape
        qp = q.index_select(0, plan.query_index).view(b, t_max, *q.shape[1:]).transpose(1, 2)
        kv_shape = (b, s_max, *k_buf.shape[1:])
        keys = k_buf.index_select(0, plan.slots).view(kv_shape).transpose(1, 2).to(q.dtype)
        values = v_buf.index_select(0, plan.slots).view(kv_shape).transpose(1, 2).to(q.dtype)
        # NOTE: padding query rows see no key and come out NaN; they are dropped below.
        o = _attend(qp, keys, values, plan.mask_for(layer.sliding_window), layer)
        o = o.transpose(1, 2).reshape(b * t_max, -1)
        return o.index_select(0, plan.out_index)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayer,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        assert self.kv_pool is not None
        k_buf, v_buf = self.kv_pool.get_kv(layer.layer_id)
        if self._native is not None:
            plan = self._native
            pool = self._pool_views(layer.layer_id, k_buf, v_buf)
            return self._run_native(
                q,
                k_buf.dtype,
                layer,
                lambda qa, oa, threads: paged_decode_attention(
                    qa,
                    pool[1],
                    pool[2],
                    plan.table,
                    plan.rows,
                    plan.lens,
                    layer.scaling,
                    oa,
                    threads,
                    layer.sliding_window or 0,
                    layer.logit_softcap or 0.0,
                ),
            )
        assert self._decode is not None
        plan = self._decode
        shape = (q.shape[0], plan.mask.shape[-1], *k_buf.shape[1:])
        # NOTE: index_select, not advanced indexing: ~3x faster for whole-row gathers on CPU.
        keys = k_buf.index_select(0, plan.slots).view(shape)
        values = v_buf.index_select(0, plan.slots).view(shape)
        keys = keys.transpose(1, 2).to(q.dtype)  # [B, Hkv, L, D]
        values = values.transpose(1, 2).to(q.dtype)
        b, h_kv = q.shape[0], keys.shape[1]
        # NOTE: the query heads sharing a KV head are that head's query rows ([B, Hkv, G, D]):
        # the same attention as GQA over [B, Hq, 1, D], at ~0.8x of its cost on the CPU.
        o = _attend(
            q.view(b, h_kv, -1, q.shape[-1]),
            keys,
            values,
            plan.mask_for(layer.sliding_window),
            layer,
            gqa=False,
        )
        return o.reshape(b, -1)

    def _pool_views(
        self, layer_id: int, k_buf: torch.Tensor, v_buf: torch.Tensor
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(the pool's K tensor, numpy views of K and V) of a layer for the native kernels."""
        pool = self._pool_arrays.get(layer_id)
        if pool is None or pool[0] is not k_buf:
            view = _NATIVE_DECODE_VIEW[k_buf.dtype]
            # NOTE: the pool's tensors live as long as the backend: their numpy views are
            # made once per layer, not per step.
            pool = (k_buf, k_buf.view(view).numpy(), v_buf.view(view).numpy())
            self._pool_arrays[layer_id] = pool
        return pool

    @staticmethod
    def _run_native(
        q: torch.Tensor,
        kv_dtype: torch.dtype,
        layer: AttentionLayer,
        kernel: Callable[[np.ndarray, np.ndarray, int], None],
    ) -> torch.Tensor:
        """A native kernel's attention of q [T, Hq, D]: [T, Hq * D]. float32 queries read a
        bf16 pool as they are; other mixes take the pool's dtype."""
        dtype = q.dtype
        if dtype != kv_dtype and not (dtype == torch.float32 and kv_dtype == torch.bfloat16):
            q = q.to(kv_dtype)
        view = _NATIVE_DECODE_VIEW[q.dtype]
        q = q.contiguous()
        out = torch.empty_like(q)
        kernel(q.view(view).numpy(), out.view(view).numpy(), torch.get_num_threads())
        out = out.view(q.shape[0], -1)
        return out if out.dtype == dtype else out.to(dtype)
