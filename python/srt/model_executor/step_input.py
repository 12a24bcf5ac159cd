"""StepInput: one model step as the Rust planner hands it over, on the host.

`StepInput` wraps `srt._native.Step`: one int64 buffer cut into named sections
(`srt._native.STEP_SECTIONS`: request ids, rows, sequence lengths, input ids, positions, KV
slots, table writes, sampling rows, admissions, ...) and one float32 buffer, read without a
copy. `ForwardBatch` (forward_batch.py) is the same step on the model's device. Importing this
module does not import torch (the scheduler's native CPU path runs without it).

Layout (T = tokens computed this step, B = sequences):
- EXTEND (prefill, possibly on top of a cached prefix or earlier chunks): sequence i computes
  `extend_lens[i]` new tokens after `prefix_lens[i]` tokens already in KV.
- DECODE: every sequence computes one token (T == B). An input id of -1 is a token still being
  sampled by the previous step; the step worker reads it from that step's output.
KV slots of sequence i for positions [0, seq_lens[i]) are
`req_to_token[rows[i], :seq_lens[i]]`; the step's table writes bring those rows up to date
before the forward, and the new tokens' KV is written to `out_loc`.

Tensor / pipeline parallel: rank 0 broadcasts the StepInput (`encode` / `decode`); every rank
rebuilds the same ForwardBatch and applies the same table writes; a pipeline stage runs
micro-batches of it (`split`).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from srt._native import STEP_FLOAT_SECTIONS, STEP_SECTIONS, Step

SECTION_INDEX = {name: i for i, name in enumerate(STEP_SECTIONS)}
_FLOAT_INDEX = {name: i for i, name in enumerate(STEP_FLOAT_SECTIONS)}


class _Wire(msgspec.Struct, array_like=True):
    decode: bool
    ints: bytes
    offsets: list[int]
    extra_logit_indices: list[int]


_PER_SEQ = ("ids", "rows", "seq_lens", "prefix_lens", "extend_lens", "seq_flags")
_PER_TOKEN = ("input_ids", "positions", "out_loc")
_EMPTY = np.zeros(0, dtype=np.int64)
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Wire)


class StepInput:
    """The host arrays of one step (see the module docstring)."""

    __slots__ = (
        "decode",
        "ints",
        "offsets",
        "floats",
        "float_offsets",
        "flags",
        "all_flags",
        "top_k_max",
        "extra_logit_indices",
    )

    def __init__(
        self,
        decode: bool,
        ints: np.ndarray,
        offsets: Sequence[int],
        floats: np.ndarray | None = None,
        float_offsets: Sequence[int] | None = None,
        flags: int = 0,
        all_flags: int = 0,
        top_k_max: int = 0,
    ) -> None:
        self.decode = decode
        self.ints = ints
        self.offsets = [int(o) for o in offsets]
        self.floats = floats if floats is not None else np.zeros(0, dtype=np.float32)
        self.float_offsets = (
            [int(o) for o in float_offsets]
            if float_offsets is not None
            else [0] * (len(STEP_FLOAT_SECTIONS) + 1)
        )
        self.flags = flags
        self.all_flags = all_flags
        self.top_k_max = top_k_max
        # EXTEND only, optional: token indices whose logits are wanted too (prompt logprobs);
        # their rows follow the B last-token rows in the forward's output.
        self.extra_logit_indices: list[int] = []

    @classmethod
    def from_native(cls, step: Step) -> StepInput:
        """Wraps an `srt._native.Step` (its arrays are shared, not copied)."""
        return cls(
            decode=step.kind == "decode",
            ints=step.ints,
            offsets=step.offsets.tolist(),
            floats=step.floats,
            float_offsets=step.float_offsets.tolist(),
            flags=step.flags,
            all_flags=step.all_flags,
            top_k_max=step.top_k_max,
        )

    @classmethod
    def build(
        cls,
        decode: bool,
        input_ids: Sequence[int],
        out_cache_loc: Sequence[int],
        rows: Sequence[int],
        seq_lens: Sequence[int],
        prefix_lens: Sequence[int] = (),
        extend_lens: Sequence[int] = (),
    ) -> StepInput:
        """A step from Python lists (tests, benchmarks): each sequence's new positions, no
        table writes (the caller writes the table), nothing sampled."""
        if decode:
            positions = [n - 1 for n in seq_lens]
        else:
            positions = [
                p
                for pre, n in zip(prefix_lens, extend_lens, strict=True)
                for p in range(pre, pre + n)
            ]
        parts = {
            "ids": list(range(len(rows))),
            "rows": rows,
            "seq_lens": seq_lens,
            "prefix_lens": prefix_lens,
            "extend_lens": extend_lens,
            "seq_flags": [0] * len(rows),
            "input_ids": input_ids,
            "positions": positions,
            "out_loc": out_cache_loc,
        }
        return cls.pack(decode, parts)

    @classmethod
    def pack(cls, decode: bool, parts: dict[str, Sequence[int] | np.ndarray]) -> StepInput:
        """A step from named sections (missing ones are empty)."""
        arrays = [np.asarray(parts.get(name, ()), dtype=np.int64) for name in STEP_SECTIONS]
        offsets = np.cumsum([0] + [len(a) for a in arrays]).tolist()
        return cls(decode, np.concatenate(arrays), offsets)

    def section(self, name: str) -> np.ndarray:
        i = SECTION_INDEX[name]
        return self.ints[self.offsets[i] : self.offsets[i + 1]]

    def float_section(self, name: str) -> np.ndarray:
        i = _FLOAT_INDEX[name]
        return self.floats[self.float_offsets[i] : self.float_offsets[i + 1]]

    @property
    def num_seqs(self) -> int:
        i = SECTION_INDEX["ids"]
        return self.offsets[i + 1] - self.offsets[i]

    @property
    def num_tokens(self) -> int:
        i = SECTION_INDEX["input_ids"]
        return self.offsets[i + 1] - self.offsets[i]

    @property
    def num_logit_rows(self) -> int:
        return self.num_seqs + len(self.extra_logit_indices)

    def encode(self) -> bytes:
        """The forward's part of the step, for the other ranks (sampling stays on rank 0)."""
        return _ENCODER.encode(
            _Wire(
                decode=self.decode,
                ints=self.ints.tobytes(),
                offsets=self.offsets,
                extra_logit_indices=self.extra_logit_indices,
            )
        )

    @classmethod
    def decode_bytes(cls, data: bytes) -> StepInput:
        w = _DECODER.decode(data)
        step = cls(w.decode, np.frombuffer(bytearray(w.ints), dtype=np.int64), w.offsets)
        step.extra_logit_indices = list(w.extra_logit_indices)
        return step

    def select(self, keep: np.ndarray) -> tuple[StepInput, np.ndarray]:
        """The same step with only the sequences at batch positions `keep` (ascending), and
        the indices of its samples among this step's. Table writes and admissions stay whole
        (writing them again is harmless)."""
        keep = np.asarray(keep, dtype=np.int64)
        if self.decode:
            tokens = keep
        else:
            lens = self.section("extend_lens")
            starts = np.concatenate(([0], np.cumsum(lens)))
            tokens = np.concatenate(
                [np.arange(starts[i], starts[i + 1]) for i in keep.tolist()] or [_EMPTY]
            )
        parts: dict[str, np.ndarray] = {}
        for name in STEP_SECTIONS:
            arr = self.section(name)
            if name in _PER_SEQ:
                parts[name] = arr[keep] if len(arr) else arr
            elif name in _PER_TOKEN:
                parts[name] = arr[tokens]
            else:
                parts[name] = arr
        new_pos = np.full(self.num_seqs, -1, dtype=np.int64)
        new_pos[keep] = np.arange(len(keep))
        sample_pos = self.section("sample_pos")
        kept = np.nonzero(new_pos[sample_pos] >= 0)[0]
        parts["sample_pos"] = new_pos[sample_pos[kept]]
        parts["sample_rows"] = self.section("sample_rows")[kept]
        parts["sample_steps"] = self.section("sample_steps")[kept]
        new_sample = np.full(len(sample_pos), -1, dtype=np.int64)
        new_sample[kept] = np.arange(len(kept))
        mask_sample = new_sample[self.section("mask_sample")]
        parts["mask_sample"] = mask_sample[mask_sample >= 0]
        parts["mask_tokens"] = self.section("mask_tokens")[mask_sample >= 0]
        sub = StepInput.pack(self.decode, parts)
        sub.floats, sub.float_offsets = self.floats, self.float_offsets
        seq_flags = sub.section("seq_flags")
        sub.all_flags = int(np.bitwise_or.reduce(seq_flags)) if len(seq_flags) else 0
        sampled = seq_flags[sub.section("sample_pos")]
        sub.flags = int(np.bitwise_or.reduce(sampled)) if len(sampled) else 0
        sub.top_k_max = self.top_k_max
        return sub, kept

    def split(self, n: int) -> list[StepInput]:
        """Up to `n` micro-batches of consecutive sequences (the table writes stay with the
        whole step). Their logits, last rows of each then extra rows of each, concatenate to
        this step's layout."""
        b = self.num_seqs
        n = max(1, min(n, b))
        if n == 1:
            return [self]
        bounds = [i * b // n for i in range(n + 1)]
        if self.decode:
            token_start = list(range(b + 1))
        else:
            token_start = [0, *np.cumsum(self.section("extend_lens")).tolist()]
        parts = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            t0, t1 = token_start[lo], token_start[hi]
            sections: dict[str, np.ndarray] = {}
            for name in _PER_SEQ:
                arr = self.section(name)
                sections[name] = arr[lo:hi] if len(arr) else arr
            for name in _PER_TOKEN:
                sections[name] = self.section(name)[t0:t1]
            part = StepInput.pack(self.decode, sections)
            part.extra_logit_indices = [i - t0 for i in self.extra_logit_indices if t0 <= i < t1]
            parts.append(part)
        return parts
