"""The sampler: next-token ids from last-position logits, on the model's device.

Lives in the scheduler process. Once per step the scheduler builds a `SamplingBatchInfo` from
the running requests' `SamplingParams` and token histories (host lists -> a few small device
tensors), then calls `Sampler()(logits, info)` with fp32 logits [B, V] and gets int64 token ids
[B] back, still on the device. Nothing inside the call syncs with the host.

Order of operations on each row: logit_bias -> repetition_penalty (HF semantics, over prompt and
output tokens) -> frequency / presence penalties (OpenAI semantics, over output tokens) ->
min_new_tokens (stop ids masked while too few tokens are out) -> greedy rows take the argmax;
the others are divided by their temperature, softmaxed, filtered by top_k, top_p (over the
top-k renormalized distribution) and min_p, and drawn by inverse CDF in vocabulary order.
One sort serves every row's top_k / top_p; it is skipped when no sampled row needs it.

Determinism: the draw of row i uses one uniform number derived from (seeds[i], steps[i]) by a
counter-based hash (splitmix64), so a seeded request yields the same tokens whatever else is in
the batch and in whatever order. NOTE: this holds exactly on CPU; on a GPU the logits
themselves may differ in the last bits with batch size (kernel choice), which no sampler fixes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from srt.sampling_params import SamplingParams

# splitmix64 constants, written as the signed int64 values of their unsigned bit patterns.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_U24 = 1.0 / (1 << 24)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # NOTE: torch shifts int64 arithmetically; masking the sign-extended bits makes it logical.
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (two's-complement wrap-around arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def seeded_uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float32 in [0, 1) per (seed, step), a pure function of the pair."""
    h = splitmix64(splitmix64(seeds) + steps)
    # The top 24 bits fill a float32 mantissa exactly, so the result is < 1 by construction.
    return _shr(h, 40).to(torch.float32) * _U24


