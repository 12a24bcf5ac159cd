"""The detokenizer process: token ids in, text deltas out.

In: `BatchTokenIDOut` from the scheduler (PULL on `detokenizer_ipc`). Out: `BatchStrOut` to the
main process (PUSH to `tokenizer_ipc`). The incremental work (UTF-8 hold-back, stop strings,
special tokens) is the Rust `srt._native.Detokenizer`; this module maps string rids to its
integer ids and makes one `step_batch` call per incoming batch.

A stop string found here ends the request for the client at once (finish_reason "stop" with the
matched string), even if the scheduler only notices a step later; what the scheduler still sends
for that rid is dropped, up to and including its own finishing output.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
from typing import Any

import zmq

from srt.managers.io_struct import (
    BatchStrOut,
    BatchTokenIDOut,
    FinishReason,
    ProcessReady,
    decode,
    encode,
)
from srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)


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
        self._ids: dict[str, int] = {}  # rid -> the Rust detokenizer's integer id
        self._stops: dict[str, list[str]] = {}  # rid -> its stop strings
        self._next_id = 0
        # Rids already finished for the client (stop string, error) whose final output from the
        # scheduler has not come yet; their outputs are dropped.
        self._ended: set[str] = set()

    def event_loop(self) -> None:
        while True:
            msg = decode(self.recv_sock.recv())
            if not isinstance(msg, BatchTokenIDOut):
                logger.error("unexpected message %s; ignored", type(msg).__name__)
                continue
            out = self.handle_batch(msg)
            if out.rids:
                self.send_sock.send(encode(out))

    def handle_batch(self, batch: BatchTokenIDOut) -> BatchStrOut:
        out = BatchStrOut(
            rids=[],
            texts=[],
            new_ids=[],
            finished=[],
            prompt_tokens=[],
            completion_tokens=[],
            cached_tokens=[],
        )
        if batch.logprobs is not None:
            out.logprobs = []
        live: list[int] = []  # indices into `batch` that go through step_batch
        for i, rid in enumerate(batch.rids):
            if rid in self._ended:
                if batch.finished[i] is not None:
                    self._ended.discard(rid)
                continue
            init = batch.inits[i]
            if init is not None and rid not in self._ids:
                self._add(rid, i, batch)
            if rid in self._ids:
                live.append(i)
            else:
                # No decoder: e.g. aborted before its first token. Nothing to decode; pass on.
                self._emit(out, batch, i, "", batch.finished[i])

        if not live:
            return out
        rids = [batch.rids[i] for i in live]
        results = self._step(rids, [batch.new_ids[i] for i in live])
        for i, rid, res in zip(live, rids, results, strict=True):
            finished = batch.finished[i]
            if isinstance(res, str):  # this request's decoder failed: end it with the error
                self._forget(rid)
                if finished is None:
                    self._ended.add(rid)
                self._emit(out, batch, i, "", FinishReason(type="abort", message=res))
                continue
            text, stop_index = res
            if stop_index is not None:
                stops = self._stops.get(rid, [])
                matched = stops[stop_index] if 0 <= stop_index < len(stops) else None
                if finished is None or finished.type != "abort":
                    finished = FinishReason(type="stop", matched=matched)
                    if batch.finished[i] is None:
                        self._ended.add(rid)
            if finished is not None:
                text += self._finish(rid)
            self._emit(out, batch, i, text, finished)
        return out

    def _add(self, rid: str, i: int, batch: BatchTokenIDOut) -> None:
        init = batch.inits[i]
        assert init is not None
        n = self._next_id
        self._next_id += 1
        try:
            self.detok.add(
                n,
                init.prompt_tail,
                skip_special_tokens=init.skip_special_tokens,
                spaces_between_special_tokens=init.spaces_between_special_tokens,
                stop=list(init.stop) or None,
                no_stop_trim=init.no_stop_trim,
            )
        except (ValueError, RuntimeError, TypeError) as e:
            logger.error("detokenizer add failed for %s: %s", rid, e)
            return
        self._ids[rid] = n
        self._stops[rid] = list(init.stop)

    def _step(
        self, rids: list[str], new_ids: list[list[int]]
    ) -> list[tuple[str, int | None] | str]:
        """One Rust call for the whole batch; on failure, one call per request so a bad
        request ends alone (its entry becomes the error message)."""
        ids = [self._ids[r] for r in rids]
        try:
            return list(self.detok.step_batch(ids, new_ids))
        except (ValueError, RuntimeError, TypeError, OverflowError) as e:
            logger.warning("step_batch failed (%s); retrying request by request", e)
        results: list[tuple[str, int | None] | str] = []
        for n, ids_i in zip(ids, new_ids, strict=True):
            try:
                results.append(self.detok.step_batch([n], [ids_i])[0])
            except (ValueError, RuntimeError, TypeError, OverflowError) as e:
                results.append(f"detokenization failed: {e}")
        return results

    def _finish(self, rid: str) -> str:
        n = self._ids.pop(rid, None)
        self._stops.pop(rid, None)
        if n is None:
            return ""
        try:
            return self.detok.finish(n)
        except (ValueError, RuntimeError) as e:
            logger.error("detokenizer finish failed for %s: %s", rid, e)
            return ""

    def _forget(self, rid: str) -> None:
        n = self._ids.pop(rid, None)
        self._stops.pop(rid, None)
        if n is not None:
            self.detok.remove(n)

    @staticmethod
    def _emit(
        out: BatchStrOut,
        batch: BatchTokenIDOut,
        i: int,
        text: str,
        finished: FinishReason | None,
    ) -> None:
        out.rids.append(batch.rids[i])
        out.texts.append(text)
        out.new_ids.append(batch.new_ids[i])
        out.finished.append(finished)
        out.prompt_tokens.append(batch.prompt_tokens[i])
        out.completion_tokens.append(batch.completion_tokens[i])
        out.cached_tokens.append(batch.cached_tokens[i])
        if out.logprobs is not None:
            out.logprobs.append(batch.logprobs[i] if batch.logprobs is not None else None)


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
