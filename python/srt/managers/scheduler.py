"""Scheduler process: owns the model and the KV cache, and runs the step loop.

In: `TokenizedGenerateReqInput` / `AbortReq` from the main process (ZMQ PULL).
Out: `BatchTokenIDOut` to the detokenizer (ZMQ PUSH), once per step.

Each step: receive requests -> the Rust `BatchScheduler` plans the step (prefill chunks of
waiting requests with prefix-cache reuse, or one decode token for every running request,
retracting some when KV runs out) -> build a `ForwardBatch` -> forward -> sample -> commit the
tokens to the plan -> check finish conditions -> send the new ids.
Rust owns the bookkeeping (prefix tree, slot ownership); this module owns tensors and requests.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import random
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch
import zmq

from srt._native import BatchScheduler, Detokenizer
from srt.configs.model_config import ModelConfig
from srt.layers.sampler import Sampler, SamplingBatchInfo
from srt.managers.io_struct import (
    AbortReq,
    BatchTokenIDOut,
    DetokInit,
    FinishReason,
    ProcessReady,
    TokenizedGenerateReqInput,
    decode,
    encode,
)
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.model_runner import ModelRunner
from srt.sampling_params import SamplingParams
from srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)

# Prompt tokens sent to the detokenizer as decoding context for the first output token.
PROMPT_TAIL = 16
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
    cache_salt: str = ""

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids


class Scheduler:
    def __init__(self, server_args: ServerArgs, port_args: PortArgs) -> None:
        self.server_args = server_args
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
        self.rng = random.Random(server_args.random_seed)
        self.reqs: dict[int, Req] = {}  # by native id
        self.rid_to_nid: dict[str, int] = {}
        self.next_nid = 1
        self.outbox: dict[int, Req] = {}  # requests with something to send this step
        self.stuck_steps = 0
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

        ctx = zmq.Context(2)
        self.recv_sock = ctx.socket(zmq.PULL)
        self.recv_sock.bind(port_args.scheduler_ipc)
        self.send_sock = ctx.socket(zmq.PUSH)
        self.send_sock.connect(port_args.detokenizer_ipc)

    @property
    def info(self) -> dict:
        return {
            "max_total_num_tokens": self.pool_size,
            "max_running_requests": self.max_running,
            "context_len": self.context_len,
            "vocab_size": self.vocab_size,
            "model_path": self.server_args.model_path,
            "device": str(self.device),
            "dtype": str(self.runner.dtype).removeprefix("torch."),
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
            else:
                logger.error("scheduler got an unexpected message: %s", type(msg).__name__)

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, msg: TokenizedGenerateReqInput) -> None:
        p = msg.sampling_params
        nid = self.next_nid
        self.next_nid += 1
        limit = self.context_len - len(msg.input_ids)
        max_new = limit if p.max_new_tokens is None else min(p.max_new_tokens, limit)
        stop_ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids |= self.model_config.eos_token_ids
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
        error = self.admission_error(req)
        if error is not None:
            self.finish(req, FinishReason(type="abort", message=error))
            return
        if req.max_new_tokens == 0:
            self.finish(req, FinishReason(type="length", length=0))
            return
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
        self.enqueue(req)

    def enqueue(self, req: Req) -> None:
        """Hands a request (new, or parked with the outputs it already has) to the plan."""
        if self.flush_pending:
            self.parked.append(req)
            return
        left = req.max_new_tokens - len(req.output_ids)
        self.plan.add_request(req.nid, req.all_ids, left, req.cache_salt)

    def admission_error(self, req: Req) -> str | None:
        n = len(req.input_ids)
        if n == 0:
            return "the prompt is empty"
        if n >= self.context_len:
            return f"the prompt has {n} tokens; the context length is {self.context_len}"
        bad = next((t for t in req.input_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            return f"token id {bad} is outside the vocabulary (size {self.vocab_size})"
        need = n + min(req.max_new_tokens, CLIP_MAX_NEW_TOKENS)
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
        for i, e in enumerate(entries):
            req = self.reqs[e.rid]
            if e.slots_from == 0:
                if req.row is None:
                    req.row = pool.alloc()
                    if req.row is None:
                        raise RuntimeError("ReqToTokenPool is full; max_running_requests is off")
                req.cached_tokens = max(req.cached_tokens, e.cached_len)
            pool.req_to_token[req.row, e.slots_from : e.slots_from + len(e.slots)] = torch.tensor(
                e.slots, dtype=torch.int32
            )
            end = e.prefix_len + e.extend_len
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
        self.maybe_inject_fault([self.reqs[e.rid] for e in entries])
        logits = self.runner.forward(batch)
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
        pool.req_to_token[
            torch.tensor(rows, dtype=torch.int64), torch.tensor(seq_lens, dtype=torch.int64) - 1
        ] = torch.tensor(slots, dtype=torch.int32)
        batch = ForwardBatch.decode(
            [r.output_ids[-1] for r in reqs], slots, rows, seq_lens, device=self.device
        )
        self.maybe_inject_fault(reqs)
        logits = self.runner.forward(batch)
        self.sample_and_commit(reqs, logits)

    def maybe_inject_fault(self, reqs: list[Req]) -> None:
        if self.fault_token is not None and any(self.fault_token in r.input_ids for r in reqs):
            raise RuntimeError(f"injected fault ({FAULT_TOKEN_ENV}={self.fault_token})")

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
        # NOTE: the one device-to-host copy of the step.
        next_ids = self.sampler(logits, info).tolist()
        self.plan.commit([r.nid for r in reqs], next_ids)
        stop_string_reqs: list[Req] = []
        for req, tok in zip(reqs, next_ids, strict=True):
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
        n_out = len(req.output_ids)
        if tok in req.stop_ids and n_out >= req.params.min_new_tokens:
            return FinishReason(type="stop", matched=tok)
        if matched_stop is not None:
            return FinishReason(type="stop", matched=matched_stop)
        if n_out >= req.max_new_tokens:
            return FinishReason(type="length", length=req.max_new_tokens)
        if len(req.input_ids) + n_out >= self.context_len:
            return FinishReason(type="length", length=n_out)
        return None

    # ---- output --------------------------------------------------------------------------

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
        for req in self.outbox.values():
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


def run_scheduler_process(
    server_args: ServerArgs, port_args: PortArgs, ready_conn: Connection
) -> None:
    """Entry point of the scheduler process (run by `launch._child_entry`, which ties it to the
    parent, sets up logging and reports an exception from here as a failed start)."""
    faulthandler.enable()
    scheduler = Scheduler(server_args, port_args)
    ready_conn.send_bytes(encode(ProcessReady(name="scheduler", ok=True, info=scheduler.info)))
    scheduler.event_loop()
