"""HostSamplingState: sampling on the host CPU with numpy and srt-kernels, for a single-rank CPU
scheduler (the host step worker); importing it does not import torch.

The same state and the same order of operations as `srt.layers.sampler.SamplingState` (see
its docstring): per-row parameters written at admission, logit_bias -> repetition_penalty ->
frequency / presence penalties -> min_new_tokens masks -> greedy argmax, or temperature,
softmax, top_k / top_p / min_p and one seeded draw by inverse CDF in vocabulary order. The
softmax and the draw are srt-kernels `sampling` (`sample_softmax`, `sample_draw`), as in
`SamplingState`'s CPU path, so a row draws the same token from the same logits either way
(tests/test_host_sampler.py).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

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
    sample_draw,
    sample_softmax,
)
from srt.model_executor.step_input import StepInput

# Columns of HostSamplingState.floats (the order of the step's admission floats).
TEMPERATURE, TOP_P, MIN_P, REPETITION, FREQUENCY, PRESENCE = range(ADMIT_FLOATS)


class HostSamplingState:
    """Per-row sampling parameters, token history and last sampled token, in numpy arrays.
    The penalty and bias tables ([rows, vocab]) are allocated the first time an admitted
    request needs them."""

    def __init__(self, rows: int, vocab_size: int) -> None:
        self.rows = rows
        self.vocab_size = vocab_size
        self.floats = np.zeros((rows, ADMIT_FLOATS), dtype=np.float32)
        self.floats[:, TEMPERATURE] = 1.0
        self.top_k = np.full(rows, vocab_size, dtype=np.int64)
        self.greedy = np.ones(rows, dtype=bool)
        self.seeds = np.zeros(rows, dtype=np.int64)
        # The token each row sampled last: a decode step's input.
        self.last_token = np.zeros(rows, dtype=np.int64)
        self.counts: np.ndarray | None = None  # output token counts (frequency / presence)
        self.seen: np.ndarray | None = None  # prompt + output tokens (repetition)
        self.bias: np.ndarray | None = None  # logit bias
        self._scratch = Scratch(vocab_size)

    def _table(self, dtype: type) -> np.ndarray:
        return np.zeros((self.rows, self.vocab_size), dtype=dtype)

    def admit(self, step: StepInput) -> None:
        """Writes the rows the step admits: parameters, logit bias, penalty history."""
        rows = step.section("admit_rows")
        if not len(rows):
            return
        V = self.vocab_size
        f = step.float_section("admit_floats").reshape(-1, ADMIT_FLOATS).copy()
        top_k = step.section("admit_top_k")
        greedy = (f[:, TEMPERATURE] == 0.0) | (top_k == 1)
        # NOTE: greedy rows keep temperature 1 so a sampled pass never divides by zero.
        f[:, TEMPERATURE] = np.where(greedy, np.float32(1.0), f[:, TEMPERATURE])
        self.floats[rows] = f
        self.top_k[rows] = np.where((top_k > 0) & (top_k < V), top_k, V)
        self.greedy[rows] = greedy
        self.seeds[rows] = step.section("admit_seed")
        bias_rows = step.section("bias_rows")
        if len(bias_rows) and self.bias is None:
            self.bias = self._table(np.float32)
        if self.bias is not None:
            # NOTE: every step with a biased row adds the bias of all its rows.
            self.bias[rows] = 0.0
            if len(bias_rows):
                values = step.float_section("bias_values")
                self.bias[bias_rows, step.section("bias_tokens")] = values
        count_rows = step.section("count_rows")
        if self.counts is None and (len(count_rows) or step.all_flags & FLAG_OUTPUT_PENALTY):
            self.counts = self._table(np.float32)
        if self.counts is not None:
            self.counts[rows] = 0.0
            if len(count_rows):
                np.add.at(self.counts, (count_rows, step.section("count_tokens")), 1.0)
        seen_rows = step.section("seen_rows")
        if self.seen is None and len(seen_rows):
            self.seen = self._table(np.bool_)
        if self.seen is not None:
            self.seen[rows] = False
            if len(seen_rows):
                self.seen[seen_rows, step.section("seen_tokens")] = True

    def record(self, rows: np.ndarray, ids: np.ndarray, flags: int) -> None:
        """A step's sampled tokens: each row's last token, and its penalty history."""
        self.last_token[rows] = ids
        if flags & FLAG_OUTPUT_PENALTY and self.counts is not None:
            np.add.at(self.counts, (rows, ids), 1.0)
        if flags & FLAG_REPETITION_PENALTY and self.seen is not None:
            self.seen[rows, ids] = True

    def sample(
        self,
        logits: np.ndarray,
        rows: np.ndarray,
        steps: np.ndarray,
        flags: int,
        mask_sample: np.ndarray | None,
        mask_tokens: np.ndarray | None,
        top_k_max: int | None,
        threads: int,
    ) -> np.ndarray:
        """Token ids [S] (int64) for float32 `logits` [S, V] of the sampling rows `rows` whose
        next output index is `steps`; `flags` (the OR of the rows') and `top_k_max` (the
        largest top-k among the rows that filter) say what any row needs. `logits` is not
        modified. Softmax, sort and draw split their rows over `threads` threads."""
        V = self.vocab_size
        if logits.ndim != 2 or logits.shape[1] != V:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match the vocabulary size {V}"
            )
        if not flags & FLAG_SAMPLED:
            processed = self._process(logits, rows, flags, mask_sample, mask_tokens)
            return processed.argmax(axis=-1)
        # The frequency / presence penalties are applied by sample_softmax.
        before = flags & ~(FLAG_OUTPUT_PENALTY | FLAG_PRESENCE_PENALTY)
        processed = self._process(logits, rows, before, mask_sample, mask_tokens)
        tables = RowTables(self.floats, self.counts, self.top_k, self.seeds, self.greedy)
        return draw_rows(processed, rows, steps, flags, top_k_max, threads, tables, self._scratch)

    def _process(
        self,
        logits: np.ndarray,
        rows: np.ndarray,
        flags: int,
        mask_sample: np.ndarray | None,
        mask_tokens: np.ndarray | None,
    ) -> np.ndarray:
        """logit_bias, penalties and min_new_tokens masks: a new array when any applies (the
        caller's logits stay intact), else the input itself. Each operation rounds as
        `SamplingState._process`'s torch ops do on the CPU."""
        masked = mask_sample is not None and len(mask_sample) > 0
        penalized = flags & (FLAG_LOGIT_BIAS | FLAG_REPETITION_PENALTY | FLAG_OUTPUT_PENALTY)
        if not penalized and not masked:
            return logits
        out: np.ndarray | None = None  # a new array from the first change on
        if flags & FLAG_LOGIT_BIAS and self.bias is not None:
            out = logits + self.bias[rows]
        if flags & (FLAG_REPETITION_PENALTY | FLAG_OUTPUT_PENALTY):
            f = self.floats[rows]
            if flags & FLAG_REPETITION_PENALTY and self.seen is not None:
                rp = f[:, REPETITION : REPETITION + 1]
                x = logits if out is None else out
                out = np.where(self.seen[rows], np.where(x > 0, x / rp, x * rp), x)
            if flags & FLAG_OUTPUT_PENALTY and self.counts is not None:
                counts = self.counts[rows]
                x = logits if out is None else out
                out = x - counts * f[:, FREQUENCY : FREQUENCY + 1]
                if flags & FLAG_PRESENCE_PENALTY:
                    present = (counts > 0).astype(np.float32)
                    out -= present * f[:, PRESENCE : PRESENCE + 1]
        if masked:
            if out is None:
                out = logits.copy()
            out[mask_sample, mask_tokens] = -np.inf
        return logits if out is None else out


class Scratch:
    """`draw_rows`' buffers 0 (probabilities) and 1 (sorted rows), [n, V] float32, kept across
    steps: fresh pages for each step's 32 x 49k probabilities cost ~1 ms of the kernel's
    zeroing."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bufs: list[np.ndarray | None] = [None, None]

    def __call__(self, i: int, n: int) -> np.ndarray:
        buf = self.bufs[i]
        if buf is None or buf.shape[0] < n:
            buf = np.empty((max(n, 1), self.vocab_size), dtype=np.float32)
            self.bufs[i] = buf
        return buf[:n]


@dataclass
class RowTables:
    """A sampler's per-row state, as numpy arrays (the whole tables, indexed by row)."""

    floats: np.ndarray  # [rows, ADMIT_FLOATS] float32
    counts: np.ndarray | None  # [rows, V] float32 output token counts
    top_k: np.ndarray  # [rows] int64
    seeds: np.ndarray  # [rows] int64
    greedy: np.ndarray  # [rows] bool


def draw_rows(
    processed: np.ndarray,
    rows: np.ndarray,
    steps: np.ndarray,
    flags: int,
    top_k_max: int | None,
    threads: int,
    t: RowTables,
    scratch: Callable[[int, int], np.ndarray],
) -> np.ndarray:
    """The sampled path on the CPU, for both samplers: from `processed` logits (bias,
    repetition penalty and masks applied), one native pass per row applies the frequency /
    presence penalties, the temperature and the softmax (and finds the greedy rows' argmax);
    numpy sorts the rows for top-k / top-p; one native pass per row filters and draws, bit for
    bit `sampler._top_k_top_p`, `_drop_below` and `_inverse_cdf` over those probabilities.
    `scratch(i, n)`: the caller's reused [n, V] buffers 0 and 1."""
    V = processed.shape[1]
    f = t.floats[rows]
    counts = t.counts if flags & FLAG_OUTPUT_PENALTY else None
    presence = f[:, PRESENCE].copy() if flags & FLAG_PRESENCE_PENALTY else None
    n = rows.shape[0]
    probs, argmax = sample_softmax(
        np.ascontiguousarray(processed, dtype=np.float32),
        f[:, TEMPERATURE].copy(),
        counts,
        np.ascontiguousarray(rows, dtype=np.int64),
        f[:, FREQUENCY].copy(),
        presence,
        threads,
        scratch(0, n),
    )
    ascending, candidates = None, V
    if flags & FLAG_TOP_K_P:
        ascending = sorted_rows(probs, threads, scratch(1, n))
        candidates = V if top_k_max is None else min(top_k_max, V)
    ids = sample_draw(
        probs,
        ascending,
        candidates,
        t.top_k[rows],
        f[:, TOP_P].copy(),
        f[:, MIN_P].copy() if flags & FLAG_MIN_P else None,
        t.seeds[rows],
        np.ascontiguousarray(steps, dtype=np.int64),
        threads,
    )
    if flags & FLAG_GREEDY:
        ids = np.where(t.greedy[rows], argmax, ids)
    return ids


_sort_pool: ThreadPoolExecutor | None = None


def sorted_rows(probs: np.ndarray, threads: int, out: np.ndarray) -> np.ndarray:
    """Each row of `probs` in ascending order, into `out` (of its shape), the rows split over
    `threads` threads.

    NOTE: numpy's SIMD sort beats any other CPU sort here, and releases the GIL while it runs,
    so threads of this process sort the rows' parts side by side."""
    global _sort_pool
    n = probs.shape[0]
    np.copyto(out, probs)
    if threads <= 1 or n < 2:
        out.sort(axis=-1)
        return out
    if _sort_pool is None or _sort_pool._max_workers != threads:
        if _sort_pool is not None:
            _sort_pool.shutdown(wait=False)
        _sort_pool = ThreadPoolExecutor(threads, thread_name_prefix="srt-sort")
    step = -(-n // threads)
    parts = [out[i : i + step] for i in range(0, n, step)]
    for done in _sort_pool.map(lambda part: part.sort(axis=-1), parts):
        del done
    return out


def host_token_logprobs(
    logits: np.ndarray, targets: np.ndarray, top_nums: list[int]
) -> tuple[list[float], list[list[float]], list[list[int]]]:
    """`srt.layers.logprobs.token_logprobs` on numpy arrays: per row of float32 `logits`
    [R, V], the raw logprob of `targets[r]` and the top `top_nums[r]` (logprob, id) pairs,
    highest first (ties: the lower id first)."""
    if logits.shape[0] != targets.shape[0] or logits.shape[0] != len(top_nums):
        raise ValueError("token_logprobs: logits, targets and top_nums differ in rows")
    x = logits.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1, keepdims=True, dtype=np.float32)) + m
    lp = x - lse
    rows = np.arange(lp.shape[0])
    chosen = lp[rows, targets.astype(np.int64)].tolist()
    k = min(max(top_nums, default=0), lp.shape[1])
    if k <= 0:
        return chosen, [[] for _ in top_nums], [[] for _ in top_nums]
    part = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    # Highest first; among equal values the lower id first.
    order = np.lexsort((part, -np.take_along_axis(lp, part, axis=-1)), axis=-1)
    top_i = np.take_along_axis(part, order, axis=-1)
    top_v = np.take_along_axis(lp, top_i, axis=-1)
    vals, ids = top_v.tolist(), top_i.tolist()
    return (
        chosen,
        [v[:n] for v, n in zip(vals, top_nums, strict=True)],
        [i[:n] for i, n in zip(ids, top_nums, strict=True)],
    )
