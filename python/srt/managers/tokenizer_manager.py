"""TokenizerManager: the main process's side of every request.

In: a `GenerateReqInput` (text or token ids + sampling params) from the HTTP server or the
Engine. It applies the chat template (for chat requests), tokenizes and validates against the
model's limits (a `TokenizedGenerateReqInput`, which keeps the client's string rid). Sending a
request gives it a fresh integer id (counted from 1, never reused): the scheduler gets a
`GenerateReq` with that id (PUSH `scheduler_ipc`), every process past main knows the request
only by it, and main maps rid -> id -> `ReqState` at its edge. With `--dp-size N` there is one
PUSH socket per replica (`scheduler_ipcs`) and a `ReplicaRouter` (srt.managers.router) picks
each request's replica by its token ids; the replica is kept in the request's state until it
ends, so its abort goes to the same replica, and the copies of an n > 1 request follow the
first. A background asyncio task receives `BatchStrOut` from the detokenizer (PULL
`tokenizer_ipc`): one token per request per step (int64 arrays) with the text it made final,
then each finished request's flushed tail and final counts; it wakes the waiters.
Out: SGLang-shaped dicts
`{text, output_ids, meta_info{id, prompt_tokens, completion_tokens, cached_tokens, finish_reason,
e2e_latency}}` (text and output_ids cumulative; with return_logprob also SGLang's
input/output_token_logprobs and input/output_top_logprobs, raw-model logprobs as
[logprob, token_id, text]) plus `delta` (the new text, ids and output logprobs since the last
yield) for the OpenAI layer.

Control requests (`control`: stats, cache flush) go to every replica's scheduler on the same
sockets and their answers come back on `tokenizer_ipc` straight from the schedulers, paired by
`req_id`.
With `metrics` set (srt.metrics.Metrics), every output updates the latency histograms and
token counters.

Every request ends: with its finishing output (the scheduler decides every finish, stop
strings included), with an abort when the client goes away (an `AbortReq` is sent and the state
dropped at once), with finish_reason abort and the message when the detokenizer reports it in
`errors` (its text cannot be rendered; main sends the scheduler an `AbortReq` for it), or with
an error when the runtime fails.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import msgspec
import numpy as np
import zmq
import zmq.asyncio

from srt.managers.hf_tokenizer import load_tokenizer, tokenizer_path_of
from srt.managers.io_struct import (
    AbortReq,
    BatchStrOut,
    FinishReason,
    FlushCacheReq,
    FlushCacheResp,
    GenerateReq,
    GetStatsReq,
    LogprobDelta,
    Message,
    StatsResp,
    TokenizedGenerateReqInput,
    decode,
    encode,
)
from srt.managers.router import ReplicaRouter, make_router, merge_stats
from srt.sampling_params import SamplingParams
from srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)

# Texts longer than this are tokenized on a worker thread, so they don't stall the event loop.
_INLINE_TOKENIZE_CHARS = 2048
# How often a waiter checks whether its HTTP client is still there.
_DISCONNECT_POLL_S = 2.0
# Most alternatives per position for top_logprobs_num (OpenAI allows 20 for chat).
MAX_TOP_LOGPROBS = 20
# Most remembered "copy of an n > 1 request -> its first" routing hints; older ones are dropped
# (a hint only keeps copies on one replica, so losing one costs a cache miss, not correctness).
_MAX_FANOUT_HINTS = 4096


class RuntimeDeadError(RuntimeError):
    """The scheduler or detokenizer died; no request can complete."""


@dataclasses.dataclass
class GenerateReqInput:
    """One prompt to generate from: exactly one of `text` and `input_ids`."""

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: SamplingParams | dict | None = None
    stream: bool = False
    rid: str | None = None
    cache_salt: str = ""
    # Logprobs (SGLang's names; see srt.layers.logprobs for the distribution). With
    # return_logprob, meta_info gets output_token_logprobs (and output_top_logprobs when
    # top_logprobs_num > 0); logprob_start_len >= 0 adds the prompt's from that position.
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    # False: the logprob entries' text is None (SGLang's return_text_in_logprobs=false).
    return_text_in_logprobs: bool = True


@dataclasses.dataclass
class ReqState:
    """What has arrived for one request and not yet been handed to its waiter."""

    rid: str
    # The replica that runs it (0 without data parallelism).
    replica: int
    prompt_tokens: int
    created: float
    stream: bool
    text_parts: list[str] = dataclasses.field(default_factory=list)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    pending_text: list[str] = dataclasses.field(default_factory=list)
    pending_ids: list[int] = dataclasses.field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    finished: bool = False
    error: str | None = None
    # With return_logprob: every logprob so far (LogprobDelta fields, accumulated) and how
    # many output entries the last yield handed out.
    logprobs: LogprobDelta | None = None
    lp_sent: int = 0
    # The meta_info logprob lists built so far (token texts are decoded once per entry).
    lp_meta: dict[str, list] = dataclasses.field(default_factory=dict)
    next_disconnect_check: float = 0.0
    # time.time() of the first and the latest output token (metrics: TTFT, inter-token latency)
    first_token_at: float | None = None
    last_token_at: float | None = None
    event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class ClientDisconnected(Exception):
    """The HTTP client went away while waiting; its request has been aborted."""


class Disconnectable(Protocol):
    """What `generate_request` needs of an HTTP request (Starlette's Request fits)."""

    async def is_disconnected(self) -> bool: ...


class TokenizerManager:
    """Tokenizes and validates requests, forwards them, and streams their outputs back."""

    def __init__(
        self,
        server_args: ServerArgs,
        port_args: PortArgs,
        scheduler_info: dict[str, Any],
        tokenizer: Any | None = None,
    ) -> None:
        """`tokenizer`: the HF tokenizer, already loaded (the HTTP server loads it while the
        children start, without torch: `hf_tokenizer.load_tokenizer`); None: load it here."""
        self.server_args = server_args
        if tokenizer is None:
            tokenizer = load_tokenizer(tokenizer_path_of(server_args), torch_free=False)
        self.tokenizer = tokenizer
        self.model_path = server_args.model_path or ""
        self.served_model_name = server_args.served_model_name or self.model_path
        self.context_len = int(scheduler_info["context_len"])
        self.vocab_size = int(scheduler_info.get("vocab_size") or len(self.tokenizer))
        self.max_total_num_tokens = int(
            scheduler_info.get("max_total_num_tokens") or self.context_len
        )
        self.scheduler_info = dict(scheduler_info)
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, server_args.tokenizer_worker_threads),
            thread_name_prefix="srt-tokenize",
        )

        # NOTE: sends use a plain (blocking) socket: a PUSH send only blocks when the scheduler
        # stops reading, and then the watchdog ends the process anyway.
        self._sync_ctx = zmq.Context(1)
        # NOTE: unsent messages to a dead peer must never block exit or garbage collection.
        self._sync_ctx.setsockopt(zmq.LINGER, 0)
        self._send_socks: list[zmq.Socket] = []
        for ipc in port_args.scheduler_ipcs:
            sock = self._sync_ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(ipc)
            self._send_socks.append(sock)
        self.dp_size = len(self._send_socks)
        self._fanout_first: OrderedDict[str, str] = OrderedDict()
        self.router: ReplicaRouter | None = None
        if self.dp_size > 1:
            # NOTE: each replica's index holds about what its KV pool can cache.
            self.router = make_router(
                server_args.load_balance_method, self.dp_size, self.max_total_num_tokens
            )
        self._async_ctx = zmq.asyncio.Context(1)
        self._async_ctx.setsockopt(zmq.LINGER, 0)
        self._recv_sock = self._async_ctx.socket(zmq.PULL)
        self._recv_sock.setsockopt(zmq.LINGER, 0)
        self._recv_sock.bind(port_args.tokenizer_ipc)

        # Requests in flight: the client's rid -> the id every other process knows it by, and
        # id -> its state. Ids count from 1 and are never reused.
        self.rid_to_id: dict[str, int] = {}
        self.id_to_state: dict[int, ReqState] = {}
        self._ids = itertools.count(1)
        self._control_waiters: dict[int, asyncio.Future] = {}
        self._next_control_id = 0
        self.metrics: Any = None  # srt.metrics.Metrics when metrics are enabled
        # Each replica's rank-0 scheduler process id (set by the server; /server_info).
        self.scheduler_pids: list[int] = []
        self._recv_task: asyncio.Task | None = None
        self.dead_reason: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the receive loop on the running event loop (idempotent)."""
        if self._recv_task is None or self._recv_task.done():
            self._recv_task = asyncio.get_running_loop().create_task(self._recv_loop())

    def fail_all(self, reason: str) -> None:
        """Marks the runtime dead: every waiter ends with `reason`, new requests fail.

        Must run on the event loop's thread (use loop.call_soon_threadsafe otherwise)."""
        self.dead_reason = reason
        for state in list(self.id_to_state.values()):
            self._forget(state)
            state.error = reason
            state.event.set()
        for fut in self._control_waiters.values():
            if not fut.done():
                fut.set_exception(RuntimeDeadError(reason))

    def close(self) -> None:
        if self._recv_task is not None:
            self._recv_task.cancel()
        for sock in self._send_socks:
            sock.close(linger=0)
        self._recv_sock.close(linger=0)
        self._sync_ctx.term()
        self._async_ctx.term()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _recv_loop(self) -> None:
        while True:
            buf = await self._recv_sock.recv()
            try:
                msg = decode(buf)
                if isinstance(msg, BatchStrOut):
                    self._handle_batch(msg)
                elif isinstance(msg, (StatsResp, FlushCacheResp)):
                    fut = self._control_waiters.pop(msg.req_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                else:
                    logger.error("unexpected message %s; ignored", type(msg).__name__)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                logger.error("bad message from the detokenizer: %s", e)

    def _handle_batch(self, batch: BatchStrOut) -> None:
        """Applies one step's outputs: tokens and texts, cached counts, logprobs, then the
        requests that failed and the ones that finished. Ids with no state here ended already
        (client abort, error); what still comes for them is moot."""
        states = self.id_to_state
        ids = np.frombuffer(batch.ids, dtype=np.int64).tolist()
        tokens = np.frombuffer(batch.tokens, dtype=np.int64).tolist()
        for req_id, token, text in zip(ids, tokens, batch.texts, strict=True):
            state = states.get(req_id)
            if state is None:
                continue
            state.output_ids.append(token)
            state.pending_ids.append(token)
            if text:
                state.text_parts.append(text)
                state.pending_text.append(text)
            state.completion_tokens += 1
            if self.metrics is not None:
                self.metrics.on_output(state, 1, None)
            # A non-stream waiter only needs the end; waking it per token would be wasted work.
            if state.stream:
                state.event.set()
        for req_id, cached_tokens in batch.cached:
            state = states.get(req_id)
            if state is not None:
                state.cached_tokens = cached_tokens
        for req_id, delta in batch.logprobs:
            state = states.get(req_id)
            if state is not None:
                _extend_logprobs(state, delta)
        for req_id, message in batch.errors:
            state = states.get(req_id)
            if state is None:
                continue
            self._finish(state, FinishReason(type="abort", message=message))
            # NOTE: the only abort main sends on its own: the scheduler would otherwise keep
            # generating tokens nobody can read (it still ends the request with a `Finished`).
            self._send(state.replica, AbortReq(id=req_id, message=message))
        for fin, tail in zip(batch.finished, batch.tails, strict=True):
            state = states.get(fin.id)
            if state is None:
                continue
            if tail:
                state.text_parts.append(tail)
                state.pending_text.append(tail)
            state.completion_tokens = fin.completion_tokens
            state.cached_tokens = fin.cached_tokens
            self._finish(state, fin.reason)

    def _finish(self, state: ReqState, reason: FinishReason) -> None:
        """Ends a request with its final output: forgotten here, its waiter woken."""
        self._forget(state)
        state.finish_reason = reason
        state.finished = True
        if self.metrics is not None:
            self.metrics.on_output(state, 0, reason)
        state.event.set()

    # ---- tokenization and validation ------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """Renders chat messages (role/content dicts) into the prompt text: ready to generate
        the assistant's answer (add_generation_prompt), or to continue the last message
        (continue_final_message). `template_kwargs` are the template's own variables."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **template_kwargs,
            )
        except Exception as e:  # jinja2 errors, raise_exception() in templates
            raise ValueError(f"chat template failed: {e}") from e

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self._encode(text, add_special_tokens)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode, text, add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    async def tokenize_request(
        self, obj: GenerateReqInput, add_special_tokens: bool = True
    ) -> TokenizedGenerateReqInput:
        """Validates `obj` (ValueError with a client-facing message) and tokenizes it."""
        if (obj.text is None) == (obj.input_ids is None):
            raise ValueError("give exactly one of `text` and `input_ids`")
        if obj.text is not None:
            if not isinstance(obj.text, str):
                raise ValueError("`text` must be a string")
            if not obj.text:
                raise ValueError("the prompt is empty")
            input_ids = await self.tokenize(obj.text, add_special_tokens)
        else:
            input_ids = list(obj.input_ids or [])
            for t in input_ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                    raise ValueError(
                        f"input_ids: {t!r} is not a token id in [0, {self.vocab_size})"
                    )
        if not input_ids:
            raise ValueError("the prompt is empty (no tokens)")

        sp = obj.sampling_params
        if isinstance(sp, SamplingParams):
            sp = copy.copy(sp)
            sp.verify(self.vocab_size)
        else:
            sp = SamplingParams.from_dict(sp)
            sp.verify(self.vocab_size)
        sp.n = 1  # NOTE: n > 1 is fanned out into separate requests by the callers
        if sp.grammar is not None:
            from srt.constrained.build import check_grammar

            check_grammar(sp)  # an invalid grammar is the client's 400, not the scheduler's

        n_prompt = len(input_ids)
        if n_prompt >= self.context_len:
            raise ValueError(
                f"the prompt is {n_prompt} tokens, but this model's context length is "
                f"{self.context_len} tokens (at least one must be left for the output)"
            )
        if sp.max_new_tokens is None:
            sp.max_new_tokens = self.context_len - n_prompt
        elif n_prompt + sp.max_new_tokens > self.context_len:
            raise ValueError(
                f"this model's context length is {self.context_len} tokens, but "
                f"{n_prompt + sp.max_new_tokens} were requested ({n_prompt} in the prompt, "
                f"{sp.max_new_tokens} for the output); reduce the prompt or max_new_tokens"
            )
        if n_prompt >= self.max_total_num_tokens:
            raise ValueError(
                f"the prompt is {n_prompt} tokens, more than the KV cache holds "
                f"({self.max_total_num_tokens}; see --max-total-tokens)"
            )
        # NOTE: a request longer than the whole KV pool could never finish; like SGLang we cap
        # its output at what the pool can hold.
        sp.max_new_tokens = min(sp.max_new_tokens, self.max_total_num_tokens - n_prompt)
        sp.min_new_tokens = min(sp.min_new_tokens, sp.max_new_tokens)

        if obj.top_logprobs_num < 0 or obj.top_logprobs_num > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}]")
        if obj.logprob_start_len < -1:
            raise ValueError("logprob_start_len must be >= 0, or -1 for output logprobs only")
        if obj.logprob_start_len >= n_prompt:
            raise ValueError(
                f"logprob_start_len ({obj.logprob_start_len}) must be less than the prompt's "
                f"{n_prompt} tokens"
            )
        rid = obj.rid or uuid.uuid4().hex
        if rid in self.rid_to_id:
            raise ValueError(f"request id {rid!r} is already in use")
        return TokenizedGenerateReqInput(
            rid=rid,
            input_ids=input_ids,
            sampling_params=sp,
            stream=obj.stream,
            cache_salt=obj.cache_salt,
            created_time=time.time(),
            return_logprob=obj.return_logprob,
            top_logprobs_num=obj.top_logprobs_num if obj.return_logprob else 0,
            logprob_start_len=obj.logprob_start_len if obj.return_logprob else -1,
            return_text_in_logprobs=obj.return_text_in_logprobs,
        )

    # ---- generation ------------------------------------------------------------------------

    async def generate_request(
        self,
        obj: GenerateReqInput,
        request: Disconnectable | None = None,
        add_special_tokens: bool = True,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yields output dicts: one per arrival when `obj.stream`, else only the final one.

        Raises ValueError for an invalid request (before anything is sent) and RuntimeDeadError
        when the runtime died. Closing or cancelling the iterator aborts the request."""
        if self.dead_reason is not None:
            raise RuntimeDeadError(self.dead_reason)
        self.start()
        tokenized = await self.tokenize_request(obj, add_special_tokens)
        async for out in self.generate_tokenized(tokenized, request):
            yield out

    async def generate_tokenized(
        self,
        req: TokenizedGenerateReqInput,
        request: Disconnectable | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        if self.dead_reason is not None:
            raise RuntimeDeadError(self.dead_reason)
        self.start()
        rid = req.rid
        # NOTE: tokenize_request checked the rid, but another request may have taken it since;
        # two requests under one rid would corrupt the rid -> id map.
        if rid in self.rid_to_id:
            raise ValueError(f"request id {rid!r} is already in use")
        state = ReqState(
            rid=rid,
            replica=self._route(req),
            prompt_tokens=len(req.input_ids),
            created=req.created_time,
            stream=req.stream,
        )
        if req.return_logprob:
            state.logprobs = LogprobDelta()
        req_id = next(self._ids)
        self.rid_to_id[rid] = req_id
        self.id_to_state[req_id] = state
        self._send(
            state.replica,
            GenerateReq(
                id=req_id,
                input_ids=req.input_ids,
                sampling_params=req.sampling_params,
                cache_salt=req.cache_salt,
                created_time=req.created_time,
                return_logprob=req.return_logprob,
                top_logprobs_num=req.top_logprobs_num,
                logprob_start_len=req.logprob_start_len,
            ),
        )
        try:
            while True:
                await self._wait(state, request)
                if state.error is not None:
                    raise RuntimeDeadError(state.error)
                if state.finished or req.stream:
                    out = self._make_output(rid, state)
                    if state.logprobs is not None:
                        self._add_logprobs(
                            out, state, req.top_logprobs_num > 0, req.return_text_in_logprobs
                        )
                    yield out
                if state.finished:
                    return
        finally:
            if not state.finished:
                # NOTE: by id: once this request was dropped here, its rid may name a newer one.
                self._abort(req_id, "aborted by the client")

    async def _wait(self, state: ReqState, request: Disconnectable | None) -> None:
        if request is None:
            await state.event.wait()
        else:
            # NOTE: outputs may wake us far more often than the poll period, so the check is
            # paced by the clock, not by timeouts.
            while True:
                left = state.next_disconnect_check - time.monotonic()
                if left > 0:
                    try:
                        await asyncio.wait_for(state.event.wait(), timeout=left)
                        break
                    except asyncio.TimeoutError:
                        pass
                state.next_disconnect_check = time.monotonic() + _DISCONNECT_POLL_S
                if await request.is_disconnected():
                    raise ClientDisconnected()
        state.event.clear()

    def abort_request(self, rid: str, message: str = "aborted by the client") -> None:
        """Forgets `rid` here and tells the scheduler to stop it (no-op if it is done)."""
        req_id = self.rid_to_id.get(rid)
        if req_id is not None:
            self._abort(req_id, message)

    def _abort(self, req_id: int, message: str) -> None:
        """`abort_request` by id (no-op if the request ended)."""
        state = self.id_to_state.get(req_id)
        if state is None:
            return
        self._forget(state)
        if self.metrics is not None:
            self.metrics.on_client_abort()
        if self.dead_reason is None:
            self._send(state.replica, AbortReq(id=req_id, message=message))

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (SGLang's per-token decode)."""
        return self.tokenizer.batch_decode([[t] for t in ids])

    def _add_logprobs(
        self, out: dict[str, Any], state: ReqState, top: bool, with_text: bool = True
    ) -> None:
        """Adds SGLang's logprob lists ([logprob, token_id, text] entries; text None unless
        `with_text`) to meta_info (cumulative, like text) and the new output entries to
        `delta`."""
        lp = state.logprobs
        assert lp is not None
        meta = out["meta_info"]

        def triples(vals: list, ids: list[int]) -> list[list]:
            texts = self.token_texts(ids) if with_text else [None] * len(ids)
            return [[v, t, s] for v, t, s in zip(vals, ids, texts, strict=True)]

        def top_triples(vals: list[list[float]], ids: list[list[int]]) -> list[list[list]]:
            return [triples(v, i) for v, i in zip(vals, ids, strict=True)]

        def grow(name: str, vals: list, ids: list, make: Any) -> None:
            have = state.lp_meta.setdefault(name, [])
            have.extend(make(vals[len(have) :], ids[len(have) :]))
            meta[name] = list(have)

        grow("input_token_logprobs", lp.input_logprobs, lp.input_ids, triples)
        grow("output_token_logprobs", lp.output_logprobs, lp.output_ids, triples)
        if top:
            grow("input_top_logprobs", lp.input_top_logprobs, lp.input_top_ids, top_triples)
            grow("output_top_logprobs", lp.output_top_logprobs, lp.output_top_ids, top_triples)
        out["delta"]["output_token_logprobs"] = meta["output_token_logprobs"][state.lp_sent :]
        if top:
            out["delta"]["output_top_logprobs"] = meta["output_top_logprobs"][state.lp_sent :]
        state.lp_sent = len(lp.output_ids)

    def abort_running(self, rid: str | None, message: str) -> bool:
        """Ends `rid` (or every request when rid is None) in the scheduler; its waiter still
        gets the final output, with finish_reason abort. False if `rid` is not running."""
        if self.dead_reason is not None:
            raise RuntimeDeadError(self.dead_reason)
        if rid is not None:
            req_id = self.rid_to_id.get(rid)
            if req_id is None:
                return False
            replica = self.id_to_state[req_id].replica
            self._send(replica, AbortReq(id=req_id, message=message))
            return True
        for replica in range(self.dp_size):
            self._send(replica, AbortReq(abort_all=True, message=message))
        return True

    async def control(self, make: Callable[[int], Message], timeout: float = 10.0) -> list[Any]:
        """Sends the control request `make(req_id)` to every replica's scheduler and returns
        their answers, in replica order.

        Raises RuntimeDeadError if the runtime is dead, TimeoutError if an answer is missing."""
        if self.dead_reason is not None:
            raise RuntimeDeadError(self.dead_reason)
        self.start()
        loop = asyncio.get_running_loop()
        ids: list[int] = []
        futs: list[asyncio.Future] = []
        try:
            for replica in range(self.dp_size):
                self._next_control_id += 1
                ids.append(self._next_control_id)
                futs.append(loop.create_future())
                self._control_waiters[ids[-1]] = futs[-1]
                self._send(replica, make(ids[-1]))
            return list(await asyncio.wait_for(asyncio.gather(*futs), timeout))
        finally:
            for req_id in ids:
                self._control_waiters.pop(req_id, None)

    async def scheduler_stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """The schedulers' live numbers: one replica's, or with data parallelism the sums over
        replicas (ratios recomputed) plus `replicas` (each one's) and `router`."""
        answers = await self.control(lambda i: GetStatsReq(req_id=i), timeout)
        stats = [a.stats for a in answers if isinstance(a, StatsResp)]
        if self.router is None:
            return stats[0]
        return {**merge_stats(stats), "replicas": stats, "router": self.router.describe()}

    async def flush_cache(self, timeout: float = 10.0) -> FlushCacheResp:
        """Empties every replica's prefix cache; fails (with each refusal's reason) if any
        replica refused, e.g. because it has requests in flight."""
        answers = await self.control(lambda i: FlushCacheReq(req_id=i), timeout)
        refused = []
        for replica, a in enumerate(answers):
            assert isinstance(a, FlushCacheResp)
            if a.success:
                if self.router is not None:
                    self.router.forget(replica)
            else:
                refused.append(
                    a.message if self.dp_size == 1 else f"replica {replica}: {a.message}"
                )
        if refused:
            return FlushCacheResp(req_id=0, success=False, message="; ".join(refused))
        return FlushCacheResp(req_id=0, success=True, message=answers[0].message)

    def fan_out(self, first: TokenizedGenerateReqInput, n: int) -> list[TokenizedGenerateReqInput]:
        """`fan_out(first, n)`, with the copies pinned to the replica `first` goes to (they
        share its prompt, so that replica's prefix cache serves them).

        NOTE: callers start `first` before its copies (run_all / merge_streams start their
        tasks in order, and a request is routed before its first await)."""
        reqs = fan_out(first, n)
        if self.router is not None:
            for r in reqs[1:]:
                self._fanout_first[r.rid] = first.rid
            while len(self._fanout_first) > _MAX_FANOUT_HINTS:
                self._fanout_first.popitem(last=False)
        return reqs

    # ---- replicas --------------------------------------------------------------------------

    def _send(self, replica: int, msg: Message) -> None:
        self._send_socks[replica].send(encode(msg))

    def _route(self, req: TokenizedGenerateReqInput) -> int:
        """The replica for `req`, counted as in flight there until `_end`."""
        if self.router is None:
            return 0
        first = self._fanout_first.pop(req.rid, None)
        first_id = self.rid_to_id.get(first) if first is not None else None
        if first_id is not None:
            replica = self.id_to_state[first_id].replica
            self.router.assign(replica)
            return replica
        return self.router.choose(req.input_ids, req.cache_salt)

    def _forget(self, state: ReqState) -> None:
        """Drops a request that ended from the maps and releases its load on its replica."""
        del self.id_to_state[self.rid_to_id.pop(state.rid)]
        if self.router is not None:
            self.router.release(state.replica)

    def abort_all(self, message: str = "aborted") -> None:
        """Tells the scheduler to end every request it holds with finish_reason abort
        `message`; their waiters get that finishing output as usual."""
        if self.dead_reason is None:
            self.abort_running(None, message)

    @staticmethod
    def _make_output(rid: str, state: ReqState) -> dict[str, Any]:
        delta_text = "".join(state.pending_text)
        delta_ids = state.pending_ids
        state.pending_text = []
        state.pending_ids = []
        fr = state.finish_reason
        return {
            "text": "".join(state.text_parts),
            "output_ids": list(state.output_ids),
            "meta_info": {
                "id": rid,
                "prompt_tokens": state.prompt_tokens,
                "completion_tokens": state.completion_tokens,
                "cached_tokens": state.cached_tokens,
                "finish_reason": fr.to_json() if fr is not None else None,
                "e2e_latency": time.time() - state.created,
            },
            "delta": {"text": delta_text, "output_ids": delta_ids},
        }


def requested_n(sampling_params: SamplingParams | dict | None) -> int:
    """The `n` a request asks for (validated later by tokenize_request)."""
    if isinstance(sampling_params, SamplingParams):
        return sampling_params.n
    n = (sampling_params or {}).get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


def fan_out(first: TokenizedGenerateReqInput, n: int) -> list[TokenizedGenerateReqInput]:
    """`first` and n - 1 copies with fresh rids: n independently sampled choices of one prompt.

    With a seed, choice j uses seed + j (mod 2**63): reproducible, yet the choices differ, and
    choice 0 is what the same request with n = 1 gives. The copies share the prompt, so the
    scheduler's prefix cache serves all but the first."""
    reqs = [first]
    sp = first.sampling_params
    for j in range(1, n):
        seed = None if sp.seed is None else (sp.seed + j) % 2**63
        reqs.append(
            msgspec.structs.replace(
                first,
                rid=uuid.uuid4().hex,
                sampling_params=msgspec.structs.replace(sp, seed=seed),
            )
        )
    return reqs


def _extend_logprobs(state: ReqState, d: LogprobDelta) -> None:
    lp = state.logprobs
    if lp is None:
        return
    for f in LogprobDelta.__struct_fields__:
        getattr(lp, f).extend(getattr(d, f))


def public_output(out: dict[str, Any]) -> dict[str, Any]:
    """The SGLang-shaped dict without the `delta` used internally by the OpenAI layer."""
    return {k: v for k, v in out.items() if k != "delta"}


async def merge_streams(
    streams: list[AsyncIterator[dict[str, Any]]],
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Interleaves several output streams as (index, output) in arrival order.

    Closing the merged iterator cancels (and so aborts) every stream still running."""
    queue: asyncio.Queue[tuple[int, dict[str, Any] | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for out in it:
                await queue.put((i, out))
            await queue.put((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # surfaced to the consumer below
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_all(coros: list[Awaitable[Any]]) -> list[Any]:
    """Gathers `coros`; if one fails, cancels the others (aborting their requests) and raises."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def final_output(gen: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The last output of a (non-stream) generation."""
    last: dict[str, Any] | None = None
    async for out in gen:
        last = out
    if last is None:  # generate_tokenized always yields its final output
        raise RuntimeError("generation ended without output")
    return last
