"""The output side of the scheduler's loop: `Outbox` collects what one loop iteration tells the
detokenizer (new requests' detokenizer settings, the committed tokens as arrays, first-token
cache hits, finishes, logprob deltas) and sends it as one `BatchTokenIDOut`.

In: the Rust commit's result (`srt._native.CommitResult`: token arrays and the finishes it
decided), the host decisions for flagged requests, and the finishes the scheduler makes itself
(aborts, timeouts, failures). Out: at most one message per iteration. A step's tokens go on as
the commit's own int64 arrays (bytes): no per-request Python for the common request.
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


def finish_reason(kind: str, value: Any, message: str | None = None) -> FinishReason:
    """A FinishReason from the Rust commit's (kind, value): "stop" with the stop token id or
    string, "length" with the length, "abort" with `message`."""
    if kind == "stop":
        return FinishReason(type="stop", matched=value)
    if kind == "length":
        return FinishReason(type="length", length=value)
    return FinishReason(type="abort", message=message or "aborted")


class Outbox:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._ids: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []
        self.inits: list[DetokInit] = []
        self.cached: list[tuple[int, int]] = []
        self.finished: list[Finished] = []
        self.logprobs: list[tuple[int, LogprobDelta]] = []

    def __bool__(self) -> bool:
        return bool(self._ids or self.inits or self.cached or self.finished or self.logprobs)

    def add_tokens(self, ids: np.ndarray, tokens: np.ndarray) -> None:
        """One token for each of `ids` (int64 arrays, aligned)."""
        if len(ids):
            self._ids.append(ids)
            self._tokens.append(tokens)

    def add_finished(
        self, rid: int, reason: FinishReason, completion_tokens: int, cached_tokens: int
    ) -> None:
        self.finished.append(Finished(rid, reason, completion_tokens, cached_tokens))

    def message(self) -> BatchTokenIDOut:
        """The collected outputs as one message; the outbox starts over empty."""
        ids = self._ids[0] if len(self._ids) == 1 else np.concatenate(self._ids or [_EMPTY])
        tokens = (
            self._tokens[0] if len(self._tokens) == 1 else np.concatenate(self._tokens or [_EMPTY])
        )
        msg = BatchTokenIDOut(
            ids=ids.astype(np.int64, copy=False).tobytes(),
            tokens=tokens.astype(np.int64, copy=False).tobytes(),
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
