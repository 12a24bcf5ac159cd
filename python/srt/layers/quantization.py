"""GGUF-quantized weights in the scheduler process: the checkpoint tensor and the layers' blocks.

`GGUFWeight` is what weight loading yields, in place of the fp32 tensor, for a weight the GGUF
file shipped in a block format srt has kernels for: the blocks (uint8 [n, row_bytes]), the
GGUF type name and the logical shape [n, k]. Row slices (`narrow(0, ...)`, `split`) cost
nothing; slices of the input dim only where they fall on block boundaries (else ValueError).

The layers keep the weights in `GGUFBlocks` (a module, so they count as the model's memory) and
multiply through srt._native's GGUF kernels: activations go in as float32 and the result comes
back in the activation dtype. Q4_0, Q4_1, Q8_0 and Q4_K run repacked (`quant_matmul_packed`)
with the activations quantized per 32 values, to int16 on CPUs with AVX-512 VNNI (products
within ~1e-5 of the dequantized fp32 ones) and to int8 elsewhere, as llama.cpp does (~0.5%:
enough to change a small model's greedy answers); Q6_K runs in its blocks in f32
(`quant_matmul`). Inputs of more than KERNEL_MAX_ROWS rows (prefill, big batches) multiply
the weights dequantized instead, a chunk of rows at a time. The embedding lookup dequantizes
only the looked-up rows, bit-exact.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from srt._native import (
    quant_batch_tiles,
    quant_dequantize,
    quant_matmul,
    quant_matmul_packed,
    quant_pack,
)

# GGUF type name -> (weights per block, bytes per block): the types srt._native handles.
BLOCK_FORMATS: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}
# The types `quant_pack` repacks for `quant_matmul_packed` (Q6_K runs in its blocks).
PACKED_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0", "Q4_K"})
# The kernels' cost grows with every input row (each row is quantized and dotted with every
# block), a BLAS matmul's barely: inputs of more rows than this (prefill, big decode batches)
# multiply with the weights dequantized, DENSE_CHUNK_ROWS output rows at a time (a few MiB of
# scratch). On the default model at 2 threads: kernels ~3.6 ms per input row per step,
# dequantizing all layers ~60-80 ms per step plus the fp32 matmul: even at ~32 rows.
# With AMX tiles (`quant_batch_tiles`) packed weights take the kernel at any row count: a
# prefill of 1024 rows through the default model's 49152 x 576 lm_head took 76 ms against 242
# through dequantized weights.
KERNEL_MAX_ROWS = 32
DENSE_CHUNK_ROWS = 4096


class GGUFWeight:
    """A 2-D weight [n, k] kept as GGUF blocks: row `i` is `blocks[i]`."""

    __slots__ = ("blocks", "qtype", "shape")

    def __init__(self, qtype: str, blocks: torch.Tensor, k: int) -> None:
        if qtype not in BLOCK_FORMATS:
            raise ValueError(
                f"unsupported GGUF block type {qtype!r}; supported: {', '.join(BLOCK_FORMATS)}"
            )
        per_block, block_bytes = BLOCK_FORMATS[qtype]
        if blocks.dtype != torch.uint8 or blocks.dim() != 2:
            raise ValueError(
                f"GGUF blocks must be uint8 [n, row_bytes], got {blocks.dtype} "
                f"{tuple(blocks.shape)}"
            )
        if k % per_block or blocks.shape[1] != k // per_block * block_bytes:
            raise ValueError(
                f"{qtype} rows of {k} weights take {k // per_block * block_bytes} bytes "
                f"({per_block} weights per block), got {blocks.shape[1]}"
            )
        self.qtype = qtype
        self.blocks = blocks
        self.shape = (int(blocks.shape[0]), int(k))

    def __repr__(self) -> str:
        return f"GGUFWeight({self.qtype}, shape={self.shape})"

    @property
    def block_size(self) -> int:
        return BLOCK_FORMATS[self.qtype][0]

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> GGUFWeight:
        """Rows (dim 0) `[start, start + length)`, or input columns (dim 1) when `start` and
        `length` are multiples of the block size."""
        n, k = self.shape
        if dim == 0:
            return GGUFWeight(self.qtype, self.blocks.narrow(0, start, length), k)
        if dim != 1:
            raise ValueError(f"a GGUF weight is 2-D; cannot narrow dim {dim}")
        if not self.input_slice_aligned(start, length):
            raise ValueError(
                f"columns [{start}, {start + length}) of a {self.qtype} weight do not fall on "
                f"its {self.block_size}-weight blocks"
            )
        per_block, block_bytes = BLOCK_FORMATS[self.qtype]
        cols = self.blocks.narrow(
            1, start // per_block * block_bytes, length // per_block * block_bytes
        )
        return GGUFWeight(self.qtype, cols.contiguous(), length)

    def input_slice_aligned(self, start: int, length: int) -> bool:
        return start % self.block_size == 0 and length % self.block_size == 0

    def split(self, sizes: int | Sequence[int], dim: int = 0) -> tuple[GGUFWeight, ...]:
        """As `torch.Tensor.split` along the rows (`dim` 0 only)."""
        if dim != 0:
            raise ValueError("a GGUF weight splits along its rows (dim 0) only")
        n = self.shape[0]
        if isinstance(sizes, int):
            sizes = [min(sizes, n - s) for s in range(0, n, sizes)]
        if sum(sizes) != n:
            raise ValueError(f"split sizes {list(sizes)} do not add up to {n} rows")
        starts = np.cumsum([0, *sizes[:-1]])
        return tuple(self.narrow(0, int(s), int(m)) for s, m in zip(starts, sizes, strict=True))

    def dequantize(self) -> torch.Tensor:
        """The fp32 weights [n, k], as llama.cpp (and transformers' GGUF reader) computes them."""
        out = torch.empty(self.shape, dtype=torch.float32)
        if self.shape[0]:
            blocks = self.blocks.contiguous().numpy()
            quant_dequantize(self.qtype, blocks, self.shape[1], out.numpy(), _threads())
        return out


@functools.cache
def _batch_tiles() -> bool:
    return quant_batch_tiles()


def _threads() -> int:
    return max(1, torch.get_num_threads())


class GGUFBlocks(nn.Module):
    """One weight, held for its matmul and its row lookup.

    The types that pack (Q4_0, Q4_1, Q8_0, Q4_K) are held repacked once by `quant_pack` (wide
    loads, a scale and an offset per 32 weights, f16 where exact and f32 for Q4_K: the same
    numbers, about twice the block kernel's speed) and their GGUF blocks dropped; Q6_K keeps
    its blocks (`quant_matmul`).
    """

    def __init__(self, weight: GGUFWeight) -> None:
        super().__init__()
        self.qtype = weight.qtype
        self.rows, self.k = weight.shape
        self.bits = 0  # of the packed form; 0: the GGUF blocks
        packs = weight.qtype in PACKED_TYPES
        blocks = None if packs else weight.blocks.contiguous()
        self.register_buffer("blocks", blocks, persistent=False)
        if not packs:
            return
        bits, data, d, m = quant_pack(self.qtype, weight.blocks.contiguous().numpy(), self.k)
        self.bits = int(bits)
        for name, array in (("packed", data), ("scale", d), ("offset", m)):
            # f16 scales come as their uint16 bits: the buffers hold them as float16
            if array.dtype == np.uint16:
                array = array.view(np.float16)
            self.register_buffer(name, torch.from_numpy(array), persistent=False)
        # NOTE: the kernel's arrays (f16 scales as uint16 bits), views of the buffers, made
        # once (CPU only).
        self._packed_np = (data, d, m)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def matmul_into(self, x: np.ndarray, out: np.ndarray, col: int) -> None:
        """out[:, col:col + rows] = x @ W.T, x float32 [b, k] and out float32 [b, m]."""
        if self.bits:
            data, d, m = self._packed_np
            quant_matmul_packed(self.bits, data, d, m, self.k, x, out, col, _threads())
        else:
            assert self.blocks is not None
            quant_matmul(self.qtype, self.blocks.numpy(), self.k, x, out, col, _threads())

    def dense_rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 weights [stop - start, k] of rows [start, stop), the same numbers as
        `GGUFWeight.dequantize`."""
        if not self.bits:
            assert self.blocks is not None
            return GGUFWeight(self.qtype, self.blocks[start:stop], self.k).dequantize()
        return self._unpack(
            self.packed[start:stop], self.scale[start:stop], self.offset[start:stop]
        )

    def _unpack(
        self, data: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        """fp32 weights of packed rows: `d * q + m` per 32 weights (exact in f32: d * q is)."""
        n, blocks = data.shape[0], scale.shape[1]
        scale, offset = scale.float(), offset.float()  # f16 scales are exact in f32
        if self.bits == 8:
            q = data.view(n, blocks, 32)
        else:  # element j < 16 of a block in the low nibble of byte j, j + 16 in the high one
            nibbles = data.view(n, blocks, 16)
            q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1)
        w = torch.addcmul(offset[:, :, None], q.float(), scale[:, :, None])
        return w.reshape(n, blocks * 32)[:, : self.k]

    def multiply(self, x: torch.Tensor, out: torch.Tensor, col: int) -> None:
        """out[:, col:col + rows] = x @ W.T, x float32 [b, k] and out float32 [b, m], both
        contiguous: the kernels for up to KERNEL_MAX_ROWS rows (for any number of rows of
        packed weights where the CPU has AMX tiles), else dequantized chunks."""
        if x.shape[0] <= KERNEL_MAX_ROWS or (self.bits and _batch_tiles()):
            if x.shape[0]:
                self.matmul_into(x.numpy(), out.numpy(), col)
            return
        for start in range(0, self.rows, DENSE_CHUNK_ROWS):
            stop = min(start + DENSE_CHUNK_ROWS, self.rows)
            out[:, col + start : col + stop] = torch.mm(x, self.dense_rows(start, stop).t())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows [len(ids), k] of the weights at `ids` (1-D int64), bit-exact."""
        ids = ids.reshape(-1)
        if self.bits:
            pick = (t.index_select(0, ids) for t in (self.packed, self.scale, self.offset))
            return self._unpack(*pick).contiguous()
        assert self.blocks is not None
        out = torch.empty((ids.numel(), self.k), dtype=torch.float32)
        if ids.numel():
            rows = self.blocks.index_select(0, ids).numpy()
            quant_dequantize(self.qtype, rows, self.k, out.numpy(), _threads())
        return out


class GGUFLinear(nn.Module):
    """y = x @ W.T (+ bias) with W the row concatenation of GGUF weights (one per stacked
    shard): one multiply per part, each writing its columns of the output."""

    def __init__(self, in_features: int, parts: Iterable[GGUFWeight]) -> None:
        super().__init__()
        self.in_features = in_features
        self.parts = nn.ModuleList(GGUFBlocks(w) for w in _merged(parts))
        self.cols: list[int] = []
        col = 0
        for p in self.parts:
            if p.k != in_features:
                raise ValueError(f"GGUF weight of {p.k} inputs in a layer of {in_features}")
            self.cols.append(col)
            col += p.rows
        self.out_features = col

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        out = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        for part, col in zip(self.parts, self.cols, strict=True):
            part.multiply(x2, out, col)
        if bias is not None:
            out += bias
        return out.to(x.dtype).reshape(*lead, self.out_features)


def _merged(parts: Iterable[GGUFWeight]) -> list[GGUFWeight]:
    """Consecutive weights of one type as one (their rows concatenated), so a stacked layer
    (q/k/v, gate/up) makes one kernel call, which quantizes the activations once."""
    out: list[GGUFWeight] = []
    for w in parts:
        prev = out[-1] if out else None
        if prev is not None and prev.qtype == w.qtype and prev.shape[1] == w.shape[1]:
            out[-1] = GGUFWeight(w.qtype, torch.cat([prev.blocks, w.blocks]), w.shape[1])
        else:
            out.append(w)
    return out


def gguf_bytes(model: nn.Module) -> int:
    """Bytes of the GGUF weights a model holds, packed or in blocks (buffers, not parameters)."""
    return sum(m.nbytes for m in model.modules() if isinstance(m, GGUFBlocks))
