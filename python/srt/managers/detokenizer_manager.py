"""The detokenizer process: token ids in, text out.

In: `BatchTokenIDOut` from the scheduler (PULL on `detokenizer_ipc`). Out: `BatchStrOut` to the
main process (PUSH to `tokenizer_ipc`), only for batches that carry something. Requests are
known by the integer id the scheduler's messages carry (main's id; the client's rid never gets
here), which is also the Rust `srt._native.Detokenizer`'s key.

Per batch: each `DetokInit` starts a request in the Rust detokenizer; the step's tokens (one per
request, int64 arrays) go through a single `step_tokens` call; each `Finished` flushes what its
request held back (`tails`). The token arrays, `cached`, `finished` and `logprobs` pass through
unchanged. The incremental work (UTF-8 hold-back, special tokens, stop strings) is Rust.

This process renders text, it never ends a request: the scheduler decides every finish, stop
strings included, and sends it in the same message as the token that completed the stop string.
Stop strings still come in `DetokInit`, so the Rust detokenizer holds back text that may start
one and trims a match: no part of a stop string reaches a client. A request whose text cannot
be rendered (its init or a step failed) is reported once in `errors` and forgotten here; main
ends it and tells the scheduler, whose `Finished` for it then gets an empty tail.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
from typing import Any

import numpy as np
import zmq

from srt.managers.io_struct import (
    BatchStrOut,
    BatchTokenIDOut,
    DetokInit,
    ProcessReady,
    decode,
    encode,
)
from srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)

# What makes the Rust detokenizer's add/finish raise (unknown or duplicate id, bad input).
_DETOK_ERRORS = (ValueError, RuntimeError, TypeError)


class DetokenizerManager:
    """Owns the detokenizer process: its sockets and the per-request incremental decoders."""

    def __init__(
        self, server_args: ServerArgs, port_args: PortArgs, detokenizer: Any = None
    ) -> None:
        """`detokenizer` replaces the Rust one (tests); by default it is built from the
        tokenizer path."""
        if detokenizer is None:
            from srt._native import Detokenizer

            tokenizer_path = server_args.tokenizer_path or server_args.model_path
            if tokenizer_path is None:
                raise ValueError("the detokenizer needs a tokenizer path (resolved in main)")
            detokenizer = Detokenizer(tokenizer_path)
        self.detok = detokenizer
        self.ctx = zmq.Context(1)
        # NOTE: unsent messages to a dead peer must never block exit or garbage collection.
        self.ctx.setsockopt(zmq.LINGER, 0)
        self.recv_sock = self.ctx.socket(zmq.PULL)
        self.recv_sock.setsockopt(zmq.LINGER, 0)
        self.recv_sock.bind(port_args.detokenizer_ipc)
        self.send_sock = self.ctx.socket(zmq.PUSH)
        self.send_sock.setsockopt(zmq.LINGER, 0)
        self.send_sock.connect(port_args.tokenizer_ipc)
        # Ids reported in `errors` whose `Finished` has not come yet: the tokens the scheduler
        # still sends them (until main's abort reaches it) fail again and are not re-reported.
        self._failed: set[int] = set()

    def event_loop(self) -> None:
        while True:
            msg = decode(self.recv_sock.recv())
            if not isinstance(msg, BatchTokenIDOut):
                logger.error("unexpected message %s; ignored", type(msg).__name__)
                continue
            out = self.handle_batch(msg)
            if out.ids or out.finished or out.errors or out.cached or out.logprobs:
                self.send_sock.send(encode(out))

    def handle_batch(self, batch: BatchTokenIDOut) -> BatchStrOut:
        """The batch with its text: inits first (they precede their requests' tokens), then
        one `step_tokens` call for every token, then the finished requests' tails."""
        errors: list[tuple[int, str]] = []
        for init in batch.inits:
            self._add(init, errors)
        ids = np.frombuffer(batch.ids, dtype=np.int64)
        tokens = np.frombuffer(batch.tokens, dtype=np.int64)
        texts: list[str] = []
        if len(ids):
            texts, failures = self.detok.step_tokens(ids, tokens)
            for index, message in failures:
                self._fail(int(ids[index]), f"detokenization failed: {message}", errors)
        tails = [self._finish(f.id) for f in batch.finished]
        return BatchStrOut(
            ids=batch.ids,
            tokens=batch.tokens,
            texts=texts,
            cached=batch.cached,
            finished=batch.finished,
            tails=tails,
            logprobs=batch.logprobs,
            errors=errors,
        )

    def _add(self, init: DetokInit, errors: list[tuple[int, str]]) -> None:
        try:
            self.detok.add(
                init.id,
                init.prompt_tail,
                skip_special_tokens=init.skip_special_tokens,
                spaces_between_special_tokens=init.spaces_between_special_tokens,
                stop=list(init.stop) or None,
                no_stop_trim=init.no_stop_trim,
            )
        except _DETOK_ERRORS as e:
            self._fail(init.id, f"detokenization failed: {e}", errors)

    def _fail(self, req_id: int, message: str, errors: list[tuple[int, str]]) -> None:
        """Reports `req_id` in `errors` (once per request) and forgets its decoder."""
        if req_id in self._failed:
            return
        logger.error("request %d: %s", req_id, message)
        errors.append((req_id, message))
        self._failed.add(req_id)
        self.detok.remove(req_id)

    def _finish(self, req_id: int) -> str:
        """The tail of a request that ended ("" if it has no decoder: it failed, or never had
        an init, e.g. rejected at admission)."""
        self._failed.discard(req_id)
        if req_id not in self.detok:
            return ""
        try:
            return self.detok.finish(req_id)
        except _DETOK_ERRORS as e:
            logger.error("request %d: detokenizer finish failed: %s", req_id, e)
            return ""


def run_detokenizer_process(
    server_args: ServerArgs,
    port_args: PortArgs,
    ready_conn: multiprocessing.connection.Connection,
) -> None:
    """Entry point of the detokenizer process: report ready (or the error), then serve."""
    try:
        manager = DetokenizerManager(server_args, port_args)
    except Exception as e:
        ready_conn.send_bytes(
            encode(ProcessReady(name="detokenizer", ok=False, error=f"{type(e).__name__}: {e}"))
        )
        raise
    ready_conn.send_bytes(encode(ProcessReady(name="detokenizer", ok=True)))
    ready_conn.close()
    manager.event_loop()
