"""The standalone HTTP router (`python -m srt router`) over two live tiny-llama servers: routing
keys, proxying (completions, streaming chat and /generate) equal to a worker's own answers,
prefix affinity with cached tokens, and a worker that dies (mid-stream and for good)."""

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
from _live import free_port, start_server, subprocess_env, wait_healthy

from srt.entrypoints.router_args import RouterArgs
from srt.entrypoints.router_server import routing_key

LONG_PREFIX = "You are a careful assistant who answers in full sentences. " * 6


def test_routing_keys() -> None:
    assert routing_key("/v1/completions", {"prompt": "hé"}) == (list("hé".encode()), "text:")
    assert routing_key("/v1/completions", {"prompt": ["ab", "cd"]}) == ([97, 98], "text:")
    assert routing_key("/v1/completions", {"prompt": [5, 6], "cache_salt": "s"}) == (
        [5, 6],
        "ids:s",
    )
    assert routing_key("/generate", {"input_ids": [[1, 2], [3]]}) == ([1, 2], "ids:")
    assert routing_key("/generate", {"text": "x"}) == ([120], "text:")
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    key, ns = routing_key("/v1/chat/completions", chat)
    assert bytes(key).decode() == "system\nS\n\nuser\nU\n\n" and ns == "chat:"
    # A conversation's key extends the key of its beginning.
    shorter, _ = routing_key("/v1/chat/completions", {"messages": chat["messages"][:1]})
    assert key[: len(shorter)] == shorter
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "U"}]}]}
    assert bytes(routing_key("/v1/chat/completions", parts)[0]).decode() == "user\nU\n\n"
    for bad in (None, [1], {"prompt": {"a": 1}}, {"prompt": [-1]}, {"messages": "x"}):
        assert routing_key("/v1/completions", bad)[0] == []


def test_router_args_are_checked() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RouterArgs(worker_urls=())
    with pytest.raises(ValueError, match="http://"):
        RouterArgs(worker_urls=("localhost:1",))
    with pytest.raises(ValueError, match="twice"):
        RouterArgs(worker_urls=("http://a", "http://a"))
    with pytest.raises(ValueError, match="load-balance-method"):
        RouterArgs(worker_urls=("http://a",), load_balance_method="random")


def test_router_cli_rejects_bad_args() -> None:
    cmd = [sys.executable, "-m", "srt", "router", "--worker-urls", "nope"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert r.returncode == 2
    assert "must start with http://" in r.stderr


class Fleet:
    def __init__(self, workers: list, router: subprocess.Popen, base: str, log: Path) -> None:
        self.workers, self.router, self.base, self.log = workers, router, base, log
        self.client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)

    def worker_states(self) -> list[dict]:
        return httpx.get(self.base + "/workers", timeout=10).json()["workers"]


def _start_router(urls: list[str], log: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "srt", "router", "--port", str(port), "--worker-urls", *urls]
    cmd += ["--health-check-interval", "0.5"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(TMPDIR=str(tmp))
        )
    return proc, wait_healthy(proc, f"http://127.0.0.1:{port}", log, 60, "router")


@pytest.fixture(scope="module")
def fleet(tiny_model_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    args = ["--model-path", tiny_model_paths["llama"], "--max-total-tokens", "2048"]
    workers = [start_server(args, tmp / f"w{i}.log", tmp) for i in range(2)]
    router, base = _start_router([b for _, b in workers], tmp / "router.log", tmp)
    yield Fleet(workers, router, base, tmp / "router.log")
    for proc in [router] + [p for p, _ in workers]:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert router.returncode == 0, (tmp / "router.log").read_text()


def _body(prompt: str, max_tokens: int = 8, **kw: object) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}


def test_completions_through_the_router_equal_a_worker(fleet: Fleet) -> None:
    for prompt in ("Once upon a time", "The quick brown fox"):
        r = httpx.post(fleet.base + "/v1/completions", json=_body(prompt), timeout=60)
        assert r.status_code == 200, r.text
        worker = r.headers["x-srt-worker"]
        direct = httpx.post(worker + "/v1/completions", json=_body(prompt), timeout=60).json()
        assert r.json()["choices"][0]["text"] == direct["choices"][0]["text"]
    out = fleet.client.completions.create(
        model=None,  # type: ignore[arg-type]
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.completion_tokens == 4  # type: ignore[union-attr]
    models = fleet.client.models.list()
    assert len(models.data) == 1


def test_streaming_chat_and_generate_through_the_router(fleet: Fleet) -> None:
    stream = fleet.client.chat.completions.create(
        model=None,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    full = fleet.client.chat.completions.create(
        model=None,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert text == full.choices[0].message.content
    body = {
        "text": "A stream",
        "stream": True,
        "sampling_params": {"max_new_tokens": 5, "ignore_eos": True},
    }
    r = httpx.post(fleet.base + "/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e[len("data: ") :] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["meta_info"]["completion_tokens"] == 5
    # A worker's own 400 comes through unchanged.
    r = httpx.post(fleet.base + "/v1/completions", content=b'{"prompt": ', timeout=60)
    assert r.status_code == 400 and "malformed JSON" in r.json()["message"]


def test_shared_prefix_goes_to_one_worker_and_hits_its_cache(fleet: Fleet) -> None:
    seen = set()
    for q in range(4):
        r = httpx.post(
            fleet.base + "/v1/completions",
            json=_body(LONG_PREFIX + f"Question {q}?", max_tokens=2),
            timeout=60,
        )
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-srt-worker"])
        usage = r.json()["usage"]
        if q:
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            assert cached >= usage["prompt_tokens"] // 2, usage
    assert len(seen) == 1
    other = "Translate every sentence you are given into formal English prose. " * 6
    r = httpx.post(fleet.base + "/v1/completions", json=_body(other, max_tokens=2), timeout=60)
    assert r.headers["x-srt-worker"] not in seen
    states = fleet.worker_states()
    assert all(w["available"] and w["load"] == 0 and w["index_tokens"] > 0 for w in states)


def test_a_dead_worker_is_an_error_then_routed_around(fleet: Fleet) -> None:
    prompt = LONG_PREFIX + "A long answer please."
    body = _body(prompt, max_tokens=600, stream=True)
    with httpx.stream("POST", fleet.base + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        victim_url = r.headers["x-srt-worker"]
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        victim = next(p for p, b in fleet.workers if b == victim_url)
        victim.kill()  # the server process; its children die with it (PR_SET_PDEATHSIG)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2][len("data: ") :])["error"]
    assert err["code"] == 502 and "failed mid-stream" in err["message"], err
    victim.wait(timeout=30)
    # The same prefix again: its worker refuses connections, so the other one serves it.
    for _ in range(3):
        r = httpx.post(fleet.base + "/v1/completions", json=_body(prompt), timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-srt-worker"] != victim_url
    states = {w["url"]: w for w in fleet.worker_states()}
    assert not states[victim_url]["available"]
    assert all(w["load"] == 0 for w in states.values())
    # No worker left: a 503 with an OpenAI-style body, and /health says so.
    survivor = next(p for p, b in fleet.workers if b != victim_url)
    survivor.kill()
    survivor.wait(timeout=30)
    r = httpx.post(fleet.base + "/v1/completions", json=_body("hi"), timeout=60)
    assert r.status_code == 503, r.text
    assert r.json()["object"] == "error" and "no worker" in r.json()["message"]
    deadline = time.monotonic() + 10
    while httpx.get(fleet.base + "/health", timeout=5).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.2)
