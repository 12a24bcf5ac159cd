"""API completeness against one live server (tiny llama, --enable-metrics --api-key): usage and
cached tokens, stream shapes through the official `openai` client, the operational endpoints
(health_generate, models/{id}, tokenize, detokenize, server_info, model_info, flush_cache,
abort_request, metrics), the API key, and OpenAI-shaped errors for client mistakes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from _live import start_server
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "test-key"
MODEL = "tiny-llama"
MAX_TOTAL_TOKENS = 2048
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Live:
    def __init__(self, base: str, model_path: str) -> None:
        self.base, self.model_path = base, model_path

    def get(self, path: str, auth: bool = True, **kw: Any) -> httpx.Response:
        return httpx.get(self.base + path, headers=AUTH if auth else {}, timeout=60, **kw)

    def post(self, path: str, auth: bool = True, **kw: Any) -> httpx.Response:
        return httpx.post(self.base + path, headers=AUTH if auth else {}, timeout=60, **kw)


@pytest.fixture(scope="module")
def live(
    tiny_model_paths: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    model = tiny_model_paths["llama"]
    log = tmp_path_factory.mktemp("api") / "server.log"
    args = ["--model-path", model, "--served-model-name", MODEL, "--enable-metrics"]
    args += ["--api-key", API_KEY, "--max-total-tokens", str(MAX_TOTAL_TOKENS)]
    proc, base = start_server(args, log, Path(tmp_path_factory.mktemp("tmp")))
    yield Live(base, model)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except Exception:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(live: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base + "/v1", api_key=API_KEY, max_retries=0)


def assert_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"object", "message", "type", "param", "code"}, body
    assert body["object"] == "error" and body["message"]
    return body


def metrics(live: Live) -> dict[str, float]:
    """Every sample of /metrics as {name{labels}: value}, through Prometheus' own parser."""
    r = live.get("/metrics", auth=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            extra = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            assert s.labels.get("model_name") == MODEL
            out[f"{s.name}{{{extra}}}"] = s.value
    return out


# ---- usage, cached tokens, stream shapes ------------------------------------------------------


def test_usage_on_every_response_and_cached_tokens(client: openai.OpenAI) -> None:
    prompt = "The quick brown fox jumps over the lazy dog, again and again. " * 3
    kw: dict[str, Any] = dict(model=MODEL, max_tokens=4, extra_body={"ignore_eos": True})
    first = client.completions.create(prompt=prompt, n=2, **kw)
    u = first.usage
    assert u is not None and u.completion_tokens == 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    second = client.completions.create(prompt=prompt, **kw)
    assert second.usage.prompt_tokens == u.prompt_tokens  # counted once for n=2
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    chat = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], n=2, **kw)
    assert chat.usage.completion_tokens == 8 and chat.usage.prompt_tokens > 0
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in chat.choices)
    again = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream_shape(client: openai.OpenAI, include_usage: bool) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi there"}],
        max_tokens=5,
        n=2,
        stream=True,
        stream_options={"include_usage": include_usage},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    usage_chunks = [c for c in chunks if c.usage is not None]
    for index in (0, 1):
        mine = [ch for c in with_choices for ch in c.choices if ch.index == index]
        assert mine[0].delta.role == "assistant"
        assert all(ch.delta.role is None for ch in mine[1:])
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == ["length"]
        assert mine[-1].finish_reason == "length"
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
        assert chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == 10
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0
    else:
        assert usage_chunks == []


