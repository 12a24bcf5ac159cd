"""The output side of the scheduler's loop: `Outbox` collects what one loop iteration tells the
detokenizer (new requests' detokenizer settings, the committed tokens as arrays, first-token
cache hits, finishes, logprob deltas) and sends it as one `BatchTokenIDOut`.

In: the Rust commit's result (`srt._native.CommitResult`: token arrays and the finishes it
decided), the host decisions for flagged requests, and the finishes the scheduler makes itself
(aborts, timeouts, failures). Out: a message after each commit (so at most one token per
request in it) and one for whatever else an iteration produced. A step's tokens go on as the
commit's own int64 arrays (bytes): no per-request Python for the common request.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from srt.managers.io_struct import (
    BatchTokenIDOut,
    DetokInit,
    Finished,
    FinishReason,
    LogprobDelta,
    encode,
)


def finish_reason(kind: str, value: Any) -> FinishReason:
    """A FinishReason from a Rust commit's (kind, value): "stop" with the stop token id or
    string, or "length" with the length."""
    if kind == "stop":
        return FinishReason(type="stop", matched=value)
    assert kind == "length", kind
    return FinishReason(type="length", length=value)


class Outbox:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._ids: np.ndarray = _EMPTY
        self._tokens: np.ndarray = _EMPTY
        self.inits: list[DetokInit] = []
        self.cached: list[tuple[int, int]] = []
        self.finished: list[Finished] = []
        self.logprobs: list[tuple[int, LogprobDelta]] = []

    def __bool__(self) -> bool:
        return bool(len(self._ids) or self.inits or self.cached or self.finished or self.logprobs)

    def add_tokens(self, ids: np.ndarray, tokens: np.ndarray) -> None:
        """One token for each of `ids` (int64 arrays, aligned; one commit's)."""
        assert not len(self._ids), "one commit per message"
        self._ids, self._tokens = ids, tokens

    def add_finished(
        self, rid: int, reason: FinishReason, completion_tokens: int, cached_tokens: int
    ) -> None:
        self.finished.append(Finished(rid, reason, completion_tokens, cached_tokens))

    def message(self) -> BatchTokenIDOut:
        """The collected outputs as one message; the outbox starts over empty."""
        msg = BatchTokenIDOut(
            ids=self._ids.astype(np.int64, copy=False).tobytes(),
            tokens=self._tokens.astype(np.int64, copy=False).tobytes(),
            inits=self.inits,
            cached=self.cached,
            finished=self.finished,
            logprobs=self.logprobs,
        )
        self._reset()
        return msg

    def send(self, sock: Any) -> None:
        if self:
            sock.send(encode(self.message()))


_EMPTY = np.zeros(0, dtype=np.int64)
