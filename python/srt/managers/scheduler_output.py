"""The output side of the scheduler's step, as a mixin of `Scheduler`: sampling the step's
logits and committing the tokens to the plan, logprobs, finish conditions (EOS, stop ids and
strings, lengths, grammars), and the step's `BatchTokenIDOut` to the detokenizer.

In: the forward's fp32 logits and the step's requests. Out: tokens appended to each `Req`,
finished requests ended through `Scheduler.finish`, and one message per step (`flush_outputs`)
with each request's new ids, first-time detokenizer settings and logprob deltas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from srt.layers.logprobs import token_logprobs
from srt.layers.sampler import Sampler, SamplingBatchInfo
from srt.managers.io_struct import (
    BatchTokenIDOut,
    DetokInit,
    FinishReason,
    LogprobDelta,
    encode,
)

if TYPE_CHECKING:
    from srt._native import BatchScheduler, Detokenizer
    from srt.managers.scheduler import Req

# Prompt tokens sent to the detokenizer as decoding context for the first output token.
PROMPT_TAIL = 16


class SchedulerOutputMixin:
    # Set by Scheduler.__init__.
    plan: BatchScheduler
    sampler: Sampler
    stop_checker: Detokenizer
    vocab_size: int
    context_len: int
    outbox: dict[int, Req]
    send_sock: Any
    _grammar_backend: Any
    finish: Callable[[Req, FinishReason], None]  # Scheduler.finish

    def add_prompt_logprobs(self, scored: list[tuple[Req, int, int]], rows: torch.Tensor) -> None:
        targets: list[int] = []
        tops: list[int] = []
        for req, q0, q1 in scored:
            targets.extend(req.input_ids[q0 + 1 : q1 + 1])
            tops.extend([req.top_logprobs_num] * (q1 - q0))
        t = torch.tensor(targets, dtype=torch.int64, device=rows.device)
        chosen, top_v, top_i = token_logprobs(rows, t, tops)
        at = 0
        for req, q0, q1 in scored:
            n = q1 - q0
            assert req.lp is not None
            req.lp.input_logprobs.extend(chosen[at : at + n])
            req.lp.input_ids.extend(req.input_ids[q0 + 1 : q1 + 1])
            if req.top_logprobs_num:
                req.lp.input_top_logprobs.extend(top_v[at : at + n])
                req.lp.input_top_ids.extend(top_i[at : at + n])
            req.input_lp_next = q1 + 1
            at += n
            self.outbox.setdefault(req.nid, req)

    def sample_and_commit(self, reqs: list[Req], logits: torch.Tensor) -> None:
        info = SamplingBatchInfo.build(
            params=[r.params for r in reqs],
            seeds=[r.seed for r in reqs],
            steps=[len(r.output_ids) for r in reqs],
            prompt_ids=[r.input_ids for r in reqs],
            output_ids=[r.output_ids for r in reqs],
            stop_ids=[r.stop_ids for r in reqs],
            vocab_size=self.vocab_size,
            device=logits.device,
        )
        grammar_rows = [i for i, r in enumerate(reqs) if r.matcher is not None]
        if grammar_rows:
            # NOTE: a masked copy; logprobs stay those of the raw distribution.
            masked = logits.clone()
            self._grammar_backend.apply_masks(
                masked, grammar_rows, [reqs[i].matcher for i in grammar_rows]
            )
            ids = self.sampler(masked, info)
        else:
            ids = self.sampler(logits, info)
        lp_rows = [i for i, r in enumerate(reqs) if r.return_logprob and not r.score_only]
        if lp_rows:
            idx = torch.tensor(lp_rows, dtype=torch.int64, device=logits.device)
            chosen, top_v, top_i = token_logprobs(
                logits.index_select(0, idx),
                ids.index_select(0, idx),
                [reqs[i].top_logprobs_num for i in lp_rows],
            )
        # NOTE: the one device-to-host copy of the step (plus logprobs when asked).
        next_ids = ids.tolist()
        self.plan.commit([r.nid for r in reqs], next_ids)
        for j, i in enumerate(lp_rows):
            lp = reqs[i].lp
            assert lp is not None
            lp.output_logprobs.append(chosen[j])
            lp.output_ids.append(next_ids[i])
            if reqs[i].top_logprobs_num:
                lp.output_top_logprobs.append(top_v[j])
                lp.output_top_ids.append(top_i[j])
        stop_string_reqs: list[Req] = []
        scoring = [r for r in reqs if r.score_only]
        for req in scoring:
            self.finish(req, FinishReason(type="length", length=0))
        if scoring:
            kept = [(r, t) for r, t in zip(reqs, next_ids, strict=True) if not r.score_only]
            reqs = [r for r, _ in kept]
            next_ids = [t for _, t in kept]
        for req, tok in zip(reqs, next_ids, strict=True):
            if req.matcher is not None and not req.matcher.accept_token(tok):
                # Only reachable when the grammar left no token the sampler could take (e.g.
                # min_new_tokens masks the stop token the finished grammar requires).
                req.grammar_rejected = True
            req.output_ids.append(tok)
            self.outbox[req.nid] = req
            if req.checks_stop_strings:
                stop_string_reqs.append(req)
        matched: dict[int, str] = {}
        if stop_string_reqs:
            results = self.stop_checker.step_batch(
                [r.nid for r in stop_string_reqs], [[r.output_ids[-1]] for r in stop_string_reqs]
            )
            for req, (_, stop_idx) in zip(stop_string_reqs, results, strict=True):
                if stop_idx is not None:
                    matched[req.nid] = req.params.stop[stop_idx]
        for req in reqs:
            reason = self.finish_reason(req, matched.get(req.nid))
            if reason is not None:
                self.finish(req, reason)

    def finish_reason(self, req: Req, matched_stop: str | None) -> FinishReason | None:
        tok = req.output_ids[-1]
        if req.grammar_rejected:
            return FinishReason(
                type="abort",
                message="no token satisfies the grammar here (does min_new_tokens conflict "
                "with the json_schema / regex?)",
            )
        n_out = len(req.output_ids)
        if tok in req.stop_ids and n_out >= req.params.min_new_tokens:
            return FinishReason(type="stop", matched=tok)
        if matched_stop is not None:
            return FinishReason(type="stop", matched=matched_stop)
        if n_out >= req.max_new_tokens:
            return FinishReason(type="length", length=req.max_new_tokens)
        if len(req.input_ids) + n_out >= self.context_len:
            return FinishReason(type="length", length=n_out)
        if req.matcher is not None and req.matcher.is_terminated():
            return FinishReason(type="stop", matched=tok)
        return None

    def flush_outputs(self) -> None:
        if not self.outbox:
            return
        out = BatchTokenIDOut(
            rids=[],
            new_ids=[],
            finished=[],
            inits=[],
            prompt_tokens=[],
            completion_tokens=[],
            cached_tokens=[],
        )
        if any(r.lp is not None for r in self.outbox.values()):
            out.logprobs = []
        for req in self.outbox.values():
            if out.logprobs is not None:
                out.logprobs.append(req.lp)
                if req.lp is not None:
                    req.lp = LogprobDelta()
            out.rids.append(req.rid)
            out.new_ids.append(req.output_ids[req.sent_len :])
            req.sent_len = len(req.output_ids)
            out.finished.append(req.finished)
            if req.init_sent:
                out.inits.append(None)
            else:
                p = req.params
                out.inits.append(
                    DetokInit(
                        prompt_tail=req.input_ids[-PROMPT_TAIL:],
                        skip_special_tokens=p.skip_special_tokens,
                        spaces_between_special_tokens=p.spaces_between_special_tokens,
                        stop=list(p.stop),
                        no_stop_trim=p.no_stop_trim,
                    )
                )
                req.init_sent = True
            out.prompt_tokens.append(len(req.input_ids))
            out.completion_tokens.append(len(req.output_ids))
            out.cached_tokens.append(req.cached_tokens)
        self.outbox.clear()
        self.send_sock.send(encode(out))
