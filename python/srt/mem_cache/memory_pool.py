"""KV cache tensors of the scheduler process: the request-to-token table and the paged KV pool.

- `ReqToTokenPool`: one int32 row per running request; row r, column p holds the KV slot of
  position p of that request. Each step's table writes (planned by the Rust scheduler, which
  hands out the rows) are applied before its forward; the attention backend reads it to find a
  sequence's keys and values. The last row is never handed out: padded batches use it.
- `KVPool`: per-layer K and V tensors indexed by KV slot. Slots come from the Rust allocator
  (`srt._native`), which hands out `page_size .. page_size + size`; page 0 (slots
  `0 .. page_size`) is a padding sink, so the tensors have `size + page_size` rows.

Both only hold tensors; which slots and rows are free is the Rust scheduler's bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class ReqToTokenPool:
    """`size` rows of `max_context_len` KV slot indices."""

    def __init__(self, size: int, max_context_len: int, device: torch.device | str) -> None:
        if size < 1 or max_context_len < 1:
            raise ValueError(
                f"ReqToTokenPool needs size >= 1 and max_context_len >= 1, got {size}, {max_context_len}"
            )
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        # NOTE: zeros, not empty: a batched decode gathers whole padded rows and masks the tail;
        # zero is the padding page, so even unmasked garbage would stay inside the pool.
        self.req_to_token = torch.zeros(
            (size, max_context_len), dtype=torch.int32, device=self.device
        )

    @property
    def pad_row(self) -> int:
        """The row no request holds (padded batches point their padding here)."""
        return self.size - 1

    def apply(self, rows: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor) -> None:
        """`table[rows[i], cols[i]] = slots[i]`: a step's writes, already on the device."""
        if rows.numel():
            self.req_to_token[rows, cols] = slots.to(torch.int32)

    def write_runs(
        self,
        rows: Sequence[int] | torch.Tensor,
        start_positions: Sequence[int] | torch.Tensor,
        slots: Sequence[int] | torch.Tensor,
        lengths: Sequence[int] | None = None,
    ) -> None:
        """Writes `slots` (flat, concatenated per row) at positions `start_positions[i] ..
        start_positions[i] + lengths[i]` of `rows[i]`, in one indexed store (tests and
        benchmarks that drive the runner without the scheduler).

        `lengths` defaults to one slot per row.
        """
        n_rows = len(rows)
        if lengths is None:
            lengths = [1] * n_rows
        if len(start_positions) != n_rows or len(lengths) != n_rows:
            raise ValueError("rows, start_positions and lengths must have the same length")
        lens = np.asarray(lengths, dtype=np.int64)
        total = int(lens.sum())
        if len(slots) != total:
            raise ValueError(
                f"expected {total} slots for lengths {list(lengths)}, got {len(slots)}"
            )
        if total == 0:
            return
        row_idx = np.repeat(_np_int64(rows), lens)
        # Column of each slot: its row's start plus its offset inside the row's run.
        run_begin = np.cumsum(lens) - lens
        offsets = np.arange(total, dtype=np.int64) - np.repeat(run_begin, lens)
        col_idx = np.repeat(_np_int64(start_positions), lens) + offsets
        if int(col_idx.max()) >= self.max_context_len or int(col_idx.min()) < 0:
            raise ValueError(f"position out of range [0, {self.max_context_len})")
        packed = torch.from_numpy(np.stack((row_idx, col_idx, _np_int64(slots))))
        packed = packed.to(self.device)
        self.apply(packed[0], packed[1], packed[2])


def _np_int64(values: Sequence[int] | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(values, dtype=np.int64)


class KVPool:
    """Per-layer K and V buffers of shape [size + page_size, num_kv_heads, head_dim]."""

    def __init__(
        self,
        size: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        start_layer: int = 0,
    ) -> None:
        """`num_layers` layers from `start_layer` on (a pipeline stage holds only its own)."""
        if page_size < 1 or size < 1 or size % page_size:
            raise ValueError(
                f"KVPool size {size} must be a positive multiple of page_size {page_size}"
            )
        self.size = size
        self.page_size = page_size
        self.num_layers = num_layers
        self.start_layer = start_layer
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        rows = size + page_size
        shape = (rows, num_kv_heads, head_dim)
        # torch.empty: pages are not touched (nor committed by the OS) before they are used.
        self.k_buffers = [
            torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        self.v_buffers = [
            torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        # NOTE: the padding page must hold finite values: masked-out positions of a padded batch
        # read it, and NaN * 0 would still poison the attention output.
        for buf in (*self.k_buffers, *self.v_buffers):
            buf[:page_size].zero_()

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * elem

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v of shape [T, num_kv_heads, head_dim] at slots `loc` [T]."""
        layer_id -= self.start_layer
        self.k_buffers[layer_id][loc] = k.to(self.dtype)
        self.v_buffers[layer_id][loc] = v.to(self.dtype)

    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer_id -= self.start_layer
        return self.k_buffers[layer_id], self.v_buffers[layer_id]