@dataclass
class SamplingBatchInfo:
    """Per-step sampling state of a batch: device tensors plus host flags chosen at build.

    Tensors named *_flat hold flat indices into a [rows, vocab] matrix; they are None when no
    request in the batch needs that feature, which keeps a plain batch to a few small tensors.
    """

    vocab_size: int
    temperatures: torch.Tensor  # [B, 1] fp32; 1.0 on greedy rows (never divided by zero)
    top_ks: torch.Tensor  # [B] int64; vocab_size when top-k is off
    top_ps: torch.Tensor  # [B] fp32
    min_ps: torch.Tensor  # [B] fp32
    is_greedy: torch.Tensor  # [B] bool
    uniforms: torch.Tensor | None  # [B] fp32 in [0, 1), from (seed, step); None if all greedy
    all_greedy: bool
    need_sort: bool  # some sampled row uses top_k or top_p
    need_min_p: bool
    # logit_bias: logits.view(-1)[flat] += values
    bias_flat: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    # Penalties touch only the rows that have one: `penalty_rows` [P]; flat indices into [P, V].
    penalty_rows: torch.Tensor | None = None
    repetition_penalties: torch.Tensor | None = None  # [P, 1]
    frequency_penalties: torch.Tensor | None = None  # [P, 1]
    presence_penalties: torch.Tensor | None = None  # [P, 1]
    seen_flat: torch.Tensor | None = None  # prompt + output tokens of repetition-penalized rows
    output_flat: torch.Tensor | None = None  # output tokens (with repeats) of the P rows
    # min_new_tokens: logits.view(-1)[flat] = -inf
    min_tokens_flat: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        stop_ids: Sequence[set[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatchInfo:
        """Builds the step's tensors. `vocab_size` must be the logits' last dimension.

        Token ids outside [0, vocab_size) in stop_ids or logit_bias are dropped rather than
        sent to an index kernel (where they would be a device-side assert); the main process
        rejects them at validation already.
        """
        n = len(params)
        if not (len(seeds) == len(steps) == len(prompt_ids) == len(output_ids) == len(stop_ids)):
            raise ValueError("SamplingBatchInfo.build: per-request lists differ in length")
        V = vocab_size
        greedy = [p.is_greedy for p in params]
        floats = torch.tensor(
            [
                [1.0 if g else p.temperature, p.top_p, p.min_p]
                for p, g in zip(params, greedy, strict=True)
            ],
            dtype=torch.float32,
        ).reshape(n, 3)
        ints = torch.tensor(
            [
                [p.top_k if 0 < p.top_k < V else V, int(g), s, t]
                for p, g, s, t in zip(params, greedy, seeds, steps, strict=True)
            ],
            dtype=torch.int64,
        ).reshape(n, 4)
        floats = floats.to(device, non_blocking=True)
        ints = ints.to(device, non_blocking=True)
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        info = cls(
            vocab_size=V,
            temperatures=floats[:, 0:1],
            top_ps=floats[:, 1],
            min_ps=floats[:, 2],
            top_ks=ints[:, 0],
            is_greedy=ints[:, 1].bool(),
            # NOTE: ~14 small kernels; an all-greedy batch (the common decode step) skips them.
            uniforms=seeded_uniforms(ints[:, 2], ints[:, 3]) if sampled else None,
            all_greedy=not sampled,
            need_sort=any(0 < p.top_k < V or p.top_p < 1.0 for p in sampled),
            need_min_p=any(p.min_p > 0.0 for p in sampled),
        )

        bias_idx: list[int] = []
        bias_val: list[float] = []
        for i, p in enumerate(params):
            for tok, b in (p.logit_bias or {}).items():
                if 0 <= tok < V:
                    bias_idx.append(i * V + tok)
                    bias_val.append(b)
        if bias_idx:
            info.bias_flat = _long(bias_idx, device)
            info.bias_values = torch.tensor(bias_val, dtype=torch.float32).to(device)

        min_idx = [
            i * V + tok
            for i, (p, step, stops) in enumerate(zip(params, steps, stop_ids, strict=True))
            if step < p.min_new_tokens
            for tok in stops
            if 0 <= tok < V
        ]
        if min_idx:
            info.min_tokens_flat = _long(min_idx, device)

        rows = [
            i
            for i, p in enumerate(params)
            if p.repetition_penalty != 1.0
            or p.frequency_penalty != 0.0
            or p.presence_penalty != 0.0
        ]
        if rows:
            info._build_penalties(rows, params, prompt_ids, output_ids, device)
        return info

    def _build_penalties(
        self,
        rows: list[int],
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        device: torch.device | str,
    ) -> None:
        V = self.vocab_size
        pen = torch.tensor(
            [
                [
                    params[i].repetition_penalty,
                    params[i].frequency_penalty,
                    params[i].presence_penalty,
                ]
                for i in rows
            ],
            dtype=torch.float32,
        ).to(device)
        self.penalty_rows = _long(rows, device)
        self.repetition_penalties = pen[:, 0:1]
        self.frequency_penalties = pen[:, 1:2]
        self.presence_penalties = pen[:, 2:3]

        # Row numbers and token ids are shipped as two flat lists and combined on the device:
        # cheaper on the host than computing r * V + t per token in Python.
        seen_r: list[list[int]] = []
        seen_t: list[Sequence[int]] = []
        out_r: list[list[int]] = []
        out_t: list[Sequence[int]] = []
        for r, i in enumerate(rows):
            p = params[i]
            if p.repetition_penalty != 1.0:
                for ids in (prompt_ids[i], output_ids[i]):
                    seen_r.append([r] * len(ids))
                    seen_t.append(ids)
            if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                out_r.append([r] * len(output_ids[i]))
                out_t.append(output_ids[i])
        self.seen_flat = _flat(seen_r, seen_t, V, device)
        self.output_flat = _flat(out_r, out_t, V, device)


def _long(values: list[int], device: torch.device | str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def _flat(
    rows: list[list[int]], toks: list[Sequence[int]], V: int, device: torch.device | str
) -> torch.Tensor | None:
    r = list(itertools.chain.from_iterable(rows))
    if not r:
        return None
    both = torch.tensor([r, list(itertools.chain.from_iterable(toks))], dtype=torch.int64)
    both = both.to(device, non_blocking=True)
    return both[0] * V + both[1]


class Sampler:
    """Picks next tokens. Stateless; one instance serves the whole scheduler."""

    def __call__(self, logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != info.vocab_size:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match the batch info's "
                f"vocab_size {info.vocab_size}"
            )
        logits = self.process_logits(logits.float(), info)
        greedy_ids = logits.argmax(dim=-1)
        if info.all_greedy:
            return greedy_ids
        sampled_ids = self._sample(logits, info)
        return torch.where(info.is_greedy, greedy_ids, sampled_ids)

    @staticmethod
    def process_logits(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """Applies logit_bias, penalties and min_new_tokens; returns a new tensor when any
        applies (the caller's logits stay intact), else the input itself."""
        if info.bias_flat is None and info.penalty_rows is None and info.min_tokens_flat is None:
            return logits
        logits = logits.clone()
        flat = logits.view(-1)
        if info.bias_flat is not None:
            flat.index_add_(0, info.bias_flat, info.bias_values)
        if info.penalty_rows is not None:
            rows = info.penalty_rows
            sub = logits.index_select(0, rows)
            P, V = sub.shape
            if info.seen_flat is not None:
                seen = torch.zeros(P * V, dtype=torch.bool, device=sub.device)
                seen = seen.index_fill_(0, info.seen_flat, True).view(P, V)
                rp = info.repetition_penalties
                sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
            if info.output_flat is not None:
                counts = torch.zeros(P * V, dtype=torch.float32, device=sub.device)
                ones = torch.ones_like(info.output_flat, dtype=torch.float32)
                counts = counts.index_add_(0, info.output_flat, ones).view(P, V)
                sub = (
                    sub
                    - info.frequency_penalties * counts
                    - info.presence_penalties * (counts > 0).float()
                )
            logits.index_copy_(0, rows, sub)
        if info.min_tokens_flat is not None:
            flat.index_fill_(0, info.min_tokens_flat, float("-inf"))
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """Inverse-CDF draw of every row (greedy rows too; the caller discards those)."""
        probs = torch.softmax(logits / info.temperatures, dim=-1)
        if info.need_sort:
            # NOTE: stable, so ties keep vocabulary order and a seed keeps one outcome.
            sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            rank = torch.arange(probs.shape[1], device=probs.device)
            beyond_k = rank >= info.top_ks[:, None]
            sorted_p = sorted_p.masked_fill(beyond_k, 0.0)
            cum = sorted_p.cumsum(dim=-1)
            # top_p over the top-k survivors, renormalized (the HF / vLLM order): keep a
            # token while the mass before it is within top_p; the first is always kept.
            # With top_p == 1 nothing goes, as cum - p <= cum <= total holds in floats too.
            drop = beyond_k | ((cum - sorted_p) > info.top_ps[:, None] * cum[:, -1:])
            probs = probs.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), 0.0)
        if info.need_min_p:
            top = probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < info.min_ps[:, None] * top, 0.0)
        # NOTE: the draw walks the vocabulary in id order, never the sorted order, so a row's
        # token depends only on its own (filtered) distribution and uniform, not on whether
        # a batch-mate made this step sort.
        assert info.uniforms is not None, "a batch with sampled rows has uniforms"
        cum = probs.cumsum(dim=-1)
        total = cum[:, -1:]
        # The target stays strictly below the total, so the first entry whose cumulative mass
        # exceeds it exists and has a positive probability (a float cumulative sum of
        # non-negative terms is monotone): a filtered token is never drawn.
        target = torch.minimum(
            info.uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total))
        )
        idx = torch.searchsorted(cum, target, right=True)
        # Only a NaN row (a broken model) can reach V; clamp so it cannot fault downstream.
        return idx.clamp_(max=probs.shape[1] - 1).squeeze(1)
