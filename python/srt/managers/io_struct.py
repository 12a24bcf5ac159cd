"""Every message that crosses a process boundary, as msgspec Structs (msgpack over ZMQ ipc).

Flow: main --TokenizedGenerateReqInput/AbortReq--> scheduler --BatchTokenIDOut--> detokenizer
--BatchStrOut--> main. Children report startup through `ProcessReady` on a pipe.

Control: main --GetStatsReq/FlushCacheReq--> scheduler (the request socket) and the scheduler
answers StatsResp/FlushCacheResp straight to main on a second PUSH socket connected to
`tokenizer_ipc` (a PULL socket takes many pushers), so answers do not pass the detokenizer.
`req_id` pairs an answer with its request.
Encode with `encode(msg)` and decode with `decode(buf)`; the union tag names the type.
"""

from __future__ import annotations

import msgspec

from srt.sampling_params import SamplingParams


class FinishReason(msgspec.Struct, kw_only=True, omit_defaults=True):
    """SGLang's meta_info.finish_reason: type is "stop", "length" or "abort".

    `matched` is the stop token id (int) or stop string (str) that ended a "stop"; `length` the
    limit that ended a "length"; `message` explains an "abort".
    """

    type: str
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None
    # For an "abort": the HTTP status it maps to when the client is at fault (e.g. 400 for a
    # request that can never fit in the KV cache); None means a server-side abort.
    status_code: int | None = None

    def to_json(self) -> dict:
        return msgspec.to_builtins(self)


class TokenizedGenerateReqInput(msgspec.Struct, tag=True, kw_only=True):
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    stream: bool = False
    # Prefix-cache namespace: requests with different keys never share cached prefixes.
    cache_salt: str = ""
    # Wall-clock time (time.time()) when the main process received the request.
    created_time: float = 0.0
    # Logprobs (see srt.layers.logprobs): of the output tokens when return_logprob, plus the
    # prompt tokens from position logprob_start_len on when that is >= 0; top_logprobs_num
    # alternatives per position.
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1


class AbortReq(msgspec.Struct, tag=True, kw_only=True):
    """Abort one request (rid) or every request (abort_all)."""

    rid: str = ""
    abort_all: bool = False
    message: str = "aborted"


class DetokInit(msgspec.Struct, kw_only=True):
    """Sent with a request's first output: what the detokenizer needs to start it."""

    prompt_tail: list[int]
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stop: list[str] = msgspec.field(default_factory=list)
    no_stop_trim: bool = False


class LogprobDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Logprobs that are new since a request's last output (parallel lists per position).

    input_*: prompt positions (the logprob of prompt token j given tokens < j; None for j = 0).
    output_*: one entry per new output token. top_*: the top-k (logprob, token id) pairs.
    """

    input_logprobs: list[float | None] = msgspec.field(default_factory=list)
    input_ids: list[int] = msgspec.field(default_factory=list)
    input_top_logprobs: list[list[float]] = msgspec.field(default_factory=list)
    input_top_ids: list[list[int]] = msgspec.field(default_factory=list)
    output_logprobs: list[float] = msgspec.field(default_factory=list)
    output_ids: list[int] = msgspec.field(default_factory=list)
    output_top_logprobs: list[list[float]] = msgspec.field(default_factory=list)
    output_top_ids: list[list[int]] = msgspec.field(default_factory=list)


class BatchTokenIDOut(msgspec.Struct, tag=True, kw_only=True):
    """Scheduler -> detokenizer: new token ids of many requests (parallel lists)."""

    rids: list[str]
    new_ids: list[list[int]]
    finished: list[FinishReason | None]
    inits: list[DetokInit | None]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    # Parallel to rids when some request in the batch asked for logprobs, else None.
    logprobs: list[LogprobDelta | None] | None = None


class BatchStrOut(msgspec.Struct, tag=True, kw_only=True):
    """Detokenizer -> main: text deltas of many requests (parallel lists)."""

    rids: list[str]
    texts: list[str]
    new_ids: list[list[int]]
    finished: list[FinishReason | None]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    # Passed through from BatchTokenIDOut; token texts are decoded in the main process.
    logprobs: list[LogprobDelta | None] | None = None


class ProcessReady(msgspec.Struct, tag=True, kw_only=True):
    """Child -> main over a pipe at startup: ok, or the error that stopped it."""

    name: str
    ok: bool
    error: str = ""
    # scheduler: max_total_num_tokens, context_len, vocab_size, max_running_requests, ...
    info: dict = msgspec.field(default_factory=dict)


class GetStatsReq(msgspec.Struct, tag=True, kw_only=True):
    """Main -> scheduler: ask for the live scheduler numbers (answered with StatsResp)."""

    req_id: int


class StatsResp(msgspec.Struct, tag=True, kw_only=True):
    """Scheduler -> main: requests running/queued, KV usage, cache sizes and hit counters."""

    req_id: int
    stats: dict = msgspec.field(default_factory=dict)


class FlushCacheReq(msgspec.Struct, tag=True, kw_only=True):
    """Main -> scheduler: empty the prefix cache (refused while requests run)."""

    req_id: int


class FlushCacheResp(msgspec.Struct, tag=True, kw_only=True):
    req_id: int
    success: bool
    message: str = ""


Message = (
    TokenizedGenerateReqInput
    | AbortReq
    | BatchTokenIDOut
    | BatchStrOut
    | ProcessReady
    | GetStatsReq
    | StatsResp
    | FlushCacheReq
    | FlushCacheResp
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(buf: bytes) -> Message:
    return _decoder.decode(buf)
