"""The KV cache and request-to-token table of a CPU scheduler as numpy arrays (the torch-free
native path), and how many tokens a CPU's KV pool holds; importing it does not import torch.

Layout as `memory_pool.ReqToTokenPool` / `KVPool`: `table` [rows, max_context_len] int32 (the
last row is the padding row no request holds), and per layer K and V [size + page_size,
kv_heads, head_dim] (the first page is the padding page, zeros); a bf16 pool holds its values'
bits as int16 (numpy has no bfloat16).
"""

from __future__ import annotations

import os

import numpy as np

CPU_MEM_FRACTION_DEFAULT = 0.3
# Extra columns of the request-to-token table beyond the context length (cheap safety margin).
REQ_TO_TOKEN_SLACK = 4
CPU_MAX_TOTAL_TOKENS_DEFAULT = 65536
# numpy's view of each KV dtype the native step reads.
KV_NUMPY = {"float32": np.float32, "bfloat16": np.int16}


def host_memory_available() -> int:
    """The host's MemAvailable in bytes (free pages where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def cpu_pool_tokens(
    max_total_tokens: int | None,
    mem_fraction: float | None,
    free_before_load: int,
    weight_bytes: int,
    per_token: int,
) -> int:
    """Tokens of a CPU KV pool: `--max-total-tokens`, else the part of the memory that was
    free before the weights were loaded (`--mem-fraction-static`, default 0.3) left after
    them, at most CPU_MAX_TOTAL_TOKENS_DEFAULT."""
    if max_total_tokens is not None:
        return max_total_tokens
    fraction = mem_fraction or CPU_MEM_FRACTION_DEFAULT
    budget = free_before_load * fraction - weight_bytes
    return min(int(budget // per_token), CPU_MAX_TOTAL_TOKENS_DEFAULT)


class HostPools:
    """The table and the KV pool, owned here; the native step reads and writes them in
    place."""

    def __init__(
        self,
        rows: int,
        max_context_len: int,
        size: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        kv_dtype: str,
    ) -> None:
        # NOTE: zeros: column 0 of the padding row, and unwritten columns, name the padding
        # page. np.zeros and np.empty leave the pages untouched until used.
        self.table = np.zeros((rows, max_context_len), dtype=np.int32)
        shape = (size + page_size, num_kv_heads, head_dim)
        dtype = KV_NUMPY[kv_dtype]
        self.k = [np.empty(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [np.empty(shape, dtype=dtype) for _ in range(num_layers)]
        for buf in (*self.k, *self.v):
            buf[:page_size] = 0

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    def apply(self, rows: np.ndarray, cols: np.ndarray, slots: np.ndarray) -> None:
        """`table[rows[i], cols[i]] = slots[i]`: a step's writes."""
        if len(rows):
            self.table[rows, cols] = slots