def test_completion_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=["a b", "c d e"],
            max_tokens=3,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    reasons = [(ch.index, ch.finish_reason) for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(reasons) == [(i, "length") for i in range(4)]


# ---- endpoints ------------------------------------------------------------------------------


def test_health_and_health_generate(live: Live) -> None:
    assert live.get("/health", auth=False).status_code == 200
    before = metrics(live)["srt_requests_total{finish_reason=length}"]
    r = live.get("/health_generate")
    assert r.status_code == 200, r.text
    # it really generated: a request finished through the whole pipeline
    assert metrics(live)["srt_requests_total{finish_reason=length}"] == before + 1


def test_models_retrieve(client: openai.OpenAI, live: Live) -> None:
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert_error(live.get("/v1/models/no-such-model"), 404)


def test_tokenize_detokenize(live: Live) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(live.model_path)
    r = live.post("/v1/tokenize", json={"model": MODEL, "prompt": "hello world"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("hello world")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    msgs = [{"role": "user", "content": "hello"}]
    chat = live.post("/v1/tokenize", json={"messages": msgs}).json()
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False)
    no_gen = live.post(
        "/v1/tokenize", json={"messages": msgs, "add_generation_prompt": False}
    ).json()
    assert no_gen["count"] < chat["count"]
    d = live.post("/v1/detokenize", json={"tokens": body["tokens"]})
    text = tok.decode(body["tokens"])
    assert d.status_code == 200 and d.json() == {"prompt": text, "text": text}
    assert_error(live.post("/v1/detokenize", json={"tokens": [10**7]}), 400)
    assert_error(live.post("/v1/tokenize", json={}), 400)
    # another model's name is served all the same (with a warning), as SGLang does
    other = live.post("/v1/tokenize", json={"model": "nope", "prompt": "hello world"})
    assert other.status_code == 200 and other.json()["tokens"] == body["tokens"]


def test_server_info_and_model_info(live: Live) -> None:
    info = live.get("/server_info").json()
    assert info["max_total_num_tokens"] == MAX_TOTAL_TOKENS
    assert info["enable_metrics"] is True and info["api_key"] == "***"
    assert info["served_model_name"] == MODEL and info["version"]
    assert info["context_len"] == 1024 and info["max_running_requests"] >= 1
    stats = info["stats"]
    for key in ("num_running", "num_waiting", "token_usage", "evictable", "cache_hit_rate"):
        assert key in stats
    m = live.get("/model_info").json()
    assert m["served_model_name"] == MODEL and m["model_path"] == live.model_path
    assert m["architecture"] == "LlamaForCausalLM"
    assert m["context_length"] == 1024 and m["vocab_size"] > 0 and m["is_generation"] is True


def _wait_running(live: Live, want: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while live.get("/server_info").json()["stats"]["num_running"] < want:
        assert time.monotonic() < deadline, "the long request never started running"
        time.sleep(0.05)


def test_flush_cache_and_abort_request(live: Live) -> None:
    """A long request: flush_cache is refused while it runs, /abort_request ends it with
    finish_reason abort, then flush_cache empties the prefix cache."""
    result: dict[str, Any] = {}
    rid = "long-request-1"

    def run() -> None:
        result["r"] = live.post(
            "/generate",
            json={
                "text": "a long one",
                "rid": rid,
                "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True},
            },
        )

    t = threading.Thread(target=run)
    t.start()
    try:
        _wait_running(live, 1)
        body = assert_error(live.post("/flush_cache"), 400)
        assert "in flight" in body["message"]
        assert_error(live.post("/abort_request", json={"rid": "unknown-rid"}), 404)
        assert_error(live.post("/abort_request", json={}), 400)
        a = live.post("/abort_request", json={"rid": rid})
        assert a.status_code == 200 and a.json() == {"success": True}
    finally:
        t.join(timeout=60)
    meta = result["r"].json()["meta_info"]
    assert meta["id"] == rid
    assert meta["finish_reason"]["type"] == "abort"
    assert meta["completion_tokens"] < 1000
    assert live.get("/server_info").json()["stats"]["evictable"] > 0
    r = live.post("/flush_cache")
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    stats = live.get("/server_info").json()["stats"]
    assert stats["evictable"] == 0 and stats["cache_hit_rate"] == 0.0


def test_abort_all(live: Live) -> None:
    results: list[httpx.Response] = []

    def run(i: int) -> None:
        results.append(
            live.post(
                "/generate",
                # NOTE: ignore_eos, or a sampled EOS may end one before the abort does.
                json={
                    "text": f"go {i}",
                    "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True},
                },
            )
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        _wait_running(live, 2)
        assert live.post("/abort_request", json={"abort_all": True}).status_code == 200
    finally:
        for t in threads:
            t.join(timeout=60)
    assert [r.json()["meta_info"]["finish_reason"]["type"] for r in results] == ["abort"] * 2


def test_metrics_move(live: Live, client: openai.OpenAI) -> None:
    before = metrics(live)
    client.completions.create(
        model=MODEL, prompt="count me", max_tokens=6, extra_body={"ignore_eos": True}
    )
    after = metrics(live)
    gen = "srt_generation_tokens_total{}"
    assert after[gen] - before[gen] == 6
    assert after["srt_prompt_tokens_total{}"] > before["srt_prompt_tokens_total{}"]
    length = "srt_requests_total{finish_reason=length}"
    assert after[length] == before.get(length, 0) + 1
    for h in ("time_to_first_token", "e2e_request_latency"):
        name = f"srt_{h}_seconds_count{{}}"
        assert after[name] == before.get(name, 0) + 1
    itl = "srt_inter_token_latency_seconds_count{}"
    assert after[itl] - before.get(itl, 0) == 5
    for g in ("num_running_reqs", "num_queued_reqs", "token_usage", "cache_hit_rate"):
        assert f"srt_{g}{{}}" in after
    assert after["srt_max_total_num_tokens{}"] == MAX_TOTAL_TOKENS
    assert 0.0 <= after["srt_token_usage{}"] <= 1.0


# ---- API key and errors -------------------------------------------------------------------


def test_api_key(live: Live) -> None:
    for path in ("/v1/models", "/server_info", "/model_info", "/health_generate"):
        body = assert_error(live.get(path, auth=False), 401)
        assert body["type"] == "authentication_error"
    assert_error(
        httpx.get(live.base + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401
    )
    assert_error(live.post("/generate", auth=False, json={"text": "x"}), 401)
    bad = openai.OpenAI(base_url=live.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert live.get("/health", auth=False).status_code == 200
    assert live.get("/metrics", auth=False).status_code == 200


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": -1},
        {"temperature": "hot"},
        {"top_p": 1.5},
        {"top_p": 0},
        {"max_tokens": -1},
        {"max_tokens": 5000},
        {"n": 0},
        {"stop": 3},
        {"prompt": "word " * 2000},
        {"frequency_penalty": 9},
    ],
)
def test_bad_completion_params_are_400(live: Live, extra: dict[str, Any]) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, **extra}
    assert_error(live.post("/v1/completions", json=body), 400)


def test_bad_chat_params_are_400(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "x"}]
    for kw in ({"temperature": 3.5}, {"max_tokens": -2}, {"top_p": -0.5}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=msgs, **kw)
        assert e.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # the model is served, the type is wrong
        client.chat.completions.create(model="other", messages=msgs, extra_body={"n": "2"})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError):  # a text part without its text
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "text"}]}]
        )


