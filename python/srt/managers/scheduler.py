"""Scheduler process: owns the model and the KV cache, and runs the step loop.

In: `GenerateReq` / `AbortReq` from the main process (ZMQ PULL). Out: `BatchTokenIDOut` to the
detokenizer (ZMQ PUSH), at most once per loop iteration.
Control: `GetStatsReq` / `FlushCacheReq` are answered straight to main (PUSH `tokenizer_ipc`).

The request record is the Rust `BatchScheduler` (`self.core`): tokens, KV slots, table row,
limits, stop ids and strings, sampling parameters; it plans each step as arrays and decides
the finishes when tokens are committed. Python keeps only what must be Python, keyed by the
same integer id: grammar matchers, logprob accumulators and stop regexes (`host_requests`).

Each iteration: receive requests -> plan step N + 1 (`core.schedule()`) -> submit it to the
step worker (`model_executor.executor`: the runner and worker this rank gets) -> process step N: wait for its sampled ids, `core.commit` them, apply the host
decisions, send the outputs (`scheduler_output.Outbox`). With overlap scheduling (on by default
on GPU; `--enable-overlap-on-cpu`) step N + 1 is planned and submitted while step N runs, so its
finish checks land one step late: a request that stops at step N has had one more token
planned, which its commit drops. A step with constrained (grammar) rows needs step N's tokens
for its masks, so step N is processed first. Without overlap each step is processed at once.
Requests are admitted by `admission.Admission`, which returns what to add.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np
import zmq

from srt._native import BatchScheduler
from srt.configs.model_config import ModelConfig
from srt.managers.admission import CLIP_MAX_NEW_TOKENS, Admission, Rejected, tokenizer_eos_id
from srt.managers.host_requests import FAULT_FLAG, GRAMMAR_FLAG, HostRequests, StepHostMeta
from srt.managers.io_struct import (
    AbortReq,
    FinishReason,
    FlushCacheReq,
    FlushCacheResp,
    GenerateReq,
    GetStatsReq,
    ProcessReady,
    StatsResp,
    decode,
    encode,
)
from srt.managers.scheduler_output import Outbox, finish_reason
from srt.model_executor.executor import create_executor
from srt.model_executor.step_input import StepInput
from srt.model_executor.step_job import PendingStep, RankFailure, StepOutput
from srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)

# Consecutive idle plans with requests waiting and nothing running before the head of the
# queue is refused; only reachable if a request can never fit, which add-time checks prevent.
STUCK_STEPS = 1000
# Consecutive failed steps after which the runner is taken to be broken: the process exits
# (and the server with it) instead of failing every request that comes.
MAX_FAILED_STEPS = 10
# Test-only fault injection: a step holding a request with this token id in its prompt raises
# (inside the step worker), so tests can check that one failing step ends only its requests.
FAULT_TOKEN_ENV = "SRT_DEBUG_FAIL_ON_TOKEN"
# Test-only: seconds to sleep after each prefill/decode step, so timing tests (timeouts,
# shutdown with requests in flight) do not depend on how fast the machine is.
STEP_DELAY_ENV = "SRT_DEBUG_STEP_DELAY_S"


@dataclass
class Launched:
    """A submitted step waiting to be processed."""

    step: StepInput
    pending: PendingStep
    meta: StepHostMeta


class Scheduler:
    def __init__(self, server_args: ServerArgs, port_args: PortArgs, dp_rank: int = 0) -> None:
        self.server_args = server_args
        self.dp_rank = dp_rank
        self.model_config = ModelConfig(
            server_args.model_path,
            context_length=server_args.context_length,
            dtype=server_args.dtype,
            device=server_args.device,
        )
        self.vocab_size = self.model_config.vocab_size
        tokenizer_path = server_args.tokenizer_path or server_args.model_path
        self.host = HostRequests(tokenizer_path, self.vocab_size, self.model_config.eos_token_ids)
        executor = create_executor(self.model_config, server_args, self.host.apply_bitmask)
        self.runner = executor.runner
        self.worker = executor.worker
        self.device = executor.device
        self.overlap = executor.overlap
        self.context_len = self.model_config.context_len
        self.pool_size = self.runner.max_total_num_tokens
        self.max_running = self.runner.max_running_requests
        chunk = server_args.chunked_prefill_size
        self.core = BatchScheduler(
            pool_size=self.pool_size,
            page_size=server_args.page_size,
            policy=server_args.schedule_policy,
            max_prefill_tokens=server_args.max_prefill_tokens,
            chunked_prefill_size=None if chunk == -1 else chunk,
            max_running_requests=self.max_running,
            enable_radix_cache=not server_args.disable_radix_cache,
            seed=server_args.random_seed,
            context_len=self.context_len,
            clip_max_new_tokens=CLIP_MAX_NEW_TOKENS,
            tokenizer_path=tokenizer_path,
        )
        self.outbox = Outbox()
        self.in_flight: deque[Launched] = deque()
        tokenizer_eos = tokenizer_eos_id(tokenizer_path)
        self.eos_ids = self.model_config.eos_token_ids | (
            {tokenizer_eos} if tokenizer_eos is not None else set()
        )
        fault = os.environ.get(FAULT_TOKEN_ENV)
        self.admission = Admission(
            self.context_len,
            self.vocab_size,
            self.pool_size,
            self.eos_ids,
            self.host,
            server_args.random_seed,
            int(fault) if fault else None,
        )
        self.stuck_steps = 0
        self.request_timeout = server_args.request_timeout
        self.failed_steps = 0
        self.step_delay = float(os.environ.get(STEP_DELAY_ENV) or 0.0)
        self.busy = False  # had requests since the last idle report
        # After a failed step the prefix cache may hold slots the failed forward never wrote:
        # no waiting request is admitted (so none matches them) until the cache is flushed.
        self.flush_pending = False

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
        """Stops the worker and closes the sockets (in-process use: tests, tools); the
        process itself just exits."""
        self.worker.close()
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
            "device": self.device,
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "tp_size": self.server_args.tp_size,
            "pp_size": self.server_args.pp_size,
        }

    # ---- loop ----------------------------------------------------------------------------

    def event_loop(self) -> None:
        while True:
            self.recv_requests(block=not self.has_work())
            self.run_step()

    def has_work(self) -> bool:
        """Requests in the system, steps in flight, or outputs not sent yet."""
        return self.core.num_requests > 0 or bool(self.in_flight) or bool(self.outbox)

    def run_step(self) -> str:
        """Plans and submits one step, processes the steps it does not overlap with, sends
        the outputs; returns the planned step's kind.

        A step that raises ends its requests (finish_reason abort with the error) and the loop
        goes on; MAX_FAILED_STEPS failures in a row re-raise it."""
        if self.request_timeout is not None:
            self.expire_requests(self.request_timeout)
        if self.flush_pending:
            self.try_flush_cache()
        step = StepInput.from_native(self.core.schedule())
        kind = "idle" if step.num_seqs == 0 else ("decode" if step.decode else "prefill")
        retracted = len(step.section("retracted"))
        if retracted:
            logger.debug("retracted %d requests (KV cache full)", retracted)
        if kind != "idle":
            if step.all_flags & GRAMMAR_FLAG:
                # Its masks need the tokens of the step still in flight.
                self.process_in_flight(keep=0)
            try:
                job, meta = self.host.prepare(step, self._fault(step))
            except Exception as e:
                # NOTE: the core abandons its oldest uncommitted step: process the older ones.
                self.process_in_flight(keep=0)
                self.fail_step(step, e)
            else:
                self.in_flight.append(Launched(step, self.worker.submit(job), meta))
        elif self.core.num_requests and not self.in_flight:
            self.handle_idle_with_requests()
        self.process_in_flight(keep=1 if self.overlap and kind != "idle" else 0)
        self.outbox.send(self.send_sock)
        if self.step_delay and kind != "idle":
            time.sleep(self.step_delay)
        if self.core.num_requests:
            self.busy = True
        elif self.busy and not self.in_flight:
            self.busy = False
            self.report_idle()
        return kind

    def process_in_flight(self, keep: int) -> None:
        """Processes the oldest submitted steps until `keep` are left."""
        while len(self.in_flight) > keep:
            self.process(self.in_flight.popleft())

    def process(self, launched: Launched) -> None:
        """Step N's outputs: commit its tokens, apply the host decisions, queue what to send."""
        try:
            out = launched.pending.result()
        except Exception as e:
            if not any(int(rid) in self.core for rid in launched.step.section("ids")):
                # Every request of it ended meanwhile: nothing is lost with it.
                self.core.abandon()
                return
            retried = self.retry_without_ended(launched, e)
            if retried is None:
                self.fail_step(launched.step, e)
                return
            launched, out = retried
        self.failed_steps = 0
        res = self.core.commit(out.ids)
        finished = {f[0]: f for f in res.finished}
        decisions = None
        if launched.meta:
            flagged = np.asarray(launched.meta.flagged_ids())
            mine = np.isin(res.ids, flagged)
            committed = dict(zip(res.ids[mine].tolist(), res.tokens[mine].tolist(), strict=True))
            decisions = self.host.after_commit(launched.meta, out, committed, set(finished))
            self.outbox.logprobs.extend(decisions.logprobs)
        self.outbox.add_tokens(res.ids, res.tokens)
        self.outbox.cached.extend(res.first)
        for rid, kind, value, completion, cached in res.finished:
            reason = finish_reason(kind, value)
            if decisions is not None and rid in decisions.override:
                reason = decisions.override[rid]
            self._ended(rid, reason, completion, cached)
        if decisions is not None:
            for rid, reason in decisions.finish:
                self.finish(rid, reason)
        # NOTE: one message per commit, so a message holds at most one token per request.
        self.outbox.send(self.send_sock)

    def retry_without_ended(
        self, launched: Launched, error: Exception
    ) -> tuple[Launched, StepOutput] | None:
        """A failed step that holds requests which ended before it was processed (e.g. those
        of a failed step it was planned on top of, with overlap) runs again without them,
        once: they may be what failed, and their tokens would be dropped anyway. Returns the
        rerun (with one token per sampling sequence of the original step), or None."""
        step = launched.step
        if isinstance(error, RankFailure):
            return None
        ids = step.section("ids")
        alive = np.fromiter((int(rid) in self.core for rid in ids), dtype=bool, count=len(ids))
        if alive.all() or not alive.any():
            return None
        sub, kept = step.select(np.nonzero(alive)[0])
        logger.warning(
            "step failed (%s); running it again without %d requests that already ended",
            error,
            int((~alive).sum()),
        )
        try:
            job, meta = self.host.prepare(sub, self._fault(sub))
            out = self.worker.submit(job).result()
        except Exception as e:
            logger.error("the rerun failed too: %s", e)
            return None
        ids_out = np.zeros(len(step.section("sample_pos")), dtype=np.int64)
        ids_out[kept] = out.ids
        rerun = StepOutput(ids_out, out.logprobs, out.prompt_logprobs)
        return Launched(sub, launched.pending, meta), rerun

    def fail_step(self, step: StepInput, error: Exception) -> None:
        """Ends the requests of a step that raised, which returns their KV; re-raises when
        steps keep failing (a broken runner, not a bad request)."""
        if isinstance(error, RankFailure):
            raise error  # the other ranks cannot follow; the watchdog ends the server
        self.failed_steps += 1
        logger.error(
            "step failed (%d in a row); aborting its requests",
            self.failed_steps,
            exc_info=error,
        )
        if self.failed_steps >= MAX_FAILED_STEPS:
            raise RuntimeError(f"{self.failed_steps} steps failed in a row") from error
        reason = FinishReason(
            type="abort",
            message=f"internal error while running the request: {type(error).__name__}: {error}",
        )
        for rid, _, _, completion, cached in self.core.abandon():
            self._ended(rid, reason, completion, cached)
        for rid in step.section("ids").tolist():
            if rid in self.core:  # e.g. mid-chunk: it samples nothing, abandon skips it
                self.finish(rid, reason)
        if not step.decode:
            # A prefill planned on top of the failed one may reuse a prefix it was computing:
            # its requests start over once the cache is flushed (their tokens from it drop).
            for later in self.in_flight:
                if not later.step.decode:
                    for rid in later.step.section("ids").tolist():
                        if rid in self.core:
                            self.core.requeue(rid)
        if not self.server_args.disable_radix_cache:
            # NOTE: the failed step's slots may be in the prefix cache (planned and finished
            # requests insert their KV); nothing may match them until it is flushed.
            self.flush_pending = True
            self.core.set_admission_paused(True)
        # Steps planned on top of the failed one run now, before anything else is planned: a
        # failure among them can still be retried without the requests that just ended.
        self.process_in_flight(keep=0)

    def try_flush_cache(self) -> None:
        """Flushes the prefix cache once no request holds KV and nothing is in flight."""
        stats = self.core.stats()
        if stats["num_running"] or stats["in_flight"] or self.in_flight:
            return
        self.core.flush_cache()
        self.core.set_admission_paused(False)
        self.flush_pending = False

    def expire_requests(self, limit: float) -> None:
        """Ends requests (queued or running) older than `limit` seconds, freeing their KV."""
        for rid in self.core.expired(time.time(), limit):
            self.finish(
                rid, FinishReason(type="abort", message=f"request timed out after {limit:g} s")
            )

    def kv_usage(self) -> dict[str, int]:
        """KV slot accounting: slots free, cached (evictable or locked), owned by requests."""
        stats = self.core.stats()
        return {
            "pool": self.pool_size,
            "available": int(stats["available"]),
            "evictable": int(stats["evictable"]),
            "protected": int(stats["protected"]),
            "request_owned": int(stats["request_owned"]),
            "rows_free": int(stats["rows_free"]),
            "rows": self.max_running,
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
            if isinstance(msg, GenerateReq):
                try:
                    self.add_request(msg)
                except Exception as e:  # a bad request must not take the scheduler down
                    logger.exception("adding request %d failed", msg.id)
                    message = f"invalid request: {type(e).__name__}: {e}"
                    reason = FinishReason(type="abort", message=message)
                    if msg.id in self.core:
                        self.finish(msg.id, reason)
                    else:
                        self._ended(msg.id, reason, 0, 0)
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
        s = dict(self.core.stats())
        # NOTE: like SGLang, the reclaimable (evictable) prefix cache does not count as used.
        free = int(s["available"]) + int(s["evictable"])
        used = self.pool_size - free
        s["token_usage"] = used / self.pool_size if self.pool_size else 0.0
        s["used_tokens"] = used
        hits, prompts = s["hit_cached_tokens"], s["hit_prompt_tokens"]
        s["cache_hit_rate"] = hits / prompts if prompts else 0.0
        return s

    def flush_cache(self, req_id: int) -> FlushCacheResp:
        """Empties the prefix cache when no request is in flight; refuses otherwise."""
        n = self.core.num_requests
        if n or self.in_flight:
            return FlushCacheResp(
                req_id=req_id,
                success=False,
                message=f"cannot flush the cache while {n} requests are in flight",
            )
        try:
            self.core.flush_cache()
        except (RuntimeError, ValueError) as e:
            return FlushCacheResp(req_id=req_id, success=False, message=str(e))
        self.stuck_steps = 0
        return FlushCacheResp(req_id=req_id, success=True, message="the prefix cache is empty")

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, msg: GenerateReq) -> None:
        decision = self.admission.admit(msg)
        if isinstance(decision, Rejected):
            self._ended(msg.id, decision.reason, 0, 0)
            return
        self.core.add_request(**decision.core_args)
        if decision.host is not None:
            self.host.add(msg.id, decision.host)
        self.outbox.inits.append(decision.init)

    def abort(self, msg: AbortReq) -> None:
        targets = self.core.request_ids() if msg.abort_all else [msg.id]
        for rid in targets:
            if rid in self.core:
                self.finish(rid, FinishReason(type="abort", message=msg.message))

    def finish(self, rid: int, reason: FinishReason) -> None:
        """Ends a request in any state: its KV goes to the prefix cache, its row is freed."""
        completion, cached = self.core.finish(rid)
        self._ended(rid, reason, completion, cached)

    def _ended(self, rid: int, reason: FinishReason, completion: int, cached: int) -> None:
        """A request ended (in the core already): its last logprobs and its finish go out."""
        lp = self.host.pending_logprobs(rid)
        if lp is not None:
            self.outbox.logprobs.append((rid, lp))
        self.host.remove(rid)
        self.outbox.add_finished(rid, reason, completion, cached)

    def handle_idle_with_requests(self) -> None:
        stats = self.core.stats()
        if stats["num_running"] > 0 or stats["num_waiting"] == 0 or stats["admission_paused"]:
            return
        self.stuck_steps += 1
        if self.stuck_steps >= STUCK_STEPS:
            # NOTE: a waiting request that can never be admitted would otherwise spin forever.
            rid = min(self.core.request_ids())
            logger.error("request %d cannot be scheduled; aborting it", rid)
            self.finish(rid, FinishReason(type="abort", message="not enough KV cache memory"))
            self.stuck_steps = 0

    def _fault(self, step: StepInput) -> str | None:
        if step.all_flags & FAULT_FLAG:
            return f"injected fault ({FAULT_TOKEN_ENV}={self.admission.fault_token})"
        return None


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
    from srt.model_executor.model_runner import ModelRunner

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

    device = resolve_device(server_args.device)
    if device.startswith("cuda"):
        import torch

        per_node = server_args.world_size // server_args.nnodes
        gpu = server_args.base_gpu_id + dp_rank * per_node + rank % per_node
        torch.cuda.set_device(gpu)
        device = f"cuda:{gpu}"
        server_args = server_args.replace(device=device)
    if server_args.world_size > 1:
        import torch

        from srt.distributed.parallel_state import init_parallel

        init_parallel(
            server_args.tp_size,
            server_args.pp_size,
            rank,
            port_args.dist_init_addrs[dp_rank],
            torch.device(device),
        )
    return server_args
