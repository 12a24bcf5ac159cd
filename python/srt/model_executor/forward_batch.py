"""ForwardBatch: one model step on the model's device.

Built from a `StepInput` (step_input.py, which describes the layout): one host-to-device copy
of its int buffer (from pinned memory on CUDA, so it never waits for the device), its sections
as tensor views, and host copies of the lengths for the attention backends' planning.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from srt.model_executor.step_input import SECTION_INDEX, StepInput


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
    # Host copies for host-side planning (same values as the tensors above).
    seq_lens_cpu: np.ndarray | None = None
    extend_prefix_lens_cpu: np.ndarray | None = None
    extend_seq_lens_cpu: np.ndarray | None = None
    # EXTEND only, optional: indices into the T tokens whose logits are wanted too (prompt
    # logprobs); their rows follow the B last-token rows in the forward's output.
    extra_logit_indices: torch.Tensor | None = None
    # The step this batch was built from, and its whole int buffer on the device (table
    # writes and sampling sections are views of it).
    step: StepInput | None = None
    device_ints: torch.Tensor | None = None

    @classmethod
    def from_step(cls, step: StepInput, device: torch.device | str) -> ForwardBatch:
        dev = to_device(step.ints, torch.device(device))
        o = step.offsets

        def view(name: str) -> torch.Tensor:
            i = SECTION_INDEX[name]
            return dev[o[i] : o[i + 1]]

        decode = step.decode
        seq_lens = step.section("seq_lens")
        batch = cls(
            mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
            batch_size=step.num_seqs,
            input_ids=view("input_ids"),
            positions=view("positions"),
            out_cache_loc=view("out_loc"),
            req_pool_indices=view("rows"),
            seq_lens=view("seq_lens"),
            seq_lens_cpu=seq_lens,
            step=step,
            device_ints=dev,
        )
        if not decode:
            batch.extend_prefix_lens = view("prefix_lens")
            batch.extend_seq_lens = view("extend_lens")
            batch.extend_prefix_lens_cpu = step.section("prefix_lens")
            batch.extend_seq_lens_cpu = step.section("extend_lens")
            if step.extra_logit_indices:
                batch.extra_logit_indices = to_device(
                    np.asarray(step.extra_logit_indices, dtype=np.int64), batch.input_ids.device
                )
        return batch

    @classmethod
    def extend(
        cls,
        input_ids: Sequence[int],
        out_cache_loc: Sequence[int],
        req_pool_indices: Sequence[int],
        prefix_lens: Sequence[int],
        extend_lens: Sequence[int],
        device: torch.device | str,
    ) -> ForwardBatch:
        """An extend batch from lists (tests, benchmarks); the table is written by the caller."""
        seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens, strict=True)]
        step = StepInput.build(
            False, input_ids, out_cache_loc, req_pool_indices, seq_lens, prefix_lens, extend_lens
        )
        return cls.from_step(step, device)

    @classmethod
    def decode(
        cls,
        input_ids: Sequence[int],
        out_cache_loc: Sequence[int],
        req_pool_indices: Sequence[int],
        seq_lens: Sequence[int],
        device: torch.device | str,
    ) -> ForwardBatch:
        """A decode batch from lists (tests, benchmarks); the table is written by the caller."""
        step = StepInput.build(True, input_ids, out_cache_loc, req_pool_indices, seq_lens)
        return cls.from_step(step, device)

    def section(self, name: str) -> torch.Tensor:
        """A section of the step's int buffer on the device."""
        assert self.step is not None and self.device_ints is not None
        i = SECTION_INDEX[name]
        return self.device_ints[self.step.offsets[i] : self.step.offsets[i + 1]]

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def to_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """`arr` as a tensor on `device` (shared on the CPU; copied without waiting elsewhere)."""
    host = torch.from_numpy(arr)
    if device.type == "cpu":
        return host  # NOTE: shares the buffer; nothing here writes to it
    # NOTE: staged through pinned memory: a copy from pageable memory would wait for the
    # device's stream to drain, which is what overlap scheduling must avoid.
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)
