"""DetokenizerManager's batch handling, with a scripted stand-in for the Rust detokenizer: add
on init, one step_tokens call per batch, the arrays and counts passed through, a tail per
finished request, stop strings trimmed but never reported, and failures reported once in
`errors`; then the same path with the Rust detokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from srt.managers.detokenizer_manager import DetokenizerManager
from srt.managers.io_struct import (
    BatchTokenIDOut,
    DetokInit,
    Finished,
    FinishReason,
    LogprobDelta,
)
from srt.server_args import PortArgs, ServerArgs
from srt.testing.tiny_model import train_tokenizer


class ScriptedDetok:
    """Token t renders as f"<t>", held back until the next token and flushed by `finish`.

    A stop string is a token's text, dropped (like the Rust detokenizer's trim); a request
    whose id is in `broken` fails its next step."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.held: dict[int, str] = {}
        self.stops: dict[int, list[str]] = {}
        self.broken: set[int] = set()

    def add(self, rid: int, prompt_ids: list[int], skip_special_tokens: bool = True,
            spaces_between_special_tokens: bool = True, stop: list[str] | None = None,
            no_stop_trim: bool = False) -> None:  # fmt: skip
        self.calls.append(("add", rid, list(prompt_ids), stop))
        if rid in self.held:
            raise ValueError(f"request {rid} exists")
        if prompt_ids and prompt_ids[0] < 0:
            raise ValueError("bad prompt")
        self.held[rid] = ""
        self.stops[rid] = list(stop or [])

    def step_tokens(
        self, ids: np.ndarray, tokens: np.ndarray
    ) -> tuple[list[str], list[tuple[int, str]]]:
        assert ids.dtype == np.int64 and tokens.dtype == np.int64
        self.calls.append(("step_tokens", ids.tolist(), tokens.tolist()))
        texts: list[str] = []
        failures: list[tuple[int, str]] = []
        for i, (rid, tok) in enumerate(zip(ids.tolist(), tokens.tolist(), strict=True)):
            if rid not in self.held or rid in self.broken:
                texts.append("")
                failures.append((i, f"unknown request {rid}"))
                continue
            s = f"<{tok}>"
            if s in self.stops[rid]:  # what came before the stop string is final
                texts.append(self.held[rid])
                self.held[rid] = ""
                continue
            texts.append(self.held[rid])
            self.held[rid] = s
        return texts, failures

    def finish(self, rid: int) -> str:
        self.calls.append(("finish", rid))
        self.stops.pop(rid)
        return self.held.pop(rid)

    def remove(self, rid: int) -> bool:
        self.calls.append(("remove", rid))
        self.stops.pop(rid, None)
        return self.held.pop(rid, None) is not None

    def __contains__(self, rid: int) -> bool:
        return rid in self.held


@pytest.fixture
def mgr() -> Iterator[DetokenizerManager]:
    port_args = PortArgs.new()
    m = DetokenizerManager(ServerArgs(), port_args, detokenizer=ScriptedDetok())
    yield m
    m.recv_sock.close(linger=0)
    m.send_sock.close(linger=0)
    m.ctx.term()
    port_args.cleanup()


def arr(xs: list[int]) -> bytes:
    return np.array(xs, dtype="<i8").tobytes()


def batch(ids: list[int], tokens: list[int], **kw: object) -> BatchTokenIDOut:
    return BatchTokenIDOut(ids=arr(ids), tokens=arr(tokens), **kw)  # type: ignore[arg-type]


def fin(rid: int, kind: str = "length", n: int = 2, cached: int = 0) -> Finished:
    return Finished(rid, FinishReason(type=kind), n, cached)


def test_one_step_tokens_call_per_batch_and_tail_on_finish(mgr: DetokenizerManager) -> None:
    detok: ScriptedDetok = mgr.detok  # type: ignore[assignment]
    inits = [DetokInit(id=1, prompt_tail=[7, 8]), DetokInit(id=2, prompt_tail=[9])]
    lp = LogprobDelta(output_logprobs=[-0.5], output_ids=[10])
    b = batch([1, 2], [10, 20], inits=inits, cached=[(1, 4), (2, 0)], logprobs=[(1, lp)])
    out = mgr.handle_batch(b)
    assert [c[0] for c in detok.calls] == ["add", "add", "step_tokens"]
    assert detok.calls[0][1:3] == (1, [7, 8])
    assert out.ids == b.ids and out.tokens == b.tokens  # the same bytes, passed through
    assert out.texts == ["", ""]  # held back by the detokenizer
    assert out.cached == [(1, 4), (2, 0)] and out.logprobs == [(1, lp)]
    assert out.finished == [] and out.tails == [] and out.errors == []

    done = fin(1, n=2, cached=4)
    out = mgr.handle_batch(batch([2, 1], [21, 11], finished=[done]))
    assert out.texts == ["<20>", "<10>"]  # aligned with ids, in their order
    assert out.finished == [done] and out.tails == ["<11>"]
    assert sum(1 for c in detok.calls if c[0] == "step_tokens") == 2
    assert 1 not in detok.held and 2 in detok.held


