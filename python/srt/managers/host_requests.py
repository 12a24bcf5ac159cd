"""The scheduler's Python side of the few requests that need host work every step: a grammar
matcher (json_schema / regex), logprob accumulators, or stop regexes. Every other request lives only in the
Rust request table (`srt._native.BatchScheduler`); these are keyed by the same integer id and
flagged there (`HOST_FLAG`), so a step without them skips all of this.

Scheduler process. `HostRequests.prepare(step)` does a step's host part before it is
submitted (the grammar bitmask of its constrained rows, which rows want output logprobs, the
prompt-logprob rows of a prefill) and returns it with what `after_commit` will need;
`after_commit` takes the step's committed tokens and outputs and returns decisions: logprob
deltas to send, and requests whose grammar ended or rejected them or whose text matched a
stop regex. It owns the grammar backend (srt.constrained.grammar), built for the served
tokenizer on the first constrained request, and a Rust incremental detokenizer for the
requests with stop regexes, built on the first of them: it renders their output text with
the request's own settings, so a regex sees the text the client gets.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from srt._native import USER_FLAG_SHIFT
from srt.managers.io_struct import FinishReason, LogprobDelta
from srt.model_executor.step_input import StepInput
from srt.model_executor.step_job import Logprobs, StepJob, StepOutput

logger = logging.getLogger(__name__)

# Request flags of the caller's range in the Rust table (see srt._native.USER_FLAG_SHIFT).
HOST_FLAG = 1 << USER_FLAG_SHIFT  # has a HostRequest
GRAMMAR_FLAG = 2 << USER_FLAG_SHIFT  # its next token needs the host (grammar mask)
FAULT_FLAG = 4 << USER_FLAG_SHIFT  # test-only: a step holding it fails

GRAMMAR_CONFLICT = (
    "no token satisfies the grammar here (does min_new_tokens conflict with the json_schema / "
    "regex?)"
)


@dataclass
class StopRegex:
    """A request's stop regexes and the output text they are searched in."""

    patterns: list[re.Pattern[str]]
    # The detokenizer's start for the request (DetokInit's fields, without stop strings).
    prompt_tail: list[int]
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    text: str = ""

    def search(self) -> str | None:
        """The first pattern (its source) with a match in the text so far, or None.

        NOTE: the whole text is searched, so a match may span any number of tokens."""
        for p in self.patterns:
            if p.search(self.text) is not None:
                return p.pattern
        return None


@dataclass
class HostRequest:
    input_ids: list[int]
    matcher: Any = None
    # Logprobs (srt.layers.logprobs). `input_lp_next` is the next prompt position whose
    # logprob is still to be computed; it equals len(input_ids) when none are (left) to do.
    return_logprob: bool = False
    top_logprobs_num: int = 0
    input_lp_next: int = 0
    lp: LogprobDelta = field(default_factory=LogprobDelta)
    # max_new_tokens == 0 with prompt logprobs: prefilled to score the prompt, no token.
    score_only: bool = False
    stop_regex: StopRegex | None = None


@dataclass
class StepHostMeta:
    """What `prepare` learned about a step that `after_commit` needs."""

    # (id, first position, end) of the prompt-logprob rows, in extra-row order.
    scored: list[tuple[int, int, int]] = field(default_factory=list)
    logprob_ids: list[int] = field(default_factory=list)
    grammar_ids: list[int] = field(default_factory=list)
    regex_ids: list[int] = field(default_factory=list)

    def flagged_ids(self) -> list[int]:
        """The requests whose committed token `after_commit` needs."""
        return self.logprob_ids + self.grammar_ids + self.regex_ids

    def __bool__(self) -> bool:
        return bool(self.scored or self.flagged_ids())


@dataclass
class HostDecisions:
    logprobs: list[tuple[int, LogprobDelta]] = field(default_factory=list)
    # Requests to end now (their grammar completed or rejected the token, their text matched
    # a stop regex), with the reason.
    finish: list[tuple[int, FinishReason]] = field(default_factory=list)
    # Requests the commit already ended whose reason the grammar overrides (a rejected token).
    override: dict[int, FinishReason] = field(default_factory=dict)


