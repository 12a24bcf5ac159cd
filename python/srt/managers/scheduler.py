"""Scheduler process: owns the model and the KV cache, and runs the step loop.

In: `TokenizedGenerateReqInput` / `AbortReq` from the main process (ZMQ PULL).
Out: `BatchTokenIDOut` to the detokenizer (ZMQ PUSH), once per step.
Control: `GetStatsReq` / `FlushCacheReq` are answered straight to main (PUSH `tokenizer_ipc`).

Each step: receive requests -> the Rust `BatchScheduler` plans the step (prefill chunks of
waiting requests with prefix-cache reuse, or one decode token for every running request,
retracting some when KV runs out) -> build a `ForwardBatch` -> forward -> sample -> commit the
tokens to the plan -> check finish conditions -> send the new ids (that output side is
`scheduler_output.SchedulerOutputMixin`).
Rust owns the bookkeeping (prefix tree, slot ownership); this module owns tensors and requests.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import zmq

from srt._native import BatchScheduler, Detokenizer
from srt.configs.model_config import ModelConfig
from srt.layers.sampler import Sampler
from srt.managers.io_struct import (
    AbortReq,
    FinishReason,
    FlushCacheReq,
    FlushCacheResp,
    GetStatsReq,
    LogprobDelta,
    ProcessReady,
    StatsResp,
    TokenizedGenerateReqInput,
    decode,
    encode,
)
from srt.managers.scheduler_output import PROMPT_TAIL, SchedulerOutputMixin
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.model_runner import ModelRunner, RankFailure
from srt.sampling_params import SamplingParams
from srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)

# NOTE: max_new_tokens is clipped to this when the plan reserves decode memory (Rust default).
CLIP_MAX_NEW_TOKENS = 4096
# Consecutive idle plans with requests waiting and nothing running before the head of the
# queue is refused; only reachable if a request can never fit, which add-time checks prevent.
STUCK_STEPS = 1000
# Consecutive failed steps after which the runner is taken to be broken: the process exits
# (and the server with it) instead of failing every request that comes.
MAX_FAILED_STEPS = 10
# Test-only fault injection: a forward whose batch holds a request with this token id in its
# prompt raises, so tests can check that one failing step ends only its own requests.
FAULT_TOKEN_ENV = "SRT_DEBUG_FAIL_ON_TOKEN"
# Test-only: seconds to sleep after each prefill/decode step, so timing tests (timeouts,
# shutdown with requests in flight) do not depend on how fast the machine is.
STEP_DELAY_ENV = "SRT_DEBUG_STEP_DELAY_S"


@dataclass
class Req:
    rid: str
    nid: int
    input_ids: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int
    stop_ids: set[int]
    created_time: float
    output_ids: list[int] = field(default_factory=list)
    row: int | None = None  # ReqToTokenPool row while admitted
    cached_tokens: int = 0
    sent_len: int = 0  # output ids already sent to the detokenizer
    init_sent: bool = False
    finished: FinishReason | None = None
    checks_stop_strings: bool = False
    # Logprobs (srt.layers.logprobs). `input_lp_next` is the next prompt position whose logprob
    # is still to be computed; it equals len(input_ids) when none are (left) to compute.
    return_logprob: bool = False
    top_logprobs_num: int = 0
    input_lp_next: int = 0
    lp: LogprobDelta | None = None  # not yet sent
    # max_new_tokens == 0 with prompt logprobs: prefill to score the prompt, emit no token.
    score_only: bool = False
    # json_schema / regex requests: their xgrammar GrammarMatcher (srt.constrained.grammar).
    matcher: Any = None
    grammar_rejected: bool = False

    cache_salt: str = ""

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids


class Scheduler(SchedulerOutputMixin):
    def __init__(self, server_args: ServerArgs, port_args: PortArgs, dp_rank: int = 0) -> None:
        self.server_args = server_args
        self.dp_rank = dp_rank
        self.model_config = ModelConfig(
            server_args.model_path,
            context_length=server_args.context_length,
            dtype=server_args.dtype,
            device=server_args.device,
        )
        self.runner = ModelRunner(self.model_config, server_args)
        self.device = self.runner.device
        self.context_len = self.model_config.context_len
        self.vocab_size = self.model_config.vocab_size
        self.pool_size = self.runner.max_total_num_tokens
        self.max_running = self.runner.max_running_requests
        chunk = server_args.chunked_prefill_size
        self.plan = BatchScheduler(
            pool_size=self.pool_size,
            page_size=server_args.page_size,
            policy=server_args.schedule_policy,
            max_prefill_tokens=server_args.max_prefill_tokens,
            chunked_prefill_size=None if chunk == -1 else chunk,
            max_running_requests=self.max_running,
            enable_radix_cache=not server_args.disable_radix_cache,
            seed=server_args.random_seed,
            clip_max_new_tokens=CLIP_MAX_NEW_TOKENS,
        )
        self.sampler = Sampler()
        # Stop strings must end generation here, not only be trimmed by the detokenizer.
        self.stop_checker = Detokenizer(server_args.tokenizer_path or server_args.model_path)
        tokenizer_eos = tokenizer_eos_id(server_args.tokenizer_path or server_args.model_path)
        self.eos_ids = self.model_config.eos_token_ids | (
            {tokenizer_eos} if tokenizer_eos is not None else set()
        )
        self.rng = random.Random(server_args.random_seed)
        self.reqs: dict[int, Req] = {}  # by native id
        self.rid_to_nid: dict[str, int] = {}
        self.next_nid = 1
        self.outbox: dict[int, Req] = {}  # requests with something to send this step
        self.stuck_steps = 0
        self._grammar_backend: Any = None  # built on the first constrained request

        # Prefix-cache hit counters over finished requests that were prefilled.
        self.hit_prompt_tokens = 0
        self.hit_cached_tokens = 0

        self.request_timeout = server_args.request_timeout
        self.failed_steps = 0
        fault = os.environ.get(FAULT_TOKEN_ENV)
        self.fault_token = int(fault) if fault else None
        self.step_delay = float(os.environ.get(STEP_DELAY_ENV) or 0.0)
        self.busy = False  # had requests since the last idle report
        # After a failed step the prefix cache holds slots the failed forward never wrote;
        # waiting requests are parked outside the plan (so none matches them) until the
        # running ones end and the cache can be flushed.
        self.flush_pending = False
        self.parked: list[Req] = []

        self.zmq_ctx = ctx = zmq.Context(2)
        # NOTE: unsent messages to a dead peer must never block exit or garbage collection.
        ctx.setsockopt(zmq.LINGER, 0)
        self.recv_sock = ctx.socket(zmq.PULL)
        self.recv_sock.bind(port_args.scheduler_ipcs[dp_rank])
        self.send_sock = ctx.socket(zmq.PUSH)
        self.send_sock.connect(port_args.detokenizer_ipc)
        # Control answers go to main directly; they need no detokenizing.
        self.control_sock = ctx.socket(zmq.PUSH)
        self.control_sock.setsockopt(zmq.LINGER, 0)
        self.control_sock.connect(port_args.tokenizer_ipc)

    def close(self) -> None:
        """Closes the sockets (in-process use: tests, tools); the process itself just exits."""
        for sock in (self.recv_sock, self.send_sock, self.control_sock):
            sock.close(linger=0)
        self.zmq_ctx.term()

    @property
    def info(self) -> dict:
        return {
            "max_total_num_tokens": self.pool_size,
            "max_running_requests": self.max_running,
            "context_len": self.context_len,
            "vocab_size": self.vocab_size,
            "model_path": self.server_args.model_path,
            "architecture": self.model_config.architecture,
            "device": str(self.device),
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "tp_size": self.server_args.tp_size,
            "pp_size": self.server_args.pp_size,
        }

    # ---- loop ----------------------------------------------------------------------------

    def event_loop(self) -> None:
        while True:
            self.recv_requests(block=not self.reqs)
            self.run_step()

    def run_step(self) -> str:
        """Plans and runs one step, sends its outputs; returns the plan's kind.

        An exception in a step ends that step's requests (finish_reason abort with the error)
        and the loop goes on; MAX_FAILED_STEPS failures in a row re-raise it."""
        if self.request_timeout is not None:
            self.expire_requests(self.request_timeout)
        if self.flush_pending:
            self.try_flush_cache()
        plan = self.plan.schedule()
        try:
            if plan.kind == "prefill":
                self.run_prefill(plan.entries)
                self.stuck_steps = 0
            elif plan.kind == "decode":
                self.run_decode(plan.ids, plan.slots, plan.retracted)
                self.stuck_steps = 0
            elif self.reqs:
                self.handle_idle_with_requests()
            if plan.kind != "idle":  # only a step that ran the model shows the runner works
                self.failed_steps = 0
        except Exception as e:
            self.fail_step(plan, e)
        self.flush_outputs()
        if self.step_delay and plan.kind != "idle":
            time.sleep(self.step_delay)
        if self.reqs:
            self.busy = True
        elif self.busy:
            self.busy = False
            self.report_idle()
        return plan.kind

    def fail_step(self, plan: object, error: Exception) -> None:
        """Aborts the requests of a step that raised, which returns their KV; re-raises when
        steps keep failing (a broken runner, not a bad request)."""
        if isinstance(error, RankFailure):
            raise error  # the other ranks cannot follow; the watchdog ends the server
        self.failed_steps += 1
        logger.exception("step failed (%d in a row); aborting its requests", self.failed_steps)
        if self.failed_steps >= MAX_FAILED_STEPS:
            raise RuntimeError(f"{self.failed_steps} steps failed in a row") from error
        kind = getattr(plan, "kind", "")
        if kind == "prefill":
            nids = [e.rid for e in plan.entries]  # type: ignore[attr-defined]
        elif kind == "decode":
            nids = list(plan.ids)  # type: ignore[attr-defined]
        else:
            nids = list(self.reqs)  # an idle-step failure: nothing better to blame
        reason = f"internal error while running the request: {type(error).__name__}: {error}"
        for nid in nids:
            req = self.reqs.get(nid)
            if req is not None:  # some may have finished before the failure
                self.finish(req, FinishReason(type="abort", message=reason))
        if not self.server_args.disable_radix_cache:
            # NOTE: finishing inserted the failed step's unwritten slots into the prefix cache.
            self.flush_pending = True
            for req in list(self.reqs.values()):
                if req.row is None and self.plan.contains(req.nid):  # waiting: holds no KV
                    self.plan.finish(req.nid)
                    self.parked.append(req)
            self.try_flush_cache()

    def try_flush_cache(self) -> None:
        """Flushes the prefix cache once no request is in the plan, then re-queues the parked."""
        stats = self.plan.stats()
        if stats["num_running"] or stats["num_waiting"]:
            return
        self.plan.flush_cache()
        self.flush_pending = False
        parked, self.parked = self.parked, []
        for req in sorted(parked, key=lambda r: r.nid):
            self.enqueue(req)

    def expire_requests(self, limit: float) -> None:
        """Ends requests (queued or running) older than `limit` seconds, freeing their KV."""
        now = time.time()
        expired = [r for r in self.reqs.values() if now - r.created_time > limit]
        for req in expired:
            message = f"request timed out after {limit:g} s"
            self.finish(req, FinishReason(type="abort", message=message))

    def kv_usage(self) -> dict[str, int]:
        """KV slot accounting: slots free, cached (evictable or locked), owned by requests."""
        stats = self.plan.stats()
        pool = self.runner.req_to_token_pool
        return {
            "pool": self.pool_size,
            "available": int(stats["available"]),
            "evictable": int(stats["evictable"]),
            "protected": int(stats["protected"]),
            "request_owned": int(stats["request_owned"]),
            "rows_free": pool.available(),
            "rows": pool.size,
        }

    def report_idle(self) -> None:
        """Logs the KV accounting when the last request ends (tests and soak runs read it)."""
        if logger.isEnabledFor(logging.DEBUG):
            usage = " ".join(f"{k}={v}" for k, v in self.kv_usage().items())
            logger.debug("kv idle: %s", usage)

    def recv_requests(self, block: bool) -> None:
        if block:
            self.recv_sock.poll()
        while True:
            try:
                buf = self.recv_sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = decode(buf)
            if isinstance(msg, TokenizedGenerateReqInput):
                try:
                    self.add_request(msg)
                except Exception as e:  # a bad request must not take the scheduler down
                    logger.exception("adding request %s failed", msg.rid)
                    nid = self.rid_to_nid.get(msg.rid)
                    if nid is not None and nid in self.reqs:
                        message = f"invalid request: {type(e).__name__}: {e}"
                        self.finish(self.reqs[nid], FinishReason(type="abort", message=message))
            elif isinstance(msg, AbortReq):
                self.abort(msg)
            elif isinstance(msg, GetStatsReq):
                self.control_sock.send(encode(StatsResp(req_id=msg.req_id, stats=self.stats())))
            elif isinstance(msg, FlushCacheReq):
                self.control_sock.send(encode(self.flush_cache(msg.req_id)))
            else:
                logger.error("scheduler got an unexpected message: %s", type(msg).__name__)

    # ---- control -------------------------------------------------------------------------

    def stats(self) -> dict:
        """Live numbers for /server_info and /metrics."""
        s = dict(self.plan.stats())
        # NOTE: like SGLang, the reclaimable (evictable) prefix cache does not count as used.
        free = int(s.get("available", self.pool_size)) + int(s.get("evictable", 0))
        used = self.pool_size - free
        s["num_requests"] = len(self.reqs)
        s["token_usage"] = used / self.pool_size if self.pool_size else 0.0
        s["used_tokens"] = used
        s["hit_prompt_tokens"] = self.hit_prompt_tokens
        s["hit_cached_tokens"] = self.hit_cached_tokens
        s["cache_hit_rate"] = (
            self.hit_cached_tokens / self.hit_prompt_tokens if self.hit_prompt_tokens else 0.0
        )
        return s

    def flush_cache(self, req_id: int) -> FlushCacheResp:
        """Empties the prefix cache when no request is in flight; refuses otherwise."""
        if self.reqs:
            return FlushCacheResp(
                req_id=req_id,
                success=False,
                message=f"cannot flush the cache while {len(self.reqs)} requests are in flight",
            )
        try:
            self.plan.flush_cache()
        except (RuntimeError, ValueError) as e:
            return FlushCacheResp(req_id=req_id, success=False, message=str(e))
        # Scheduler-side state tied to the old cache: hit counters start over, nothing is stuck.
        self.hit_prompt_tokens = 0
        self.hit_cached_tokens = 0
        self.stuck_steps = 0
        return FlushCacheResp(req_id=req_id, success=True, message="the prefix cache is empty")

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, msg: TokenizedGenerateReqInput) -> None:
        p = msg.sampling_params
        nid = self.next_nid
        self.next_nid += 1
        limit = self.context_len - len(msg.input_ids)
        max_new = limit if p.max_new_tokens is None else min(p.max_new_tokens, limit)
        stop_ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids |= self.eos_ids
        req = Req(
            rid=msg.rid,
            nid=nid,
            input_ids=list(msg.input_ids),
            params=p,
            seed=p.seed if p.seed is not None else self.rng.getrandbits(63),
            max_new_tokens=max(max_new, 0),
            stop_ids=stop_ids,
            created_time=msg.created_time or time.time(),
            cache_salt=msg.cache_salt,
        )
        self.reqs[nid] = req
        self.rid_to_nid[msg.rid] = nid
        n_prompt = len(req.input_ids)
        req.input_lp_next = n_prompt
        namespace = msg.cache_salt
        if msg.return_logprob:
            req.return_logprob = True
            req.top_logprobs_num = max(0, msg.top_logprobs_num)
            req.lp = LogprobDelta()
            if 0 <= msg.logprob_start_len < n_prompt:
                start = msg.logprob_start_len
                if start == 0:
                    req.lp.input_logprobs.append(None)
                    req.lp.input_ids.append(req.input_ids[0])
                    if req.top_logprobs_num:
                        req.lp.input_top_logprobs.append([])
                        req.lp.input_top_ids.append([])
                req.input_lp_next = max(start, 1)
                # NOTE: a cached prefix skips computing its positions, whose logits the prompt
                # logprobs need; a namespace of its own means nothing is matched for this
                # request (correct, at the cost of no prefix reuse for it).
                namespace = f"{msg.cache_salt}\x00logprob:{msg.rid}"
        error = self.admission_error(req)
        if error is None and (p.json_schema is not None or p.regex is not None):
            error = self.attach_grammar(req)
        if error is not None:
            self.finish(req, FinishReason(type="abort", message=error, status_code=400))
            return
        if req.max_new_tokens == 0:
            if req.input_lp_next >= n_prompt:
                self.finish(req, FinishReason(type="length", length=0))
                return
            req.score_only = True
        if p.stop:
            self.stop_checker.add(
                nid,
                req.input_ids[-PROMPT_TAIL:],
                skip_special_tokens=p.skip_special_tokens,
                spaces_between_special_tokens=p.spaces_between_special_tokens,
                stop=list(p.stop),
                no_stop_trim=p.no_stop_trim,
            )
            req.checks_stop_strings = True
        req.cache_salt = namespace
        self.enqueue(req)

    def enqueue(self, req: Req) -> None:
        """Hands a request (new, or parked with the outputs it already has) to the plan."""
        if self.flush_pending:
            self.parked.append(req)
            return
        left = req.max_new_tokens - len(req.output_ids)
        # NOTE: a score-only request (max_new_tokens 0, prompt logprobs) still reserves one.
        self.plan.add_request(req.nid, req.all_ids, max(left, 1), req.cache_salt)

    def attach_grammar(self, req: Req) -> str | None:
        """Gives `req` its grammar matcher; returns an error message if it cannot."""
        from srt.constrained.grammar import GrammarBackend, grammar_key

        key = grammar_key(req.params)
        assert key is not None
        try:
            if self._grammar_backend is None:
                from transformers import AutoTokenizer

                args = self.server_args
                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)
                self._grammar_backend = GrammarBackend(
                    tokenizer, self.vocab_size, self.model_config.eos_token_ids
                )
            req.matcher = self._grammar_backend.new_matcher(key)
        except (ValueError, RuntimeError) as e:
            return f"cannot use the grammar: {e}"
        return None

    def admission_error(self, req: Req) -> str | None:
        n = len(req.input_ids)
        if n == 0:
            return "the prompt is empty"
        if n >= self.context_len:
            return f"the prompt has {n} tokens; the context length is {self.context_len}"
        bad = next((t for t in req.input_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            return f"token id {bad} is outside the vocabulary (size {self.vocab_size})"
        need = n + min(max(req.max_new_tokens, 1), CLIP_MAX_NEW_TOKENS)
        if need > self.pool_size:
            return (
                f"the request needs up to {need} KV cache slots (prompt {n} + "
                f"max_new_tokens); the KV cache holds {self.pool_size}"
            )
        return None

    def abort(self, msg: AbortReq) -> None:
        if msg.abort_all:
            targets = list(self.reqs.values())
        else:
            nid = self.rid_to_nid.get(msg.rid)
            targets = [self.reqs[nid]] if nid is not None else []
        for req in targets:
            self.finish(req, FinishReason(type="abort", message=msg.message))

    def finish(self, req: Req, reason: FinishReason) -> None:
        """Ends a request in any state: its KV goes to the prefix cache, its row is freed."""
        req.finished = reason
        if req.output_ids:
            self.hit_prompt_tokens += len(req.input_ids)
            self.hit_cached_tokens += req.cached_tokens
        if self.plan.contains(req.nid):
            self.plan.finish(req.nid)
        if req.row is not None:
            self.runner.req_to_token_pool.free(req.row)
            req.row = None
        if req.checks_stop_strings:
            self.stop_checker.remove(req.nid)
        if self.parked and req in self.parked:
            self.parked.remove(req)
        del self.reqs[req.nid]
        self.rid_to_nid.pop(req.rid, None)
        self.outbox[req.nid] = req

    def handle_idle_with_requests(self) -> None:
        stats = self.plan.stats()
        if stats["num_running"] > 0 or stats["num_waiting"] == 0:
            return
        self.stuck_steps += 1
        if self.stuck_steps >= STUCK_STEPS:
            # NOTE: a waiting request that can never be admitted would otherwise spin forever.
            req = min(self.reqs.values(), key=lambda r: r.nid)
            logger.error("request %s cannot be scheduled; aborting it", req.rid)
            self.finish(req, FinishReason(type="abort", message="not enough KV cache memory"))
            self.stuck_steps = 0

    # ---- steps ---------------------------------------------------------------------------

    def run_prefill(self, entries: list) -> None:
        pool = self.runner.req_to_token_pool
        input_ids: list[int] = []
        out_loc: list[int] = []
        rows: list[int] = []
        prefix_lens: list[int] = []
        extend_lens: list[int] = []
        sampling: list[tuple[int, Req]] = []
        # req_to_token writes (the runner applies them, on every rank).
        table_rows: list[int] = []
        table_starts: list[int] = []
        table_lens: list[int] = []
        table_slots: list[int] = []
        # Prompt logprobs: (req, first position, end) of logits rows wanted beyond the last.
        extra: list[int] = []
        scored: list[tuple[Req, int, int]] = []
        for i, e in enumerate(entries):
            req = self.reqs[e.rid]
            if e.slots_from == 0:
                if req.row is None:
                    req.row = pool.alloc()
                    if req.row is None:
                        raise RuntimeError("ReqToTokenPool is full; max_running_requests is off")
                req.cached_tokens = max(req.cached_tokens, e.cached_len)
            table_rows.append(req.row)
            table_starts.append(e.slots_from)
            table_lens.append(len(e.slots))
            table_slots.extend(e.slots)
            end = e.prefix_len + e.extend_len
            if req.input_lp_next < len(req.input_ids):
                # Logits at position q give the logprob of token q + 1.
                q0 = max(e.prefix_len, req.input_lp_next - 1)
                q1 = min(end, len(req.input_ids) - 1)
                if q0 > req.input_lp_next - 1:
                    logger.error("prompt logprobs of %s lost to a cached prefix", req.rid)
                if q1 > q0:
                    base = len(input_ids) - e.prefix_len
                    extra.extend(range(base + q0, base + q1))
                    scored.append((req, q0, q1))
            input_ids.extend(req.all_ids[e.prefix_len : end])
            out_loc.extend(e.slots[len(e.slots) - e.extend_len :])
            rows.append(req.row)
            prefix_lens.append(e.prefix_len)
            extend_lens.append(e.extend_len)
            if e.is_last_chunk:
                sampling.append((i, req))
        batch = ForwardBatch.extend(
            input_ids, out_loc, rows, prefix_lens, extend_lens, device=self.device
        )
        batch.set_table_writes(table_rows, table_starts, table_lens, table_slots)
        if extra:
            batch.set_extra_logit_indices(extra)

        self.maybe_inject_fault([self.reqs[e.rid] for e in entries])
        logits = self.runner.forward(batch)
        if extra:
            self.add_prompt_logprobs(scored, logits[len(entries) :])
            logits = logits[: len(entries)]
        if sampling:
            idx = torch.tensor([i for i, _ in sampling], device=logits.device)
            self.sample_and_commit([r for _, r in sampling], logits.index_select(0, idx))

    def run_decode(self, nids: list[int], slots: list[int], retracted: list[int]) -> None:
        pool = self.runner.req_to_token_pool
        if retracted:
            logger.debug("retracted %d requests (KV cache full)", len(retracted))
        for nid in retracted:
            req = self.reqs[nid]
            if req.row is not None:
                pool.free(req.row)
                req.row = None
        if not nids:
            return
        reqs = [self.reqs[n] for n in nids]
        seq_lens = [len(r.input_ids) + len(r.output_ids) for r in reqs]
        rows = [r.row for r in reqs]
        batch = ForwardBatch.decode(
            [r.output_ids[-1] for r in reqs], slots, rows, seq_lens, device=self.device
        )
        batch.set_table_writes(rows, [n - 1 for n in seq_lens], [1] * len(rows), slots)
        self.maybe_inject_fault(reqs)
        logits = self.runner.forward(batch)
        self.sample_and_commit(reqs, logits)

    def maybe_inject_fault(self, reqs: list[Req]) -> None:
        if self.fault_token is not None and any(self.fault_token in r.input_ids for r in reqs):
            raise RuntimeError(f"injected fault ({FAULT_TOKEN_ENV}={self.fault_token})")


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


def run_scheduler_process(
    server_args: ServerArgs,
    port_args: PortArgs,
    ready_conn: Connection,
    dp_rank: int = 0,
    rank: int = 0,
) -> None:
    """Entry point of one scheduler rank of data-parallel replica `dp_rank` (run by
    `launch._child_entry`, which ties it to the parent, sets up logging and reports an
    exception from here as a failed start).

    Rank 0 runs the Scheduler (requests, batch assembly, sampling); the other ranks of a
    tensor / pipeline parallel replica run only their ModelRunner, stepping when rank 0 does."""
    faulthandler.enable()
    server_args = init_rank(server_args, port_args, dp_rank, rank)
    if rank == 0:
        scheduler = Scheduler(server_args, port_args, dp_rank)
        ready_conn.send_bytes(encode(ProcessReady(name="scheduler", ok=True, info=scheduler.info)))
        scheduler.event_loop()
        return
    model_config = ModelConfig(
        server_args.model_path,
        context_length=server_args.context_length,
        dtype=server_args.dtype,
        device=server_args.device,
    )
    runner = ModelRunner(model_config, server_args)
    info = {"rank": rank, "device": str(runner.device), "layers": list(runner.model.layer_range)}
    ready_conn.send_bytes(encode(ProcessReady(name=f"rank{rank}", ok=True, info=info)))
    runner.worker_loop()


def init_rank(server_args: ServerArgs, port_args: PortArgs, dp_rank: int, rank: int) -> ServerArgs:
    """Joins the replica's process groups when it has several ranks; on GPU, picks this rank's
    device (`--base-gpu-id` + its index among the node's ranks of all replicas). Returns the
    server args with that device."""
    if server_args.world_size == 1 and server_args.dp_size == 1:
        return server_args
    from srt.configs.model_config import resolve_device
    from srt.distributed.parallel_state import init_parallel

    device = resolve_device(server_args.device)
    if device.startswith("cuda"):
        per_node = server_args.world_size // server_args.nnodes
        gpu = server_args.base_gpu_id + dp_rank * per_node + rank % per_node
        torch.cuda.set_device(gpu)
        device = f"cuda:{gpu}"
        server_args = server_args.replace(device=device)
    if server_args.world_size > 1:
        init_parallel(
            server_args.tp_size,
            server_args.pp_size,
            rank,
            port_args.dist_init_addrs[dp_rank],
            torch.device(device),
        )
    return server_args
