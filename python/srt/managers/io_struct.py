"""Every message that crosses a process boundary, as msgspec Structs (msgpack over ZMQ ipc).

Flow: main --GenerateReq/AbortReq--> scheduler --BatchTokenIDOut--> detokenizer --BatchStrOut-->
main. Children report startup through `ProcessReady` on a pipe. Past main, a request is known
only by its integer id (assigned by main's TokenizerManager); per-step token arrays travel as
little-endian int64 bytes, so no process builds per-request Python lists for them.

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


class TokenizedGenerateReqInput(msgspec.Struct, kw_only=True):
    """A validated, tokenized request inside the main process (never sent as is: the
    scheduler gets a `GenerateReq`, which carries the integer id instead of `rid`)."""

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
    # Main only: whether the logprob entries carry the token text.
    return_text_in_logprobs: bool = True


class GenerateReq(msgspec.Struct, tag=True, kw_only=True):
    """Main -> scheduler: one request to generate. `id` is the request's integer id, assigned
    by the main process and used by every process after it (the client's string rid stays in
    main); ids are never reused while the server runs."""

    id: int
    input_ids: list[int]
    sampling_params: SamplingParams
    cache_salt: str = ""
    created_time: float = 0.0
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1


class AbortReq(msgspec.Struct, tag=True, kw_only=True):
    """Abort one request (`id`) or every request (`abort_all`)."""

    id: int = -1
    abort_all: bool = False
    message: str = "aborted"


class DetokInit(msgspec.Struct, kw_only=True):
    """Scheduler -> detokenizer, once per request, in the first message after it arrived and
    before any of its tokens: what the detokenizer needs to render it. The scheduler decides
    stop strings itself with the same settings; the detokenizer only trims them."""

    id: int
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


class Finished(msgspec.Struct, array_like=True):
    """A request that ended: why, and its final token counts."""

    id: int
    reason: FinishReason
    completion_tokens: int
    cached_tokens: int


class BatchTokenIDOut(msgspec.Struct, tag=True, kw_only=True):
    """Scheduler -> detokenizer, once per step that has anything to say.

    `ids` / `tokens`: the requests that got a token this step, one token each, as
    little-endian int64 arrays (`np.frombuffer(out.ids, np.int64)`). `cached`: (id,
    cached_tokens) of requests whose first token is in this message. `finished`: requests that
    ended this step; a finished request's last token, if it got one, is in `ids` / `tokens`.
    Every request ends with exactly one `Finished`, also when it never got a token (abort,
    score-only, rejected at admission).
    """

    ids: bytes = b""
    tokens: bytes = b""
    inits: list[DetokInit] = msgspec.field(default_factory=list)
    cached: list[tuple[int, int]] = msgspec.field(default_factory=list)
    finished: list[Finished] = msgspec.field(default_factory=list)
    # (id, logprobs new this step) of requests that asked for logprobs.
    logprobs: list[tuple[int, LogprobDelta]] = msgspec.field(default_factory=list)


class BatchStrOut(msgspec.Struct, tag=True, kw_only=True):
    """Detokenizer -> main: the same batch with text. `texts[i]` is the text that became final
    with `tokens[i]` (often "", e.g. inside a multi-byte character or a possible stop string);
    `tails[j]` is the rest of `finished[j]`'s text, flushed when it ended; `errors`: (id,
    message) of requests whose text could not be rendered (main ends them with the error)."""

    ids: bytes = b""
    tokens: bytes = b""
    texts: list[str] = msgspec.field(default_factory=list)
    cached: list[tuple[int, int]] = msgspec.field(default_factory=list)
    finished: list[Finished] = msgspec.field(default_factory=list)
    tails: list[str] = msgspec.field(default_factory=list)
    logprobs: list[tuple[int, LogprobDelta]] = msgspec.field(default_factory=list)
    errors: list[tuple[int, str]] = msgspec.field(default_factory=list)


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
    GenerateReq
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
