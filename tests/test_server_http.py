"""Live server on loopback: `python -m srt serve` with a tiny random llama, driven over HTTP
(httpx) and through the official `openai` client. Needs the whole runtime (scheduler, Rust
detokenizer)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from _live import alive, child_pids, free_port, subprocess_env

MAX_TOTAL_TOKENS = 4096


class Server:
    def __init__(
        self, proc: subprocess.Popen, base: str, model: str, log: Path, tmpdir: Path
    ) -> None:
        self.proc, self.base, self.model, self.log = proc, base, model, log
        self.tmpdir = tmpdir  # the server's TMPDIR, where its socket dir lives


@pytest.fixture(scope="module")
def server(
    tiny_model_paths: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    model = tiny_model_paths["llama"]
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    tmpdir = tmp_path_factory.mktemp("tmp")
    env = subprocess_env(TMPDIR=str(tmpdir))
    cmd = [sys.executable, "-m", "srt", "serve", "--model-path", model, "--port", str(port)]
    cmd += ["--max-total-tokens", str(MAX_TOTAL_TOKENS)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server not healthy within 60 s:\n{log.read_text()}")
        time.sleep(0.5)
    yield Server(proc, base, model, log, tmpdir)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def post(server: Server, path: str, **kw) -> httpx.Response:  # noqa: ANN003
    return httpx.post(server.base + path, timeout=60, **kw)


def sse_events(resp: httpx.Response) -> list[str]:
    """The data payloads of an SSE body, [DONE] included; asserts the framing."""
    body = resp.text
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


def assert_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["object"] == "error" and body["message"]
    assert set(body) == {"object", "message", "type", "param", "code"}
    return body


# ---- /generate -----------------------------------------------------------------------------


def test_ready_line_printed(server: Server) -> None:
    # the served name defaults to the model folder's name
    assert f"srt serving {Path(server.model).name} at {server.base}" in server.log.read_text()


def test_generate_text(server: Server) -> None:
    r = post(
        server,
        "/generate",
        json={
            "text": "Hello world",
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
        },
    )
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    assert isinstance(out["text"], str) and len(out["output_ids"]) == 8
    assert meta["completion_tokens"] == 8 and meta["prompt_tokens"] > 0
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["e2e_latency"] > 0 and meta["id"]


def test_generate_input_ids_matches_text(server: Server) -> None:
    sp = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    by_text = post(
        server, "/generate", json={"text": "the quick brown fox", "sampling_params": sp}
    ).json()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(server.model).encode("the quick brown fox")
    by_ids = post(server, "/generate", json={"input_ids": ids, "sampling_params": sp}).json()
    assert by_ids["meta_info"]["prompt_tokens"] == len(ids)
    assert by_ids["output_ids"] == by_text["output_ids"]
    assert by_ids["text"] == by_text["text"]


def test_generate_stream_is_cumulative_and_ends_with_done(server: Server) -> None:
    sp = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    r = post(server, "/generate", json={"text": "Hello", "sampling_params": sp, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b["text"].startswith(a["text"])
        assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]
    assert [c["meta_info"]["finish_reason"] is not None for c in chunks].count(True) == 1
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    full = post(server, "/generate", json={"text": "Hello", "sampling_params": sp}).json()
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]


def test_generate_batch(server: Server) -> None:
    sps = [{"max_new_tokens": n, "ignore_eos": True} for n in (1, 2, 3)]
    r = post(server, "/generate", json={"text": ["a", "b c", "d e f"], "sampling_params": sps})
    outs = r.json()
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [1, 2, 3]


def test_greedy_is_deterministic(server: Server) -> None:
    sp = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    a = post(
        server, "/generate", json={"text": "The capital of France", "sampling_params": sp}
    ).json()
    b = post(
        server, "/generate", json={"text": "The capital of France", "sampling_params": sp}
    ).json()
    assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"]


def test_generate_bad_requests(server: Server) -> None:
    assert_error(post(server, "/generate", json={"text": ""}), 400)
    assert_error(post(server, "/generate", json={"input_ids": [0, 10**6]}), 400)
    assert_error(
        post(server, "/generate", json={"text": "x", "sampling_params": {"top_p": 2}}), 400
    )
    assert_error(
        post(server, "/generate", json={"text": "x", "sampling_params": {"bogus": 1}}), 400
    )
    assert_error(post(server, "/generate", content=b"{not json"), 400)


# ---- OpenAI ---------------------------------------------------------------------------------


def test_models(client: openai.OpenAI, server: Server) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [Path(server.model).name]


def test_completion(client: openai.OpenAI, server: Server) -> None:
    r = client.completions.create(
        model=server.model,
        prompt="Hello",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "text_completion" and r.model == Path(server.model).name and r.id
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    again = client.completions.create(
        model=server.model,
        prompt="Hello",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert again.choices[0].text == r.choices[0].text


def test_completion_batch_and_n(client: openai.OpenAI, server: Server) -> None:
    r = client.completions.create(
        model=server.model, prompt=["a b", "c"], n=2, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12


def test_completion_stream(client: openai.OpenAI, server: Server) -> None:
    stream = client.completions.create(
        model=server.model,
        prompt="Hello",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    reasons = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert reasons == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    full = client.completions.create(
        model=server.model,
        prompt="Hello",
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert text == full.choices[0].text


def test_chat_completion(client: openai.OpenAI, server: Server) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(
        model=server.model,
        messages=msgs,
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens > 4


def test_chat_stream(client: openai.OpenAI, server: Server) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    stream = client.chat.completions.create(
        model=server.model,
        messages=msgs,
        max_completion_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    full = client.chat.completions.create(
        model=server.model,
        messages=msgs,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert text == full.choices[0].message.content


def test_stop_string_is_trimmed(client: openai.OpenAI, server: Server) -> None:
    base = client.completions.create(
        model=server.model,
        prompt="Hello",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = base.choices[0].text
    stop = text[len(text) // 2 :][:2]
    if not stop.strip():
        pytest.skip("greedy text has no usable stop string")
    r = client.completions.create(
        model=server.model,
        prompt="Hello",
        max_tokens=12,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_openai_errors(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt="x", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "x"}],
            logprobs=True,
            top_logprobs=21,
        )


def test_http_error_shapes(server: Server) -> None:
    body = assert_error(post(server, "/v1/completions", json={"prompt": "x", "suffix": "s"}), 400)
    assert body["param"] == "suffix"
    assert_error(post(server, "/v1/chat/completions", content=b'{"messages": ['), 400)
    assert_error(post(server, "/v1/chat/completions", json={"messages": "x"}), 400)
    too_long = "hello " * 5000
    body = assert_error(
        post(server, "/v1/completions", json={"prompt": too_long, "max_tokens": 1}), 400
    )
    assert "context length" in body["message"]
    # an unknown field is ignored (logged), a wrong type is not coerced
    ok = post(server, "/v1/completions", json={"prompt": "x", "max_tokens": 1, "frobnicate": 1})
    assert ok.status_code == 200, ok.text
    assert_error(post(server, "/v1/completions", json={"prompt": "x", "n": "2"}), 400)
    assert "ignoring unknown request fields: frobnicate" in server.log.read_text()


def test_client_disconnect_aborts_and_server_stays_healthy(server: Server) -> None:
    sp = {"max_new_tokens": 900, "ignore_eos": True}
    with httpx.stream(
        "POST",
        server.base + "/generate",
        json={"text": "x", "sampling_params": sp, "stream": True},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= 2:
                break
    # The aborted request frees its slot; the server still answers promptly.
    r = post(server, "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200
    assert httpx.get(server.base + "/health").status_code == 200


def test_only_the_scheduler_loads_torch(server: Server, client: openai.OpenAI) -> None:
    """Requests whose grammar the HTTP process checks (a JSON schema, a regex, a bad schema, a
    forced tool call) leave the main and detokenizer processes without torch: of the whole
    server, only the scheduler maps libtorch."""
    from _tools import WEATHER

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=8, response_format=fmt
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    r = post(server, "/generate", json={"text": "x", "sampling_params": {"regex": "[ab]+"}})
    assert r.status_code == 200
    bad = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=messages, response_format=bad)
    r = client.chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=32,
        tools=[WEATHER],
        tool_choice="required",
    )
    assert r.choices[0].finish_reason in ("tool_calls", "length")

    def maps_torch(pid: int) -> bool:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()

    assert not maps_torch(server.proc.pid)
    kids = child_pids(server.proc.pid)
    assert sum(maps_torch(p) for p in kids) == 1, "torch outside the scheduler process"


def test_sigterm_stops_cleanly(server: Server) -> None:
    """Last: stops the module's server. Exit 0, children gone, socket dir removed."""
    kids = child_pids(server.proc.pid)
    assert kids, "the server has no child processes"
    assert list(server.tmpdir.glob("srt-ipc-*")), "no socket dir where TMPDIR points"
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.log.read_text()[-2000:]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in kids)
    assert not list(server.tmpdir.glob("srt-ipc-*"))
