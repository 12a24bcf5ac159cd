"""Sampling: next-token ids from last-position logits, on the model's device, in the step worker.

`SamplingState` holds every request's sampling parameters and token history in per-row tensors
(rows are the request-to-token table rows the Rust scheduler hands out). A row is written once,
when a request is admitted to it (the step's admission sections: parameters, logit bias, and
the prompt / output tokens its penalties need); each step then only gathers the rows of its
sampling sequences and adds its new tokens to the penalty counts. Nothing is rebuilt from
per-request objects, and a step whose rows need none of a feature (the step's flags, OR-ed by
the planner) skips it: an all-greedy batch without penalties is one argmax.

Order of operations on each row: logit_bias -> repetition_penalty (HF semantics, over prompt and
output tokens) -> frequency / presence penalties (OpenAI semantics, over output tokens) ->
min_new_tokens (stop ids masked while too few tokens are out) -> greedy rows take the argmax;
the others are divided by their temperature, softmaxed, filtered by top_k, top_p (over the
top-k renormalized distribution) and min_p, and drawn by inverse CDF in vocabulary order.

Two implementations of that order: torch ops (on a GPU), and on the CPU srt-kernels `sampling`
(`_sample_cpu`): one native pass per row for the penalties, temperature and softmax, numpy's
sort for top-k / top-p, one native pass per row for the filters and the draw, which is bit for
bit the torch draw over the same probabilities (tests/test_cpu_kernels.py). The softmax's exp
differs from torch's in the last bits, so CPU and GPU draws agree in distribution, not bitwise
(as the logits themselves would not).

Determinism: the draw of a row uses one uniform number derived from (seed, output index) by a
counter-based hash (splitmix64), so a seeded request yields the same tokens whatever else is in
the batch and in whatever order. NOTE: this holds exactly on CPU; on a GPU the logits
themselves may differ in the last bits with batch size (kernel choice), which no sampler fixes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from srt._native import (
    ADMIT_FLOATS,
    FLAG_GREEDY,
    FLAG_LOGIT_BIAS,
    FLAG_MIN_P,
    FLAG_OUTPUT_PENALTY,
    FLAG_PRESENCE_PENALTY,
    FLAG_REPETITION_PENALTY,
    FLAG_SAMPLED,
    FLAG_TOP_K_P,
)
from srt.layers.host_sampler import (  # the columns of SamplingState.floats too
    FREQUENCY,
    MIN_P,
    PRESENCE,
    REPETITION,
    TEMPERATURE,
    TOP_P,
    RowTables,
    Scratch,
    draw_rows,
)
from srt.model_executor.forward_batch import to_device

if TYPE_CHECKING:
    from srt.model_executor.forward_batch import ForwardBatch

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


class SamplingState:
    """Per-row sampling parameters, token history and last sampled token (see the module
    docstring). The penalty and bias tables ([rows, vocab]) are allocated the first time an
    admitted request needs them."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str) -> None:
        self.rows = rows
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        d = self.device
        self.floats = torch.zeros((rows, ADMIT_FLOATS), dtype=torch.float32, device=d)
        self.floats[:, TEMPERATURE] = 1.0
        self.top_k = torch.full((rows,), vocab_size, dtype=torch.int64, device=d)
        self.greedy = torch.ones(rows, dtype=torch.bool, device=d)
        self.seeds = torch.zeros(rows, dtype=torch.int64, device=d)
        # The token each row sampled last: a decode step's input when its host copy is not
        # known yet (overlap).
        self.last_token = torch.zeros(rows, dtype=torch.int64, device=d)
        self.counts: torch.Tensor | None = None  # output token counts (frequency / presence)
        self.seen: torch.Tensor | None = None  # prompt + output tokens (repetition)
        self.bias: torch.Tensor | None = None  # logit bias
        self._scratch = Scratch(vocab_size)  # the CPU draw's buffers

    def _table(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros((self.rows, self.vocab_size), dtype=dtype, device=self.device)

    def admit(self, batch: ForwardBatch) -> None:
        """Writes the rows the step admits: parameters, logit bias, penalty history."""
        rows = batch.section("admit_rows")
        if rows.numel() == 0:
            return
        step = batch.step
        assert step is not None
        V = self.vocab_size
        f = to_device(step.float_section("admit_floats"), self.device).view(-1, ADMIT_FLOATS)
        f = f.clone()  # NOTE: on the CPU it shares the step's buffer
        top_k = batch.section("admit_top_k")
        greedy = (f[:, TEMPERATURE] == 0.0) | (top_k == 1)
        # NOTE: greedy rows keep temperature 1 so a sampled pass never divides by zero.
        f[:, TEMPERATURE] = torch.where(greedy, 1.0, f[:, TEMPERATURE])
        self.floats[rows] = f
        self.top_k[rows] = torch.where((top_k > 0) & (top_k < V), top_k, V)
        self.greedy[rows] = greedy
        self.seeds[rows] = batch.section("admit_seed")
        bias_rows = batch.section("bias_rows")
        if bias_rows.numel() and self.bias is None:
            self.bias = self._table(torch.float32)
        if self.bias is not None:
            # NOTE: every step with a biased row adds the bias of all its rows.
            self.bias[rows] = 0.0
            if bias_rows.numel():
                values = to_device(step.float_section("bias_values"), self.device)
                self.bias[bias_rows, batch.section("bias_tokens")] = values
        count_rows = batch.section("count_rows")
        if self.counts is None and (
            count_rows.numel() or bool(step.all_flags & FLAG_OUTPUT_PENALTY)
        ):
            self.counts = self._table(torch.float32)
        if self.counts is not None:
            self.counts[rows] = 0.0
            if count_rows.numel():
                ones = torch.ones(count_rows.shape, dtype=torch.float32, device=self.device)
                self.counts.index_put_(
                    (count_rows, batch.section("count_tokens")), ones, accumulate=True
                )
        seen_rows = batch.section("seen_rows")
        if self.seen is None and seen_rows.numel():
            self.seen = self._table(torch.bool)
        if self.seen is not None:
            self.seen[rows] = False
            if seen_rows.numel():
                self.seen[seen_rows, batch.section("seen_tokens")] = True

    def record(self, rows: torch.Tensor, ids: torch.Tensor, flags: int) -> None:
        """A step's sampled tokens: each row's last token, and its penalty history."""
        self.last_token[rows] = ids
        if flags & FLAG_OUTPUT_PENALTY and self.counts is not None:
            one = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
            self.counts.index_put_((rows, ids), one, accumulate=True)
        if flags & FLAG_REPETITION_PENALTY and self.seen is not None:
            self.seen[rows, ids] = True

    def sample(
        self,
        logits: torch.Tensor,
        rows: torch.Tensor,
        steps: torch.Tensor,
        flags: int,
        mask_sample: torch.Tensor | None = None,
        mask_tokens: torch.Tensor | None = None,
        top_k_max: int | None = None,
    ) -> torch.Tensor:
        """Token ids [S] for fp32 `logits` [S, V] of the sampling rows `rows` whose next
        output index is `steps`; `flags` (the OR of the rows') and `top_k_max` (the largest
        top-k among the rows that filter) say what any row needs. `logits` is not modified.
        Nothing here waits for the device."""
        V = self.vocab_size
        if logits.dim() != 2 or logits.shape[1] != V:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match the vocabulary size {V}"
            )
        logits = logits.float()
        if flags & FLAG_SAMPLED and logits.device.type == "cpu":
            return self._sample_cpu(logits, rows, steps, flags, mask_sample, mask_tokens, top_k_max)
        logits, owned = self._process(logits, rows, flags, mask_sample, mask_tokens)
        greedy_ids = None
        if flags & FLAG_GREEDY or not flags & FLAG_SAMPLED:
            greedy_ids = _first_argmax(logits)
            if not flags & FLAG_SAMPLED:
                return greedy_ids
        f = self.floats.index_select(0, rows)
        temperature = f[:, TEMPERATURE : TEMPERATURE + 1]
        # NOTE: in place when the logits are already this call's own copy.
        scaled = logits.div_(temperature) if owned else logits / temperature
        probs = torch.softmax(scaled, dim=-1)
        if flags & FLAG_TOP_K_P:
            candidates = V if top_k_max is None else min(top_k_max, V)
            top_k = self.top_k.index_select(0, rows)
            probs = _top_k_top_p(probs, top_k, f[:, TOP_P], candidates)
        if flags & FLAG_MIN_P:
            top = probs.amax(dim=-1, keepdim=True)
            probs = _drop_below(probs, f[:, MIN_P : MIN_P + 1] * top)
        uniforms = seeded_uniforms(self.seeds.index_select(0, rows), steps)
        sampled = _inverse_cdf(probs, uniforms)
        if greedy_ids is None:
            return sampled
        return torch.where(self.greedy.index_select(0, rows), greedy_ids, sampled)

    def _sample_cpu(
        self,
        logits: torch.Tensor,
        rows: torch.Tensor,
        steps: torch.Tensor,
        flags: int,
        mask_sample: torch.Tensor | None,
        mask_tokens: torch.Tensor | None,
        top_k_max: int | None,
    ) -> torch.Tensor:
        """`sample` of a batch with sampled rows on the CPU, in srt-kernels `sampling`: torch
        applies logit bias, repetition penalty and masks (when any row needs them); one native
        pass per row applies the frequency / presence penalties, the temperature and the
        softmax (and finds the greedy rows' argmax); numpy sorts the rows for top-k / top-p;
        one native pass per row filters and draws, bit for bit `_top_k_top_p`, `_drop_below`
        and `_inverse_cdf` over those probabilities."""
        before = flags & ~(FLAG_OUTPUT_PENALTY | FLAG_PRESENCE_PENALTY)
        logits = self._process(logits, rows, before, mask_sample, mask_tokens)[0]
        counts = None if self.counts is None else self.counts.numpy()
        tables = RowTables(
            self.floats.numpy(), counts, self.top_k.numpy(), self.seeds.numpy(), self.greedy.numpy()
        )
        ids = draw_rows(
            logits.numpy(),
            rows.numpy(),
            steps.numpy(),
            flags,
            top_k_max,
            torch.get_num_threads(),
            tables,
            self._scratch,
        )
        return torch.from_numpy(ids)

    def process_logits(
        self,
        logits: torch.Tensor,
        rows: torch.Tensor,
        flags: int,
        mask_sample: torch.Tensor | None = None,
        mask_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Applies logit_bias, penalties and min_new_tokens masks; returns a new tensor when
        any applies (the caller's logits stay intact), else the input itself."""
        return self._process(logits, rows, flags, mask_sample, mask_tokens)[0]

    def _process(
        self,
        logits: torch.Tensor,
        rows: torch.Tensor,
        flags: int,
        mask_sample: torch.Tensor | None,
        mask_tokens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, bool]:
        """`process_logits`, and whether the result is a new tensor (the caller's to modify)."""
        masked = mask_sample is not None and mask_sample.numel() > 0
        penalized = flags & (FLAG_LOGIT_BIAS | FLAG_REPETITION_PENALTY | FLAG_OUTPUT_PENALTY)
        if not penalized and not masked:
            return logits, False
        out: torch.Tensor | None = None  # a new tensor from the first change on
        if flags & FLAG_LOGIT_BIAS and self.bias is not None:
            out = logits + self.bias.index_select(0, rows)
        if flags & (FLAG_REPETITION_PENALTY | FLAG_OUTPUT_PENALTY):
            f = self.floats.index_select(0, rows)
            if flags & FLAG_REPETITION_PENALTY and self.seen is not None:
                seen = self.seen.index_select(0, rows)
                rp = f[:, REPETITION : REPETITION + 1]
                x = logits if out is None else out
                out = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
            if flags & FLAG_OUTPUT_PENALTY and self.counts is not None:
                counts = self.counts.index_select(0, rows)
                weight = f[:, FREQUENCY : FREQUENCY + 1]
                if out is None:
                    out = torch.addcmul(logits, counts, weight, value=-1.0)
                else:
                    out.addcmul_(counts, weight, value=-1.0)
                if flags & FLAG_PRESENCE_PENALTY:
                    present = (counts > 0).to(out.dtype)
                    out.addcmul_(present, f[:, PRESENCE : PRESENCE + 1], value=-1.0)
        if masked:
            if out is None:
                out = logits.clone()
            out[mask_sample, mask_tokens] = float("-inf")
        if out is None:
            return logits, False
        return out, True


def _first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum (argmax semantics)."""
    if logits.device.type == "cpu":
        # NOTE: numpy's SIMD argmax is ~7x torch's max on one CPU thread.
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    # NOTE: max's indices are the first maximum, as argmax's, at a third of its cost.
    return logits.max(dim=-1).indices


def _sorted_values(probs: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's values in ascending order (no indices: tied values are interchangeable),
    and its `cols` largest, largest first."""
    if probs.device.type == "cpu":
        # NOTE: numpy sorts float32 rows with SIMD kernels, ~30x faster than torch.sort on
        # the CPU.
        asc = np.sort(probs.numpy(), axis=-1)
        top = np.ascontiguousarray(asc[:, ::-1][:, :cols])
        return torch.from_numpy(asc), torch.from_numpy(top)
    asc = torch.sort(probs, dim=-1).values
    return asc, asc.flip(1)[:, :cols]


def _top_k_top_p(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, candidates: int
) -> torch.Tensor:
    """Zeroes what each row's top_k and top_p (over the top-k renormalized mass) drop: in
    the order (probability descending, token id ascending), keep the first top_k tokens, and
    of those each token whose preceding mass is within top_p of their total (the first is
    always kept; top_p == 1 keeps all, as cum - p <= cum <= total holds in floats too). A row
    without either filter (top_k >= V, top_p == 1) is left whole. `candidates`: no row keeps
    more than this many tokens through a filter (the largest top_k, or V).

    The kept tokens are a prefix of that order, so they are found from the sorted values
    alone: the value of the last kept rank, and how many tokens of exactly that value (the
    lowest ids) make the cut. No argsort, no scatter."""
    V = probs.shape[1]
    cols = max(1, min(candidates, V))
    ascending, sorted_p = _sorted_values(probs, cols)
    rank = torch.arange(cols, device=probs.device)
    beyond_k = rank >= top_k[:, None]
    sorted_p = sorted_p.masked_fill(beyond_k, 0.0)
    cum = sorted_p.cumsum(dim=-1)
    kept = (~beyond_k & ((cum - sorted_p) <= top_p[:, None] * cum[:, -1:])).sum(dim=-1)
    last = sorted_p.gather(1, (kept - 1)[:, None])
    # A row without a filter keeps everything.
    last = last.masked_fill(((top_k >= V) & (top_p >= 1.0))[:, None], 0.0)
    # Ties at the cut: when the next rank holds the same value, only the lowest ids of that
    # value make it. NOTE: on the CPU this check is free and ties are rare; on a GPU it would
    # wait for the device, so the exact path always runs there.
    following = ascending.gather(1, (V - 1 - kept.clamp(max=V - 1))[:, None])
    straddles = (kept[:, None] < V) & (following == last) & (last > 0)
    if probs.device.type != "cpu" or bool(straddles.any()):
        greater = probs > last
        equal = probs == last
        take_equal = kept - greater.sum(dim=-1)
        keep = greater | (equal & (equal.cumsum(dim=-1) <= take_equal[:, None]))
        return probs.masked_fill(~keep, 0.0)
    return _drop_below(probs, last)


def _drop_below(probs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Zeroes, in place, the entries below their row's `threshold` [R, 1]."""
    if probs.device.type == "cpu":
        # NOTE: numpy's SIMD compare and multiply are ~3x torch's single-thread masked_fill.
        p = probs.numpy()
        np.multiply(p, p >= threshold.numpy(), out=p)
        return probs
    return probs.masked_fill_(probs < threshold, 0.0)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row, walking the vocabulary in id order (never the sorted order, so a row's
    token depends only on its own filtered distribution and uniform)."""
    cum = probs.cumsum(dim=-1)
    total = cum[:, -1:]
    # The target stays strictly below the total, so the first entry whose cumulative mass
    # exceeds it exists and has a positive probability (a float cumulative sum of non-negative
    # terms is monotone): a filtered token is never drawn.
    target = torch.minimum(
        uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total))
    )
    idx = torch.searchsorted(cum, target, right=True)
    # Only a NaN row (a broken model) can reach V; clamp so it cannot fault downstream.
    return idx.clamp_(max=probs.shape[1] - 1).squeeze(1)