class HostRequests:
    def __init__(self, tokenizer_path: str, vocab_size: int, eos_ids: set[int]) -> None:
        self.reqs: dict[int, HostRequest] = {}
        self._tokenizer_path = tokenizer_path
        self._vocab_size = vocab_size
        self._eos_ids = eos_ids
        self._grammar: Any = None  # GrammarBackend, built on the first constrained request
        self._detok: Any = None  # srt._native.Detokenizer, built on the first stop regex

    def new_matcher(self, params: Any) -> Any:
        """A grammar matcher for a request's json_schema / regex (ValueError, RuntimeError:
        the grammar cannot be used)."""
        from srt.constrained.grammar import GrammarBackend

        key = params.grammar
        assert key is not None
        if self._grammar is None:
            from srt.managers.hf_tokenizer import prepare_transformers

            prepare_transformers()
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
            self._grammar = GrammarBackend(tokenizer, self._vocab_size, self._eos_ids)
        return self._grammar.new_matcher(key)

    def apply_bitmask(self, logits: Any, bitmask: Any) -> None:
        """Masks the logits of constrained rows (the step worker calls it)."""
        self._grammar.apply_bitmask(logits, bitmask)

    def add(self, rid: int, req: HostRequest) -> None:
        self.reqs[rid] = req
        sr = req.stop_regex
        if sr is not None:
            if self._detok is None:
                from srt._native import Detokenizer

                self._detok = Detokenizer(self._tokenizer_path)
            self._detok.add(
                rid,
                sr.prompt_tail,
                skip_special_tokens=sr.skip_special_tokens,
                spaces_between_special_tokens=sr.spaces_between_special_tokens,
            )

    def remove(self, rid: int) -> None:
        req = self.reqs.pop(rid, None)
        if req is not None and req.stop_regex is not None:
            self._detok.remove(rid)

    def prepare(self, step: StepInput, fail: str | None = None) -> tuple[StepJob, StepHostMeta]:
        """The job of a step, with the host work of its flagged requests."""
        job = StepJob(step=step, fail=fail)
        meta = StepHostMeta()
        if not step.all_flags & HOST_FLAG:
            return job, meta
        ids = step.section("ids")
        flagged = np.nonzero(step.section("seq_flags") & HOST_FLAG)[0]
        if not step.decode:
            self._prompt_rows(step, ids, flagged, job, meta)
        sample_pos = step.section("sample_pos")
        if not len(sample_pos):
            return job, meta
        flagged_samples = np.nonzero(np.isin(sample_pos, flagged))[0]
        lp_samples: list[int] = []
        g_samples: list[int] = []
        matchers: list[Any] = []
        for k in flagged_samples.tolist():
            rid = int(ids[sample_pos[k]])
            req = self.reqs.get(rid)
            if req is None:  # ended since it was planned
                continue
            if req.return_logprob and not req.score_only:
                lp_samples.append(k)
                job.logprob_tops.append(req.top_logprobs_num)
                meta.logprob_ids.append(rid)
            if req.matcher is not None:
                g_samples.append(k)
                matchers.append(req.matcher)
                meta.grammar_ids.append(rid)
            if req.stop_regex is not None:
                meta.regex_ids.append(rid)
        if lp_samples:
            job.logprob_samples = np.asarray(lp_samples, dtype=np.int64)
        if g_samples:
            job.grammar_samples = np.asarray(g_samples, dtype=np.int64)
            job.grammar_bitmask = self._grammar.fill_bitmask(matchers)
        return job, meta

    def _prompt_rows(
        self,
        step: StepInput,
        ids: np.ndarray,
        flagged: np.ndarray,
        job: StepJob,
        meta: StepHostMeta,
    ) -> None:
        """Extra logit rows for the prompt positions whose logprobs are still wanted."""
        prefix_lens = step.section("prefix_lens")
        extend_lens = step.section("extend_lens")
        token_start = np.concatenate(([0], np.cumsum(extend_lens)))
        targets: list[int] = []
        for i in flagged.tolist():
            rid = int(ids[i])
            req = self.reqs.get(rid)
            if req is None or req.input_lp_next >= len(req.input_ids):
                continue
            prefix, end = int(prefix_lens[i]), int(prefix_lens[i] + extend_lens[i])
            # Logits at position q give the logprob of token q + 1.
            q0 = max(prefix, req.input_lp_next - 1)
            q1 = min(end, len(req.input_ids) - 1)
            if q0 > req.input_lp_next - 1:
                logger.error("prompt logprobs of request %d lost to a cached prefix", rid)
            if q1 <= q0:
                continue
            base = int(token_start[i]) - prefix
            step.extra_logit_indices.extend(range(base + q0, base + q1))
            targets.extend(req.input_ids[q0 + 1 : q1 + 1])
            job.prompt_tops.extend([req.top_logprobs_num] * (q1 - q0))
            meta.scored.append((rid, q0, q1))
        if targets:
            job.prompt_targets = np.asarray(targets, dtype=np.int64)

    def after_commit(
        self,
        meta: StepHostMeta,
        out: StepOutput,
        committed: dict[int, int],
        finished: set[int],
    ) -> HostDecisions:
        """Applies a step's outputs to its flagged requests. `committed`: id -> token of the
        flagged requests that took a token this step; `finished`: ids the commit ended."""
        d = HostDecisions()
        touched: dict[int, HostRequest] = {}
        if out.prompt_logprobs is not None:
            self._add_prompt_logprobs(meta, out.prompt_logprobs, touched)
        if out.logprobs is not None:
            chosen, top_v, top_i = out.logprobs
            for j, rid in enumerate(meta.logprob_ids):
                req = self.reqs.get(rid)
                tok = committed.get(rid)
                if req is None or tok is None:
                    continue  # ended before this token, which was dropped
                req.lp.output_logprobs.append(chosen[j])
                req.lp.output_ids.append(tok)
                if req.top_logprobs_num:
                    req.lp.output_top_logprobs.append(top_v[j])
                    req.lp.output_top_ids.append(top_i[j])
                touched[rid] = req
        for rid in meta.grammar_ids:
            req = self.reqs.get(rid)
            tok = committed.get(rid)
            if req is None or tok is None:
                continue
            if not req.matcher.accept_token(tok):
                # Only reachable when the grammar left no token the sampler could take (e.g.
                # min_new_tokens masks the stop token the finished grammar requires).
                reason = FinishReason(type="abort", message=GRAMMAR_CONFLICT)
                if rid in finished:
                    d.override[rid] = reason
                else:
                    d.finish.append((rid, reason))
            elif req.matcher.is_terminated() and rid not in finished:
                d.finish.append((rid, FinishReason(type="stop", matched=tok)))
        ending = finished | {rid for rid, _ in d.finish}
        for rid in meta.regex_ids:
            req = self.reqs.get(rid)
            tok = committed.get(rid)
            if req is None or tok is None or rid in ending:
                continue
            sr = req.stop_regex
            assert sr is not None
            text, _ = self._detok.step(rid, [tok])
            if not text:  # e.g. inside a multi-byte character
                continue
            sr.text += text
            matched = sr.search()
            if matched is not None:
                d.finish.append((rid, FinishReason(type="stop", matched=matched)))
        for rid, req in touched.items():
            d.logprobs.append((rid, req.lp))
            req.lp = LogprobDelta()
        return d

    def _add_prompt_logprobs(
        self, meta: StepHostMeta, lps: Logprobs, touched: dict[int, HostRequest]
    ) -> None:
        chosen, top_v, top_i = lps
        at = 0
        for rid, q0, q1 in meta.scored:
            n = q1 - q0
            req = self.reqs.get(rid)
            if req is not None:
                req.lp.input_logprobs.extend(chosen[at : at + n])
                req.lp.input_ids.extend(req.input_ids[q0 + 1 : q1 + 1])
                if req.top_logprobs_num:
                    req.lp.input_top_logprobs.extend(top_v[at : at + n])
                    req.lp.input_top_ids.extend(top_i[at : at + n])
                req.input_lp_next = q1 + 1
                touched[rid] = req
            at += n

    def pending_logprobs(self, rid: int) -> LogprobDelta | None:
        """The logprobs of `rid` not sent yet (on its finish), or None."""
        req = self.reqs.get(rid)
        if req is None or not _has_entries(req.lp):
            return None
        lp, req.lp = req.lp, LogprobDelta()
        return lp


def _has_entries(lp: LogprobDelta) -> bool:
    return bool(lp.input_logprobs or lp.output_logprobs)