def test_metrics_absent_without_flag(tiny_model_paths: dict[str, str]) -> None:
    """Without --enable-metrics /metrics is a 404 (an app built in-process, no children)."""
    from fastapi.testclient import TestClient

    from srt.entrypoints.http_server import create_app
    from srt.server_args import ServerArgs

    class FakeTM:
        server_args = ServerArgs(model_path=tiny_model_paths["llama"])
        served_model_name = MODEL
        metrics = None

        def start(self) -> None:
            pass

    app = create_app(FakeTM())  # type: ignore[arg-type]
    with TestClient(app) as c:
        assert_error(c.get("/metrics"), 404)


# ---- in-process: the scheduler's control path and client-fault aborts -----------------------


def test_scheduler_control_path_and_client_abort(tiny_model_paths: dict[str, str]) -> None:
    import zmq

    from srt.entrypoints.openai.serving_base import abort_error
    from srt.managers.io_struct import (
        BatchTokenIDOut,
        FlushCacheReq,
        FlushCacheResp,
        GenerateReq,
        GetStatsReq,
        StatsResp,
        decode,
        encode,
    )
    from srt.managers.scheduler import Scheduler
    from srt.sampling_params import SamplingParams
    from srt.server_args import PortArgs, ServerArgs

    model = tiny_model_paths["llama"]
    port_args = PortArgs.new()
    ctx = zmq.Context()
    to_main = ctx.socket(zmq.PULL)
    to_main.bind(port_args.tokenizer_ipc)
    to_detok = ctx.socket(zmq.PULL)
    to_detok.bind(port_args.detokenizer_ipc)
    to_sched = ctx.socket(zmq.PUSH)
    to_sched.connect(port_args.scheduler_ipc)
    args = ServerArgs(model_path=model, tokenizer_path=model, max_total_tokens=64)
    sched = Scheduler(args, port_args)

    def control(msg: Any) -> Any:
        to_sched.send(encode(msg))
        sched.recv_requests(block=True)
        assert to_main.poll(5000), "no control answer reached main"
        return decode(to_main.recv())

    def outputs() -> list[BatchTokenIDOut]:
        out = []
        while to_detok.poll(100):
            out.append(decode(to_detok.recv()))
        return out

    try:
        # A request that can never fit in the KV pool: aborted as the client's fault (400).
        big = GenerateReq(id=1, input_ids=list(range(3, 43)), sampling_params=SamplingParams())
        big.sampling_params.max_new_tokens = 100
        sched.add_request(big)
        sched.run_step()
        (out,) = outputs()
        fr = out.finished[0].reason
        assert out.finished[0].id == 1 and fr.type == "abort" and fr.status_code == 400
        err = abort_error(fr.to_json())
        assert err.status_code == 400 and "KV cache" in err.message
        assert abort_error({"type": "abort", "message": "x"}).status_code == 500

        ok = GenerateReq(
            id=2,
            input_ids=list(range(3, 13)),
            sampling_params=SamplingParams(max_new_tokens=3, ignore_eos=True),
        )
        sched.add_request(ok)
        sched.run_step()
        busy = control(FlushCacheReq(req_id=7))
        assert isinstance(busy, FlushCacheResp) and busy.req_id == 7 and not busy.success
        running = control(GetStatsReq(req_id=8))
        assert isinstance(running, StatsResp) and running.stats["num_running"] == 1
        assert running.stats["used_tokens"] > 0 and running.stats["token_usage"] > 0
        while sched.has_work():
            sched.run_step()
        stats = control(GetStatsReq(req_id=9)).stats
        assert stats["num_running"] == 0 and stats["evictable"] > 0
        assert stats["hit_prompt_tokens"] == 10 and stats["cache_hit_rate"] == 0.0
        flushed = control(FlushCacheReq(req_id=10))
        assert flushed.success, flushed.message
        stats = control(GetStatsReq(req_id=11)).stats
        assert stats["evictable"] == 0 and stats["hit_prompt_tokens"] == 0
        assert stats["available"] == 64
    finally:
        sched.close()
        for s in (to_main, to_detok, to_sched):
            s.close(linger=0)
        ctx.term()
        port_args.cleanup()
