"""Request admission in the scheduler process: what a `GenerateReq` from main becomes.

`Admission.admit(msg)` checks the request against the model and the KV pool and returns a
decision: `Rejected` (it ends at once: a client error, or nothing to generate) or `Admitted`:
the arguments of the Rust request record (`BatchScheduler.add_request`: prompt, limits, stop
ids with EOS, stop strings, sampling parameters, flags), the Python side it needs if any
(`HostRequest`: grammar matcher, logprob accumulators, stop regexes) and the detokenizer's settings for it
(`DetokInit`). It changes nothing itself; the scheduler applies the decision.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from srt._native import PROMPT_TAIL
from srt.managers.host_requests import (
    FAULT_FLAG,
    GRAMMAR_FLAG,
    HOST_FLAG,
    HostRequest,
    HostRequests,
    StopRegex,
)
from srt.managers.io_struct import DetokInit, FinishReason, GenerateReq

# NOTE: max_new_tokens is clipped to this when the plan reserves decode memory.
CLIP_MAX_NEW_TOKENS = 4096


@dataclass
class Admitted:
    core_args: dict[str, Any]  # BatchScheduler.add_request's arguments
    host: HostRequest | None
    init: DetokInit


@dataclass
class Rejected:
    reason: FinishReason


class Admission:
    def __init__(
        self,
        context_len: int,
        vocab_size: int,
        pool_size: int,
        eos_ids: set[int],
        host: HostRequests,
        seed: int,
        fault_token: int | None = None,
    ) -> None:
        self.context_len = context_len
        self.vocab_size = vocab_size
        self.pool_size = pool_size
        self.eos_ids = eos_ids
        self.host = host
        self.rng = random.Random(seed)  # seeds of requests that gave none
        self.fault_token = fault_token

    def admit(self, msg: GenerateReq) -> Admitted | Rejected:
        p = msg.sampling_params
        rid = msg.id
        n_prompt = len(msg.input_ids)
        limit = self.context_len - n_prompt
        max_new = limit if p.max_new_tokens is None else min(p.max_new_tokens, limit)
        max_new = max(max_new, 0)
        error = self.error(msg.input_ids, max_new)
        if error is not None:
            return Rejected(FinishReason(type="abort", message=error, status_code=400))
        host: HostRequest | None = None
        namespace = msg.cache_salt
        if msg.return_logprob:
            host = HostRequest(
                input_ids=list(msg.input_ids),
                return_logprob=True,
                top_logprobs_num=max(0, msg.top_logprobs_num),
                input_lp_next=n_prompt,
            )
            if 0 <= msg.logprob_start_len < n_prompt:
                start = msg.logprob_start_len
                if start == 0:
                    host.lp.input_logprobs.append(None)
                    host.lp.input_ids.append(msg.input_ids[0])
                    if host.top_logprobs_num:
                        host.lp.input_top_logprobs.append([])
                        host.lp.input_top_ids.append([])
                host.input_lp_next = max(start, 1)
                # NOTE: a cached prefix skips computing its positions, whose logits the prompt
                # logprobs need; a namespace of its own means nothing is matched for this
                # request (correct, at the cost of no prefix reuse for it).
                namespace = f"{msg.cache_salt}\x00logprob:{rid}"
        if p.grammar is not None:
            host = host or HostRequest(input_ids=list(msg.input_ids), input_lp_next=n_prompt)
            try:
                host.matcher = self.host.new_matcher(p)
            except (ValueError, RuntimeError) as e:
                reason = FinishReason(
                    type="abort", message=f"cannot use the grammar: {e}", status_code=400
                )
                return Rejected(reason)
        if p.stop_regex:
            host = host or HostRequest(input_ids=list(msg.input_ids), input_lp_next=n_prompt)
            host.stop_regex = StopRegex(
                patterns=[re.compile(r) for r in p.stop_regex],
                prompt_tail=msg.input_ids[-PROMPT_TAIL:],
                skip_special_tokens=p.skip_special_tokens,
                spaces_between_special_tokens=p.spaces_between_special_tokens,
            )
        if max_new == 0:
            if host is None or host.input_lp_next >= n_prompt:
                return Rejected(FinishReason(type="length", length=0))
            host.score_only = True
        flags = 0
        if host is not None:
            flags |= HOST_FLAG | (GRAMMAR_FLAG if host.matcher is not None else 0)
        if self.fault_token is not None and self.fault_token in msg.input_ids:
            flags |= FAULT_FLAG
        stop_ids = list(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids += sorted(self.eos_ids - set(stop_ids))
        # NOTE: main validates ids against the vocabulary; the model's may be smaller.
        stop_ids = [t for t in stop_ids if 0 <= t < self.vocab_size]
        bias = [(t, b) for t, b in (p.logit_bias or {}).items() if 0 <= t < self.vocab_size]
        core_args = dict(
            id=rid,
            tokens=msg.input_ids,
            max_new_tokens=max_new,
            min_new_tokens=p.min_new_tokens,
            stop_ids=stop_ids,
            stop=list(p.stop) or None,
            skip_special_tokens=p.skip_special_tokens,
            spaces_between_special_tokens=p.spaces_between_special_tokens,
            no_stop_trim=p.no_stop_trim,
            namespace=namespace,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            min_p=p.min_p,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            seed=p.seed if p.seed is not None else self.rng.getrandbits(63),
            logit_bias=bias,
            user_flags=flags,
            arrival=msg.created_time or time.time(),
        )
        init = DetokInit(
            id=rid,
            prompt_tail=msg.input_ids[-PROMPT_TAIL:],
            skip_special_tokens=p.skip_special_tokens,
            spaces_between_special_tokens=p.spaces_between_special_tokens,
            stop=list(p.stop),
            no_stop_trim=p.no_stop_trim,
        )
        return Admitted(core_args, host, init)

    def error(self, input_ids: list[int], max_new: int) -> str | None:
        """Why a request can never run here (a client error), or None."""
        n = len(input_ids)
        if n == 0:
            return "the prompt is empty"
        if n >= self.context_len:
            return f"the prompt has {n} tokens; the context length is {self.context_len}"
        ids = np.asarray(input_ids, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if len(bad):
            return f"token id {int(bad[0])} is outside the vocabulary (size {self.vocab_size})"
        need = n + min(max(max_new, 1), CLIP_MAX_NEW_TOKENS)
        if need > self.pool_size:
            return (
                f"the request needs up to {need} KV cache slots (prompt {n} + "
                f"max_new_tokens); the KV cache holds {self.pool_size}"
            )
        return None


def tokenizer_eos_id(tokenizer_path: str) -> int | None:
    """The id of tokenizer_config.json's eos_token in tokenizer.json, if both name one."""
    folder = Path(tokenizer_path)
    try:
        eos = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
        tok = json.loads((folder / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str):
        return None
    for added in tok.get("added_tokens", []):
        if added.get("content") == eos:
            return int(added["id"])
    vocab = (tok.get("model") or {}).get("vocab")
    return int(vocab[eos]) if isinstance(vocab, dict) and eos in vocab else None
