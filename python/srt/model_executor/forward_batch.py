"""ForwardBatch: the tensors of one model step, built in the scheduler process from the Rust
batch plan and read by the ModelRunner, the attention backend and the sampler.

Layout (T = tokens computed this step, B = sequences):
- EXTEND (prefill, possibly on top of a cached prefix or earlier chunks): sequence i computes
  `extend_seq_lens[i]` new tokens after `extend_prefix_lens[i]` tokens already in KV.
- DECODE: every sequence computes one token (T == B).
KV slots of sequence i for positions [0, seq_lens[i]) are
`req_to_token[req_pool_indices[i], :seq_lens[i]]` (the ReqToTokenPool, written before the
forward); the new tokens' KV is written to `out_cache_loc` (aligned with input_ids).

Every ForwardBatch made by `extend` / `decode` keeps its host-side inputs as a `StepInput`,
which also carries the step's req_to_token writes (`set_table_writes`). Under tensor or
pipeline parallel the ModelRunner of rank 0 broadcasts that StepInput and every rank rebuilds
the same batch from it (`from_step`) and applies the same writes to its own table; a pipeline
stage runs micro-batches of it (`split`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgspec
import torch


class StepInput(msgspec.Struct, kw_only=True):
    """The host-side inputs of one forward (what a ForwardBatch is built from)."""

    decode: bool
    input_ids: list[int]
    out_cache_loc: list[int]
    req_pool_indices: list[int]
    seq_lens: list[int]
    prefix_lens: list[int] = []  # EXTEND only
    extend_lens: list[int] = []  # EXTEND only
    extra_logit_indices: list[int] = []  # EXTEND only
    # req_to_token writes of the step: table[rows[i], starts[i] : starts[i] + lens[i]] = the
    # next lens[i] values of slots.
    table_rows: list[int] = []
    table_starts: list[int] = []
    table_lens: list[int] = []
    table_slots: list[int] = []

    def split(self, n: int) -> list[StepInput]:
        """Up to `n` micro-batches of consecutive sequences (the table writes stay with the
        whole step). Their logits, last rows of each then extra rows of each, concatenate to
        this step's layout."""
        b = len(self.req_pool_indices)
        n = max(1, min(n, b))
        bounds = [i * b // n for i in range(n + 1)]
        if self.decode:
            return [
                StepInput(
                    decode=True,
                    input_ids=self.input_ids[lo:hi],
                    out_cache_loc=self.out_cache_loc[lo:hi],
                    req_pool_indices=self.req_pool_indices[lo:hi],
                    seq_lens=self.seq_lens[lo:hi],
                )
                for lo, hi in zip(bounds, bounds[1:], strict=False)
            ]
        token_start = [0]
        for length in self.extend_lens:
            token_start.append(token_start[-1] + length)
        parts = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            t0, t1 = token_start[lo], token_start[hi]
            parts.append(
                StepInput(
                    decode=False,
                    input_ids=self.input_ids[t0:t1],
                    out_cache_loc=self.out_cache_loc[t0:t1],
                    req_pool_indices=self.req_pool_indices[lo:hi],
                    seq_lens=self.seq_lens[lo:hi],
                    prefix_lens=self.prefix_lens[lo:hi],
                    extend_lens=self.extend_lens[lo:hi],
                    extra_logit_indices=[i - t0 for i in self.extra_logit_indices if t0 <= i < t1],
                )
            )
        return parts

    @property
    def num_logit_rows(self) -> int:
        return len(self.req_pool_indices) + len(self.extra_logit_indices)


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
    # Host-side inputs (and table writes) this batch was built from.
    step: StepInput | None = None

    def set_extra_logit_indices(self, indices: list[int]) -> None:
        """EXTEND only: token positions whose logits are wanted after the B last rows."""
        assert self.step is not None and not self.is_decode
        self.step.extra_logit_indices = list(indices)
        device = self.input_ids.device
        self.extra_logit_indices = _t(indices, device) if indices else None

    def set_table_writes(
        self, rows: list[int], starts: list[int], lens: list[int], slots: list[int]
    ) -> None:
        """req_to_token writes the ModelRunner applies (on every rank) before the forward."""
        assert self.step is not None
        self.step.table_rows, self.step.table_starts = rows, starts
        self.step.table_lens, self.step.table_slots = lens, slots

    @classmethod
    def from_step(cls, step: StepInput, device: torch.device | str) -> ForwardBatch:
        if step.decode:
            batch = cls.decode(
                step.input_ids, step.out_cache_loc, step.req_pool_indices, step.seq_lens, device
            )
        else:
            batch = cls.extend(
                step.input_ids,
                step.out_cache_loc,
                step.req_pool_indices,
                step.prefix_lens,
                step.extend_lens,
                device,
            )
            if step.extra_logit_indices:
                batch.set_extra_logit_indices(step.extra_logit_indices)
        assert batch.step is not None
        batch.step.table_rows, batch.step.table_starts = step.table_rows, step.table_starts
        batch.step.table_lens, batch.step.table_slots = step.table_lens, step.table_slots
        return batch

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
            extend_prefix_lens_cpu=prefix_lens,
            extend_seq_lens_cpu=extend_lens,
            step=StepInput(
                decode=False,
                input_ids=input_ids,
                out_cache_loc=out_cache_loc,
                req_pool_indices=req_pool_indices,
                seq_lens=seq_lens,
                prefix_lens=prefix_lens,
                extend_lens=extend_lens,
            ),
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
            seq_lens_cpu=seq_lens,
            step=StepInput(
                decode=True,
                input_ids=input_ids,
                out_cache_loc=out_cache_loc,
                req_pool_indices=req_pool_indices,
                seq_lens=seq_lens,
            ),
        )


def _t(values: list[int], device: torch.device | str) -> torch.Tensor:
    # NOTE: built on the host, then copied without waiting for the device (a tensor made
    # directly on the GPU from a list would synchronize the stream).
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