def test_stop_string_is_trimmed_and_not_reported(mgr: DetokenizerManager) -> None:
    """The scheduler decides the stop (its Finished comes with the stop string's token); the
    detokenizer only keeps the stop string's text from ever being sent."""
    init = DetokInit(id=5, prompt_tail=[], stop=["<3>"])
    texts: list[str] = []
    for tok, finished in [(1, []), (2, []), (3, [fin(5, "stop")])]:
        inits = [init] if tok == 1 else []
        out = mgr.handle_batch(batch([5], [tok], inits=inits, finished=finished))
        assert out.errors == []
        texts += out.texts + out.tails
    assert "".join(texts) == "<1><2>"
    assert out.finished == [fin(5, "stop")]  # the scheduler's reason, untouched


def test_finished_without_a_decoder_gets_an_empty_tail(mgr: DetokenizerManager) -> None:
    abort = Finished(9, FinishReason(type="abort", message="rejected"), 0, 0)
    out = mgr.handle_batch(BatchTokenIDOut(finished=[abort]))
    assert out.ids == b"" and out.texts == [] and out.finished == [abort] and out.tails == [""]
    assert [c[0] for c in mgr.detok.calls] == []  # no step_tokens for an empty step


def test_a_failing_request_is_reported_once_and_ends_alone(mgr: DetokenizerManager) -> None:
    detok: ScriptedDetok = mgr.detok  # type: ignore[assignment]
    inits = [DetokInit(id=1, prompt_tail=[]), DetokInit(id=2, prompt_tail=[])]
    mgr.handle_batch(batch([1, 2], [10, 20], inits=inits))
    detok.broken.add(1)
    out = mgr.handle_batch(batch([1, 2], [11, 21]))
    assert [e[0] for e in out.errors] == [1] and "unknown request 1" in out.errors[0][1]
    assert out.texts == ["", "<20>"]
    assert ("remove", 1) in detok.calls and 1 not in detok.held
    # Tokens the scheduler sends before main's abort reaches it fail again, unreported.
    out = mgr.handle_batch(batch([1, 2], [12, 22]))
    assert out.errors == [] and out.texts == ["", "<21>"]
    out = mgr.handle_batch(batch([], [], finished=[fin(1, "abort")]))
    assert out.tails == [""]
    assert ("finish", 1) not in detok.calls


def test_a_failing_init_is_reported_with_its_id(mgr: DetokenizerManager) -> None:
    inits = [DetokInit(id=3, prompt_tail=[-1]), DetokInit(id=4, prompt_tail=[])]
    out = mgr.handle_batch(batch([3, 4], [1, 2], inits=inits))
    assert len(out.errors) == 1
    rid, message = out.errors[0]
    assert rid == 3 and message.startswith("detokenization failed:") and "bad prompt" in message
    assert out.texts == ["", ""]


def test_with_the_rust_detokenizer(tmp_path: Path) -> None:
    """The real `step_tokens` reads the message's int64 bytes as they come: the texts and
    tails add up to the decoded output, cut before the stop string."""
    from tokenizers import Tokenizer

    from srt._native import Detokenizer

    train_tokenizer(tmp_path)
    ids = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("Hello world, this is").ids
    port_args = PortArgs.new()
    m = DetokenizerManager(ServerArgs(), port_args, detokenizer=Detokenizer(str(tmp_path)))
    try:
        parts: list[str] = []
        for i, tok in enumerate(ids):
            inits = [DetokInit(id=7, prompt_tail=[], stop=[" is"])] if i == 0 else []
            finished = [fin(7, "stop", n=len(ids))] if i == len(ids) - 1 else []
            out = m.handle_batch(batch([7], [tok], inits=inits, finished=finished))
            assert out.errors == []
            parts += out.texts + out.tails
        assert "".join(parts) == "Hello world, this"
        assert m.detok.num_requests() == 0
    finally:
        m.recv_sock.close(linger=0)
        m.send_sock.close(linger=0)
        m.ctx.term()
        port_args.cleanup()
