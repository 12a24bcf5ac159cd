"""Reliability: bad input, failing steps, timeouts, disconnects, overload and shutdown.

In-process parts drive a `Scheduler` directly (the `Harness` of test_scheduler.py) and check its
KV accounting exactly. Live parts run `python -m srt serve` with the tiny llama on loopback; the
server's KV accounting is read from the scheduler's `kv idle: ...` debug log line, written each
time its last request ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _live import alive, child_pids, start_server
from test_scheduler import OVERLAP, Harness

from srt.managers.io_struct import AbortReq
from srt.managers.scheduler import FAULT_TOKEN_ENV, MAX_FAILED_STEPS, STEP_DELAY_ENV

# A special token (<|endoftext|>, the pad token) that plain-text prompts never produce: the
# live server's step fails for any request whose prompt holds it.
FAULT_TOKEN = 0


def prompt_ids(h: Harness, seed: int, n: int = 12) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, h.sched.vocab_size) for _ in range(n)]


# ---- in-process: step failures, timeouts, aborts --------------------------------------------


@pytest.mark.parametrize("overlap", OVERLAP)
def test_failing_step_aborts_only_its_requests(overlap: bool, tiny_model_paths: dict) -> None:
    ref = Harness(tiny_model_paths["llama"], max_total_tokens=1024)
    h = Harness(tiny_model_paths["llama"], overlap, max_total_tokens=1024)
    try:
        good = prompt_ids(h, 1)
        ref.submit("a", good, max_new_tokens=10, temperature=0.0, ignore_eos=True)
        ref.run()
        h.sched.admission.fault_token = FAULT_TOKEN
        h.submit("a", good, max_new_tokens=10, temperature=0.0, ignore_eos=True)
        h.kinds.append(h.sched.run_step())  # prefill of "a" alone: it is running now
        h.submit("bad", [FAULT_TOKEN, *good], max_new_tokens=10, ignore_eos=True)
        h.run()
        assert h.finished["bad"]["type"] == "abort"
        assert "injected fault" in h.finished["bad"]["message"]
        assert h.finished["a"] == {"type": "length", "length": 10}
        assert h.outputs["a"] == ref.outputs["a"]
        h.assert_pool_returned()
        # The scheduler goes on serving.
        h.submit("c", good, max_new_tokens=10, temperature=0.0, ignore_eos=True)
        h.run()
        assert h.outputs["c"] == ref.outputs["a"]
        h.assert_pool_returned()
    finally:
        ref.close()
        h.close()


@pytest.mark.parametrize("overlap", OVERLAP)
def test_failing_decode_step_frees_its_requests(overlap: bool, tiny_model_paths: dict) -> None:
    h = Harness(tiny_model_paths["llama"], overlap, max_total_tokens=1024)
    try:
        calls = {"n": 0}
        forward = h.sched.runner.forward

        def flaky(batch: object) -> object:
            calls["n"] += 1
            if calls["n"] == 3:  # a decode step in the middle of the requests
                raise RuntimeError("boom")
            return forward(batch)

        h.sched.runner.forward = flaky  # type: ignore[method-assign]
        for i in range(3):
            h.submit(f"r{i}", prompt_ids(h, i), max_new_tokens=8, ignore_eos=True)
        h.run()
        for i in range(3):
            assert h.finished[f"r{i}"]["type"] == "abort"
            assert "RuntimeError: boom" in h.finished[f"r{i}"]["message"]
        h.assert_pool_returned()
    finally:
        h.close()


def test_steps_failing_every_time_stop_the_scheduler(tiny_model_paths: dict) -> None:
    h = Harness(tiny_model_paths["llama"], max_total_tokens=1024)
    try:

        def broken(batch: object) -> object:
            raise RuntimeError("broken runner")

        h.sched.runner.forward = broken  # type: ignore[method-assign]
        for i in range(MAX_FAILED_STEPS - 1):
            h.submit(f"r{i}", prompt_ids(h, i), max_new_tokens=4)
            while h.sched.has_work():
                h.sched.run_step()
            assert h.sched.core.num_requests == 0
            h.sched.run_step()  # idle steps in between (e.g. woken by an abort) do not count
        h.submit("last", prompt_ids(h, 99), max_new_tokens=4)
        with pytest.raises(RuntimeError, match="steps failed in a row"):
            while h.sched.has_work():
                h.sched.run_step()
    finally:
        h.close()


@pytest.mark.parametrize("overlap", OVERLAP)
def test_request_timeout_frees_kv(overlap: bool, tiny_model_paths: dict) -> None:
    h = Harness(tiny_model_paths["llama"], overlap, max_total_tokens=1024, request_timeout=0.3)
    try:
        # Queued too long (created long ago): ends before it ever runs.
        h.submit("old", prompt_ids(h, 1), {"created_time": time.time() - 10}, max_new_tokens=8)
        h.submit("long", prompt_ids(h, 2), max_new_tokens=900, ignore_eos=True)
        t0 = time.monotonic()
        h.sched.run_step()
        assert h.ids["old"] not in h.sched.core
        while h.sched.has_work() and time.monotonic() - t0 < 30:
            h.sched.run_step()
            h.sched.core.check_invariants()
        h.run()
        expected = {"type": "abort", "message": "request timed out after 0.3 s"}
        assert h.finished["old"] == expected
        assert h.outputs.get("old", []) == []
        assert h.finished["long"] == expected
        assert 0 < len(h.outputs["long"]) < 900
        h.assert_pool_returned()
    finally:
        h.close()


@pytest.mark.parametrize("overlap", OVERLAP)
def test_abort_frees_kv_at_the_next_step(overlap: bool, tiny_model_paths: dict) -> None:
    h = Harness(tiny_model_paths["llama"], overlap, max_total_tokens=1024)
    try:
        h.submit("x", prompt_ids(h, 3), max_new_tokens=500, ignore_eos=True)
        for _ in range(3):
            h.sched.run_step()
        assert h.sched.core.stats()["request_owned"] > 0
        h.sched.abort(AbortReq(id=h.ids["x"], message="client went away"))
        h.sched.run_step()
        h.run()
        assert h.finished["x"] == {"type": "abort", "message": "client went away"}
        h.assert_pool_returned()
    finally:
        h.close()


# ---- live server ------------------------------------------------------------------------------


KV_LINE = re.compile(r"kv idle: (.*)")


def kv_reports(log: Path) -> list[dict[str, int]]:
    out = []
    for m in KV_LINE.finditer(log.read_text(errors="replace")):
        out.append({k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())})
    return out


def wait_kv_baseline(log: Path, after: int, timeout: float = 20.0) -> dict[str, int]:
    """The first `kv idle` report past the first `after` ones (polling the log), checked to
    show every slot back: none owned by a request, none locked, all free or evictable."""
    deadline = time.monotonic() + timeout
    while True:
        if len(kv_reports(log)) > after:
            time.sleep(0.3)  # let a report of a later idle moment land, if one is coming
            last = kv_reports(log)[-1]
            assert last["request_owned"] == 0, last
            assert last["protected"] == 0, last
            assert last["available"] + last["evictable"] == last["pool"], last
            assert last["rows_free"] == last["rows"], last
            return last
        assert time.monotonic() < deadline, "the scheduler never became idle"
        time.sleep(0.1)


class Live:
    def __init__(self, proc: object, base: str, log: Path) -> None:
        self.proc, self.base, self.log = proc, base, log


@pytest.fixture(scope="module")
def live(tiny_model_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("reliability")
    args = ["--model-path", tiny_model_paths["llama"], "--max-total-tokens", "512"]
    args += ["--max-running-requests", "64", "--log-level", "debug"]
    # NOTE: with overlap scheduling (off by default on CPU): these failures, aborts, timeouts
    # and disconnects happen with a step in flight; the in-process tests run both ways.
    args += ["--enable-overlap-on-cpu"]
    proc, base = start_server(args, tmp / "log", tmp, env={FAULT_TOKEN_ENV: str(FAULT_TOKEN)})
    yield Live(proc, base, tmp / "log")
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()


def check_healthy(base: str) -> None:
    """A normal request right after a bad one is answered correctly."""
    r = httpx.post(
        base + "/v1/completions",
        json={"prompt": "hello world", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4


C, CH, G = "/v1/completions", "/v1/chat/completions", "/generate"
MSG = [{"role": "user", "content": "hi"}]

# (path, raw body or JSON object, substring of the error message)
BAD_INPUTS: dict[str, tuple[str, bytes | dict, str]] = {
    "malformed_json": (C, b'{"prompt": "hi", ', "malformed JSON"),
    "not_an_object": (C, b"[1, 2, 3]", "body"),
    "prompt_wrong_type": (C, {"prompt": {"a": 1}}, "prompt"),
    "max_tokens_string": (C, {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    "temperature_list": (CH, {"messages": MSG, "temperature": [1]}, "temperature"),
    "missing_prompt": (C, {"max_tokens": 3}, "prompt"),
    "missing_messages": (CH, {"max_tokens": 3}, "messages"),
    "generate_missing_text": (G, {"sampling_params": {}}, "text"),
    "empty_prompt": (C, {"prompt": ""}, "empty"),
    "empty_prompt_generate": (G, {"text": ""}, "empty"),
    "empty_token_list": (C, {"prompt": []}, "empty"),
    "empty_messages": (CH, {"messages": []}, "messages"),
    "unknown_role": (CH, {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    "message_without_content_type": (CH, {"messages": [{"role": "user", "content": 5}]}, "content"),
    "invalid_utf8": (C, b'{"prompt": "caf\xc3\x28 \xff\xfe"}', "UTF-8"),
    "lone_surrogate": (C, b'{"prompt": "abc \\ud800 def"}', "surrogate"),
    "lone_surrogate_chat": (
        CH,
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
        "surrogate",
    ),
    "huge_max_tokens": (C, {"prompt": "hi", "max_tokens": 10**12}, "context length"),
    "max_tokens_beyond_int64": (C, {"prompt": "hi", "max_tokens": 10**30}, "context length"),
    "negative_max_tokens": (C, {"prompt": "hi", "max_tokens": -1}, "max"),
    "negative_temperature": (C, {"prompt": "hi", "temperature": -0.5}, "temperature"),
    "nan_temperature": (C, b'{"prompt": "hi", "temperature": NaN}', "NaN is not valid JSON"),
    "infinite_top_p": (C, b'{"prompt": "hi", "top_p": Infinity}', "Infinity is not valid JSON"),
    "overflowing_float": (C, b'{"prompt": "hi", "temperature": 1e999}', "not a finite float"),
    "nan_generate": (
        G,
        b'{"text": "hi", "sampling_params": {"top_p": NaN}}',
        "NaN is not valid JSON",
    ),
    "token_id_beyond_vocab": (C, {"prompt": [1, 2, 10**6]}, "token id"),
    "negative_token_id": (G, {"input_ids": [1, -5]}, "token id"),
    "huge_token_id": (G, {"input_ids": [2**70]}, "token id"),
    "prompt_1mb": (C, {"prompt": "lorem ipsum " * 87382, "max_tokens": 1}, "context length"),
    "stop_strings_10000": (C, {"prompt": "hi", "stop": [f"s{i}" for i in range(10000)]}, "stop"),
    "n_zero": (C, {"prompt": "hi", "n": 0}, "n"),
    "n_huge": (C, {"prompt": "hi", "n": 10**6}, "n"),
    # (another model's name is served with a warning, as SGLang does; unknown fields are
    # ignored, but a wrong type or a field whose omission would change the output is not)
    "stream_not_a_bool": (C, {"prompt": "hi", "stream": "yes"}, "stream"),
    "beam_search": (C, {"prompt": "hi", "use_beam_search": True}, "use_beam_search"),
    "generate_lora": (G, {"text": "hi", "lora_path": "adapter"}, "lora_path"),
    "bad_stop_regex": (G, {"text": "hi", "sampling_params": {"stop_regex": "(("}}, "stop_regex"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_4xx(live: Live, case: str) -> None:
    path, body, needle = BAD_INPUTS[case]
    if isinstance(body, bytes):
        r = httpx.post(
            live.base + path,
            content=body,
            headers={"content-type": "application/json"},
            timeout=60,
        )
    else:
        r = httpx.post(live.base + path, json=body, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    err = r.json()
    assert err["object"] == "error", err
    assert err["type"], err
    assert needle.lower() in err["message"].lower(), err
    assert live.proc.poll() is None, "the server died"
    check_healthy(live.base)


def test_failing_request_is_a_server_error_and_others_go_on(live: Live) -> None:
    async def main() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=live.base, timeout=60) as c:
            good = [
                c.post(C, json={"prompt": f"story {i}", "max_tokens": 16, "ignore_eos": True})
                for i in range(4)
            ]
            bad = c.post(C, json={"prompt": [FAULT_TOKEN, 5, 6, 7], "max_tokens": 8})
            results = await asyncio.gather(bad, *good)
            return results[0], list(results[1:])

    bad, good = asyncio.run(main())
    assert bad.status_code == 500, bad.text
    assert "injected fault" in bad.json()["message"]
    assert bad.json()["type"] == "server_error"
    # The good requests may have shared the failing step (then they are aborted too); any that
    # did not completed normally. Afterwards, everything works and no KV is held.
    for r in good:
        assert r.status_code in (200, 500), r.text
        if r.status_code == 500:
            assert "injected fault" in r.json()["message"]
    stream = httpx.post(
        live.base + C, json={"prompt": [FAULT_TOKEN, 9], "max_tokens": 4, "stream": True}
    )
    assert stream.status_code == 200
    events = [ln for ln in stream.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert "injected fault" in events[-2]
    n_at = len(kv_reports(live.log))
    check_healthy(live.base)
    wait_kv_baseline(live.log, n_at)
    assert "Traceback" in live.log.read_text()


async def _disconnecting_client(base: str, i: int, before_first: bool) -> None:
    """Starts a long stream and drops the connection before or after its first tokens."""
    body = {"prompt": f"tell me a long story {i}", "max_tokens": 400, "ignore_eos": True}
    body["stream"] = True
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        async with c.stream("POST", C, json=body) as r:
            assert r.status_code == 200
            if before_first:
                return  # closes the connection as soon as the headers came
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                    if n >= 2 + i % 3:
                        return


async def _impatient_client(base: str, i: int) -> None:
    """A non-streaming request whose client gives up after a moment."""
    body = {"prompt": f"a long answer {i}", "max_tokens": 400, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.post(C, json=body), 0.3)


def test_disconnects_abort_and_kv_returns(live: Live) -> None:
    """Streams dropped before or after their first tokens, and non-stream requests given up:
    the scheduler aborts them (a 512-token pool runs ~one 400-token request at a time, so
    running them out would take many seconds) and every KV slot comes back."""

    async def main() -> None:
        streams = [_disconnecting_client(live.base, i, before_first=i % 2 == 0) for i in range(12)]
        await asyncio.gather(*streams, *[_impatient_client(live.base, i) for i in range(2)])

    check_healthy(live.base)
    base = wait_kv_baseline(live.log, 0)
    n_before = len(kv_reports(live.log))
    asyncio.run(asyncio.wait_for(main(), 60))
    t_gone = time.monotonic()
    # A request sent after all the others (one socket, in order): once it is done and the
    # scheduler is idle, every earlier request has ended.
    n_at = len(kv_reports(live.log))
    check_healthy(live.base)
    after = wait_kv_baseline(live.log, n_at, timeout=15)
    # Stream disconnects are seen at once, a non-stream one within the 2 s disconnect poll.
    assert time.monotonic() - t_gone < 5, "aborted requests kept running"
    assert after["pool"] == base["pool"]
    assert len(kv_reports(live.log)) > n_before


@pytest.mark.parametrize("n", [pytest.param(500, marks=pytest.mark.slow), 100])
def test_many_streams_on_a_small_pool_match_single_runs(live: Live, n: int) -> None:
    """`n` concurrent streams over a 512-token pool, up to 64 running (eviction and
    retraction): each gives the greedy text it gives alone; nothing hangs or leaks."""
    prompts = [f"prompt number {k} says" for k in range(4)]
    params = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}
    alone = {}
    for p in prompts:
        r = httpx.post(live.base + C, json={"prompt": p, **params}, timeout=30)
        assert r.status_code == 200
        alone[p] = r.json()["choices"][0]["text"]
    n_before = len(kv_reports(live.log))
    retractions_before = live.log.read_text().count("retracted")

    async def one(c: httpx.AsyncClient, p: str) -> str:
        text = []
        async with c.stream("POST", C, json={"prompt": p, "stream": True, **params}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ev = json.loads(line[6:])
                    assert "error" not in ev, ev
                    text.append(ev["choices"][0]["text"])
        return "".join(text)

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(base_url=live.base, timeout=80, limits=limits) as c:
            return await asyncio.gather(*[one(c, prompts[i % 4]) for i in range(n)])

    outs = asyncio.run(asyncio.wait_for(main(), 85))
    for i, out in enumerate(outs):
        assert out == alone[prompts[i % 4]], i
    assert live.log.read_text().count("retracted") > retractions_before, "no retraction"
    assert len(kv_reports(live.log)) > n_before
    n_at = len(kv_reports(live.log))
    check_healthy(live.base)
    wait_kv_baseline(live.log, n_at)


# ---- overload, timeouts, shutdown ------------------------------------------------------------


def test_overload_timeout_and_graceful_shutdown(tiny_model_paths: dict, tmp_path: Path) -> None:
    args = ["--model-path", tiny_model_paths["llama"], "--max-total-tokens", "2048"]
    args += ["--max-running-requests", "2", "--max-queued-requests", "2"]
    args += ["--request-timeout", "3", "--shutdown-timeout", "2"]
    # 10 ms a step: a 1000-token request takes over 10 s however fast the machine.
    proc, base = start_server(args, tmp_path / "log", tmp_path, env={STEP_DELAY_ENV: "0.01"})
    long_body = {"prompt": "go on", "max_tokens": 1000, "ignore_eos": True}
    try:
        kids = child_pids(proc.pid)
        assert len(kids) >= 2

        # Overload: 2 running + 2 queued are admitted, the rest get 503 at once.
        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                return await asyncio.gather(*[c.post(C, json=long_body) for _ in range(8)])

        t0 = time.monotonic()
        rs = asyncio.run(flood())
        codes = sorted(r.status_code for r in rs)
        rejected = [r for r in rs if r.status_code == 503]
        assert len(rejected) == 4, codes
        for r in rejected:
            assert r.json()["type"] == "server_error"
            assert "overloaded" in r.json()["message"]
        # The admitted ones hit the 3 s request timeout (a 1000-token run takes longer).
        for r in rs:
            if r.status_code != 503:
                assert r.status_code == 500 and "timed out after 3 s" in r.json()["message"], r.text
        assert time.monotonic() - t0 < 15

        # A timed-out stream ends with an error event and [DONE].
        r = httpx.post(base + C, json={**long_body, "stream": True}, timeout=30)
        events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert "request timed out after 3 s" in events[-2]

        # SIGTERM with a stream in flight: new requests get 503, the stream is ended within the
        # shutdown timeout (aborted: it would take longer), exit 0, no orphans, no socket files.
        async def shutdown() -> tuple[list[str], httpx.Response, float]:
            events: list[str] = []
            body = {"prompt": "go on", "max_tokens": 1000, "ignore_eos": True, "stream": True}
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                async with c.stream("POST", C, json=body) as s:
                    it = s.aiter_lines()
                    async for line in it:
                        if line.startswith("data: "):
                            events.append(line)
                            break
                    t_sig = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.sleep(0.3)
                    async with httpx.AsyncClient(base_url=base, timeout=10) as c2:
                        refused = await c2.post(C, json={"prompt": "hi", "max_tokens": 2})
                    async for line in it:
                        if line.startswith("data: "):
                            events.append(line)
                    return events, refused, time.monotonic() - t_sig

        events, refused, took = asyncio.run(asyncio.wait_for(shutdown(), 30))
        assert refused.status_code == 503, refused.text
        assert "shutting down" in refused.json()["message"]
        assert events[-1] == "data: [DONE]"
        assert "shutting down" in events[-2] or "timed out" in events[-2], events[-2]
        assert took < 2 + 4
        assert proc.wait(timeout=15) == 0
        deadline = time.monotonic() + 10
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(k) for k in kids), "a child outlived the server"
        assert not list(tmp_path.glob("srt-ipc-*")), "socket files were left behind"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigint_mid_request_lets_it_finish(tiny_model_paths: dict, tmp_path: Path) -> None:
    """Ctrl-C with a short stream in flight: it completes normally, then exit 0."""
    args = ["--model-path", tiny_model_paths["llama"], "--max-total-tokens", "1024"]
    proc, base = start_server(args, tmp_path / "log", tmp_path)
    try:

        async def main() -> list[dict]:
            body = {"prompt": "hi", "max_tokens": 60, "ignore_eos": True, "stream": True}
            events = []
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                async with c.stream("POST", C, json=body) as s:
                    async for line in s.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        if not events:
                            os.kill(proc.pid, signal.SIGINT)
                        events.append(json.loads(line[6:]))
            return events

        events = asyncio.run(asyncio.wait_for(main(), 30))
        assert events[-1]["choices"][0]["finish_reason"] == "length", events[-1]
        assert proc.wait(timeout=20) == 0
        assert not list(tmp_path.glob("srt-ipc-*"))
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("overlap", OVERLAP)
def test_failed_step_leaves_no_unwritten_kv_in_the_prefix_cache(
    overlap: bool, tiny_model_paths: dict
) -> None:
    """The failed prefill's slots were never written: a later request with the same prompt,
    waiting while another runs, must not reuse them (the cache is flushed once idle)."""
    ref = Harness(tiny_model_paths["llama"], max_total_tokens=1024)
    h = Harness(tiny_model_paths["llama"], overlap, max_total_tokens=1024)
    try:
        p = prompt_ids(h, 7, n=40)
        ref.submit("p", p, max_new_tokens=8, temperature=0.0, ignore_eos=True)
        ref.run()
        h.submit("a", prompt_ids(h, 8), max_new_tokens=30, temperature=0.0, ignore_eos=True)
        h.sched.run_step()  # "a" is running
        h.settle()
        forward = h.sched.runner.forward
        failures = {"left": 1}

        def fail_once(batch: object) -> object:
            if failures["left"]:
                failures["left"] -= 1
                raise RuntimeError("transient")
            return forward(batch)

        h.sched.runner.forward = fail_once  # type: ignore[method-assign]
        h.submit("p1", p, max_new_tokens=8, temperature=0.0, ignore_eos=True)
        h.sched.run_step()  # prefill of p1 fails
        h.submit("p2", p, max_new_tokens=8, temperature=0.0, ignore_eos=True)
        h.run()
        assert h.finished["p1"]["type"] == "abort"
        assert h.finished["a"]["type"] == "length"
        assert h.outputs["p2"] == ref.outputs["p"]
        h.assert_pool_returned()
    finally:
        ref.close()
        h.close()
