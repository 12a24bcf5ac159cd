"""DetokenizerManager's batch handling, with a scripted stand-in for the Rust detokenizer:
one step_batch call per batch, add on init, finish flush on the final output, early stop on a
matched stop string, and outputs of unknown or ended requests passed on or dropped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from srt.managers.detokenizer_manager import DetokenizerManager
from srt.managers.io_struct import BatchTokenIDOut, DetokInit, FinishReason
from srt.server_args import PortArgs, ServerArgs


class ScriptedDetok:
    """Each id becomes the text f"<id>"; a stop string is matched when an id's text equals it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.reqs: dict[int, list[str]] = {}

    def add(self, rid, prompt_ids, skip_special_tokens=True, spaces_between_special_tokens=True,
            stop=None, no_stop_trim=False) -> None:  # fmt: skip
        self.calls.append(("add", rid, list(prompt_ids), stop))
        self.reqs[rid] = list(stop or [])

    def step_batch(self, rids, new_ids):
        self.calls.append(("step_batch", list(rids)))
        out = []
        for rid, ids in zip(rids, new_ids, strict=True):
            if rid not in self.reqs:
                raise ValueError(f"unknown rid {rid}")
            text, hit = "", None
            for t in ids:
                s = f"<{t}>"
                if s in self.reqs[rid]:
                    hit = self.reqs[rid].index(s)
                    break
                text += s
            out.append((text, hit))
        return out

    def finish(self, rid) -> str:
        self.calls.append(("finish", rid))
        del self.reqs[rid]
        return "|flush"

    def remove(self, rid) -> bool:
        return self.reqs.pop(rid, None) is not None


@pytest.fixture
def mgr() -> Iterator[DetokenizerManager]:
    port_args = PortArgs.new()
    m = DetokenizerManager(ServerArgs(), port_args, detokenizer=ScriptedDetok())
    yield m
    m.recv_sock.close(linger=0)
    m.send_sock.close(linger=0)
    m.ctx.term()
    port_args.cleanup()


def batch(rows: list[tuple]) -> BatchTokenIDOut:
    """rows: (rid, new_ids, finished, init)."""
    return BatchTokenIDOut(
        rids=[r[0] for r in rows],
        new_ids=[r[1] for r in rows],
        finished=[r[2] for r in rows],
        inits=[r[3] for r in rows],
        prompt_tokens=[3] * len(rows),
        completion_tokens=[len(r[1]) for r in rows],
        cached_tokens=[0] * len(rows),
    )


def test_one_step_batch_per_batch_and_flush_on_finish(mgr: DetokenizerManager) -> None:
    detok: ScriptedDetok = mgr.detok  # type: ignore[assignment]
    init = DetokInit(prompt_tail=[7, 8])
    out = mgr.handle_batch(batch([("a", [1], None, init), ("b", [2, 3], None, init)]))
    assert out.rids == ["a", "b"] and out.texts == ["<1>", "<2><3>"]
    assert [c[0] for c in detok.calls] == ["add", "add", "step_batch"]
    assert detok.calls[0][2] == [7, 8]
    length = FinishReason(type="length", length=2)
    out = mgr.handle_batch(batch([("a", [4], length, None), ("b", [5], None, None)]))
    assert out.texts == ["<4>|flush", "<5>"]
    assert out.finished == [length, None]
    assert out.new_ids == [[4], [5]] and out.prompt_tokens == [3, 3]
    assert sum(1 for c in detok.calls if c[0] == "step_batch") == 2
    assert "a" not in mgr._ids and "b" in mgr._ids


def test_stop_string_ends_the_request_early_and_drops_the_rest(mgr: DetokenizerManager) -> None:
    init = DetokInit(prompt_tail=[], stop=["<9>", "<5>"])
    out = mgr.handle_batch(batch([("a", [1, 5, 6], None, init)]))
    assert out.texts == ["<1>|flush"]
    assert out.finished == [FinishReason(type="stop", matched="<5>")]
    # What the scheduler still sends for it is dropped, up to its own final output.
    assert mgr.handle_batch(batch([("a", [7], None, None)])).rids == []
    stop = FinishReason(type="stop", matched=2)
    assert mgr.handle_batch(batch([("a", [2], stop, None)])).rids == []
    assert "a" not in mgr._ended


def test_abort_before_any_output_is_passed_on(mgr: DetokenizerManager) -> None:
    abort = FinishReason(type="abort", message="client went away")
    out = mgr.handle_batch(batch([("z", [], abort, None)]))
    assert out.rids == ["z"] and out.texts == [""] and out.finished == [abort]


def test_a_failing_request_ends_alone(mgr: DetokenizerManager) -> None:
    init = DetokInit(prompt_tail=[])
    mgr.handle_batch(batch([("a", [1], None, init), ("b", [2], None, init)]))
    del mgr.detok.reqs[mgr._ids["a"]]  # its Rust state is gone: step_batch raises for it
    out = mgr.handle_batch(batch([("a", [3], None, None), ("b", [4], None, None)]))
    assert out.rids == ["a", "b"]
    assert out.finished[0] is not None and out.finished[0].type == "abort"
    assert out.texts[1] == "<4>" and out.finished[1] is None
