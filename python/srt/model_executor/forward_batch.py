"""ForwardBatch: the tensors of one model step, built in the scheduler process from the Rust
batch plan and read by the ModelRunner, the attention backend and the sampler.

Layout (T = tokens computed this step, B = sequences):
- EXTEND (prefill, possibly on top of a cached prefix or earlier chunks): sequence i computes
  `extend_seq_lens[i]` new tokens after `extend_prefix_lens[i]` tokens already in KV.
- DECODE: every sequence computes one token (T == B).
KV slots of sequence i for positions [0, seq_lens[i]) are
`req_to_token[req_pool_indices[i], :seq_lens[i]]` (the ReqToTokenPool, written before the
forward); the new tokens' KV is written to `out_cache_loc` (aligned with input_ids).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class ForwardMode(enum.Enum):
    EXTEND = enum.auto()
    DECODE = enum.auto()


@dataclass
class ForwardBatch:
    mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64, KV slot written for each input token
    req_pool_indices: torch.Tensor  # [B] int64, rows of the ReqToTokenPool
    seq_lens: torch.Tensor  # [B] int64, KV length after this step
    extend_prefix_lens: torch.Tensor | None = None  # [B] int64 (EXTEND only)
    extend_seq_lens: torch.Tensor | None = None  # [B] int64 (EXTEND only)
    # Python copies for host-side loops (same values as the tensors above).
    seq_lens_cpu: list[int] | None = None
    extend_prefix_lens_cpu: list[int] | None = None
    extend_seq_lens_cpu: list[int] | None = None
    # EXTEND only, optional: indices into the T tokens whose logits are wanted too (prompt
    # logprobs); their rows follow the B last-token rows in the forward's output.
    extra_logit_indices: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def extend(
        cls,
        input_ids: list[int],
        out_cache_loc: list[int],
        req_pool_indices: list[int],
        prefix_lens: list[int],
        extend_lens: list[int],
        device: torch.device | str,
    ) -> ForwardBatch:
        positions = [
            p for pre, n in zip(prefix_lens, extend_lens, strict=True) for p in range(pre, pre + n)
        ]
        seq_lens = [pre + n for pre, n in zip(prefix_lens, extend_lens, strict=True)]
        return cls(
            mode=ForwardMode.EXTEND,
            batch_size=len(req_pool_indices),
            input_ids=_t(input_ids, device),
            positions=_t(positions, device),
            out_cache_loc=_t(out_cache_loc, device),
            req_pool_indices=_t(req_pool_indices, device),
            seq_lens=_t(seq_lens, device),
            extend_prefix_lens=_t(prefix_lens, device),
            extend_seq_lens=_t(extend_lens, device),
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=list(prefix_lens),
            extend_seq_lens_cpu=list(extend_lens),
        )

    @classmethod
    def decode(
        cls,
        input_ids: list[int],
        out_cache_loc: list[int],
        req_pool_indices: list[int],
        seq_lens: list[int],
        device: torch.device | str,
    ) -> ForwardBatch:
        return cls(
            mode=ForwardMode.DECODE,
            batch_size=len(req_pool_indices),
            input_ids=_t(input_ids, device),
            positions=_t([n - 1 for n in seq_lens], device),
            out_cache_loc=_t(out_cache_loc, device),
            req_pool_indices=_t(req_pool_indices, device),
            seq_lens=_t(seq_lens, device),
            seq_lens_cpu=list(seq_lens),
        )


def _t(values: list[int], device: torch.device | str) -> torch.Tensor:
    # NOTE: built on the host, then copied without waiting for the device (a tensor made
    # directly on the GPU from a list would synchronize the stream).
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
