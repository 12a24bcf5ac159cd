"""Tests of the benchmarks (`srt.bench`): metrics from synthetic timings, exact-length datasets,
the Poisson arrival schedule, JSON records and plots, the serving client against a scripted
streaming server, and each tool end to end on a tiny model (those need the full runtime: the
ModelRunner, the Engine and the HTTP server; they skip while those modules are absent)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from argparse import Namespace
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _live import free_port, subprocess_env
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from srt.bench import serving
from srt.bench.datasets import (
    load_tokenizer,
    plain_token_ids,
    sample_random_requests,
    sample_sharegpt_requests,
)
from srt.bench.metrics import RequestResult, append_jsonl, make_record, serving_metrics
from srt.bench.plot import plot_serving, throughput_bins


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


NEEDS_RUNNER = pytest.mark.skipif(
    not _has("srt.model_executor.model_runner"), reason="needs the ModelRunner (merged runtime)"
)
NEEDS_ENGINE = pytest.mark.skipif(
    not (_has("srt.entrypoints.engine") and _has("srt._native")),
    reason="needs the Engine and the native module (merged runtime)",
)
NEEDS_SERVER = pytest.mark.skipif(
    not (_has("srt.entrypoints.http_server") and _has("srt._native")),
    reason="needs the HTTP server and the native module (merged runtime)",
)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_paths: dict[str, str]) -> str:
    return tiny_model_paths["llama"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: str) -> Any:
    return load_tokenizer(tiny_model)


def _env() -> dict[str, str]:
    return subprocess_env()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- datasets --------------------------------------------------------------------------------


def test_random_ids_have_exact_lengths_in_range(tokenizer) -> None:
    reqs = sample_random_requests(tokenizer, 50, 40, 12, range_ratio=0.5, seed=3)
    assert len(reqs) == 50
    plain = set(plain_token_ids(tokenizer))
    for r in reqs:
        assert r.prompt_ids is not None and len(r.prompt_ids) == r.prompt_len
        assert 20 <= r.prompt_len <= 40 and 6 <= r.output_len <= 12
        assert set(r.prompt_ids) <= plain  # no special tokens in random prompts
    assert len({r.prompt_len for r in reqs}) > 1  # the ratio really varies lengths
    again = sample_random_requests(tokenizer, 50, 40, 12, range_ratio=0.5, seed=3)
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in reqs]  # seeded


def test_random_fixed_lengths_with_ratio_one(tokenizer) -> None:
    reqs = sample_random_requests(tokenizer, 10, 33, 7, range_ratio=1.0)
    assert {(r.prompt_len, r.output_len) for r in reqs} == {(33, 7)}


def test_random_text_prompts_reencode_exactly(tokenizer) -> None:
    reqs = sample_random_requests(tokenizer, 20, 64, 8, range_ratio=0.25, prompt_format="text")
    for r in reqs:
        assert r.prompt_ids is None
        assert len(tokenizer(r.prompt).input_ids) == r.prompt_len


def test_sharegpt_filters_and_lengths(tokenizer, tmp_path: Path) -> None:
    long_answer = "the quick brown fox jumps over the lazy dog " * 8
    data = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x" * 40}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"id": "no conversations"},
    ] + [
        {
            "conversations": [
                {"from": "human", "value": f"what is the capital of france number {i}?"},
                {"from": "gpt", "value": long_answer},
            ]
        }
        for i in range(6)
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    reqs = sample_sharegpt_requests(path, tokenizer, 6, seed=0)
    want_out = len(tokenizer(long_answer, add_special_tokens=False).input_ids)
    assert len(reqs) == 6
    for r in reqs:
        assert r.prompt.startswith("what is the capital")  # the too-short one was skipped
        assert r.prompt_len == len(tokenizer(r.prompt).input_ids)
        assert r.output_len == want_out
    fixed = sample_sharegpt_requests(path, tokenizer, 3, fixed_output_len=5)
    assert {r.output_len for r in fixed} == {5}
    with pytest.raises(ValueError, match="usable conversations"):
        sample_sharegpt_requests(path, tokenizer, 7)


# ---- arrivals --------------------------------------------------------------------------------


def test_poisson_arrivals() -> None:
    n, rate = 20000, 50.0
    offsets = serving.arrival_offsets(n, rate, seed=7)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    # Exponential gaps: mean 1/rate, and std equal to the mean (coefficient of variation 1).
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert serving.arrival_offsets(n, rate, seed=7) == offsets
    assert serving.arrival_offsets(n, rate, seed=8) != offsets
    assert serving.arrival_offsets(5, math.inf, seed=0) == [0.0] * 5
    with pytest.raises(ValueError):
        serving.arrival_offsets(5, 0.0, seed=0)


# ---- metrics ---------------------------------------------------------------------------------


def _synthetic() -> list[RequestResult]:
    # Request A: 4 tokens, one per chunk, 100 ms TTFT then 20 ms apart, done at 170 ms.
    a = RequestResult(
        success=True,
        prompt_len=10,
        output_len=4,
        send_time=0.0,
        ttft=0.100,
        latency=0.170,
        chunk_times=[0.100, 0.120, 0.140, 0.160],
        chunk_tokens=[1, 1, 1, 1],
        chunk_texts=["a", "b", "c", "d"],
    )
    # Request B: 5 tokens; its last chunk holds 2 tokens after 60 ms (two ITLs of 30 ms).
    b = RequestResult(
        success=True,
        prompt_len=20,
        output_len=5,
        send_time=0.5,
        ttft=0.200,
        latency=0.400,
        chunk_times=[0.200, 0.250, 0.300, 0.360],
        chunk_tokens=[1, 1, 1, 2],
        chunk_texts=["a", "b", "c", "de"],
    )
    failed = RequestResult(success=False, prompt_len=30, error="HTTP 500: boom")
    return [a, b, failed]


def test_metrics_from_synthetic_timings() -> None:
    results = _synthetic()
    m = serving_metrics(results, duration=1.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 9)
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["output_throughput"] == pytest.approx(9.0)
    assert m["input_throughput"] == pytest.approx(30.0)
    assert m["total_token_throughput"] == pytest.approx(39.0)
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["median_ttft_ms"] == pytest.approx(150.0)
    assert m["mean_e2e_latency_ms"] == pytest.approx(285.0)
    # TPOT: A (170-100)/3 = 23.33 ms, B (400-200)/4 = 50 ms.
    assert m["mean_tpot_ms"] == pytest.approx((70 / 3 + 50) / 2)
    # ITL: A 20,20,20; B 50,50,30,30.
    itl = [20, 20, 20, 50, 50, 30, 30]
    assert m["mean_itl_ms"] == pytest.approx(statistics.fmean(itl))
    assert m["median_itl_ms"] == pytest.approx(30.0)
    assert m["max_itl_ms"] == pytest.approx(50.0)
    assert m["p99_itl_ms"] >= m["median_itl_ms"]
    assert m["concurrency"] == pytest.approx(0.57)
    assert m["errors"] == ["HTTP 500: boom"]


def test_metrics_with_no_success_and_one_token_outputs() -> None:
    m = serving_metrics([RequestResult(success=False, prompt_len=5)], duration=2.0)
    assert m["completed"] == 0 and m["failed"] == 1 and m["mean_ttft_ms"] is None
    one = RequestResult(True, 5, 1, ttft=0.1, latency=0.1, chunk_times=[0.1], chunk_tokens=[1])
    m = serving_metrics([one], duration=1.0)
    assert m["mean_tpot_ms"] is None and m["mean_itl_ms"] is None
    assert m["mean_ttft_ms"] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        serving_metrics([one], duration=0.0)


def test_json_record_shape(tmp_path: Path) -> None:
    m = serving_metrics(_synthetic(), duration=1.0)
    path = tmp_path / "out.jsonl"
    args = Namespace(base_url="http://x", num_prompts=3, request_rate=math.inf)
    append_jsonl(path, make_record("serving", args, m))
    append_jsonl(path, make_record("serving", args, m))
    records = _records(path)
    assert len(records) == 2
    rec = records[0]
    assert rec["tool"] == "serving" and rec["args"]["num_prompts"] == 3
    assert rec["args"]["request_rate"] == "inf"  # JSON has no infinity; kept readable
    assert rec["date"][:2] == "20" and rec["completed"] == 2
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        for stat in ("mean", "median", "p90", "p99"):
            assert f"{stat}_{key}" in rec


def test_plot_file_written(tmp_path: Path) -> None:
    results = _synthetic()
    times, tok_s = throughput_bins(results, duration=1.0, bin_s=0.25)
    assert list(times) == [0.0, 0.25, 0.5, 0.75]
    # A's 4 tokens land in [0, 0.25); B's chunks at 0.7, 0.75, 0.8, 0.86 s.
    assert list(tok_s * 0.25) == [4.0, 0.0, 1.0, 4.0]
    path = tmp_path / "plot.png"
    plot_serving(results, 1.0, path, title="synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ---- offline: metrics over Engine-shaped outputs ----------------------------------------------


class _FakeEngine:
    """Records how `async_generate` was called; answers like the Engine (SGLang-shaped dicts),
    the second request first."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def async_generate(
        self, prompt: str | None, sampling_params: dict, input_ids: list[int] | None = None
    ) -> dict:
        i = len(self.calls)
        self.calls.append((prompt, sampling_params, input_ids))
        await asyncio.sleep(0.01 if i != 1 else 0)  # finishes out of order
        q = input_ids if input_ids is not None else prompt
        n = sampling_params["max_new_tokens"]
        return {
            "text": "x",
            "output_ids": [1] * n,
            "meta_info": {
                "id": str(i),
                "prompt_tokens": len(q),
                "completion_tokens": n - (i == 1),  # one ends early
                "cached_tokens": 0,
                "finish_reason": {"type": "abort"} if i == 2 else {"type": "length"},
                "e2e_latency": 0.5 + i,
            },
        }


def test_offline_metrics_and_calls(tokenizer) -> None:
    from srt.bench.offline import _generate, offline_metrics

    reqs = sample_random_requests(tokenizer, 4, 10, 5)
    engine = _FakeEngine()
    outs = _generate(engine, reqs, temperature=0.0, progress=True)
    # One call per request, all at once, exact token-id prompts; outputs in request order.
    assert [(p, ids) for p, _, ids in engine.calls] == [(None, r.prompt_ids) for r in reqs]
    assert [o["meta_info"]["id"] for o in outs] == ["0", "1", "2", "3"]
    assert engine.calls[0][1] == {
        "max_new_tokens": 5,
        "min_new_tokens": 5,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    m = offline_metrics(reqs, outs, duration=2.0)
    assert (m["completed"], m["failed"], m["short_outputs"]) == (3, 1, 1)
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 14
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(7.0)
    assert m["median_e2e_latency_ms"] == pytest.approx(1500.0)
    text_reqs = sample_random_requests(tokenizer, 2, 10, 5, prompt_format="text")
    _generate(engine, text_reqs, temperature=0.0)
    assert [(p, ids) for p, _, ids in engine.calls[-2:]] == [(r.prompt, None) for r in text_reqs]
    with pytest.raises(RuntimeError):
        offline_metrics(reqs, outs[:3], duration=1.0)


def test_engine_kwargs_keeps_only_set_flags() -> None:
    from srt.bench.__main__ import build_parser
    from srt.bench.offline import engine_kwargs

    argv = ["offline", "--model-path", "m", "--max-total-tokens", "2048", "--num-prompts", "3"]
    args = build_parser("offline").parse_args(argv)
    assert engine_kwargs(args) == {"model_path": "m", "max_total_tokens": 2048}
    # one-batch shares the ServerArgs flags; argparse refuses a clash when the parser is built.
    argv = ["one-batch", "--batch-size", "1", "8", "--load-format", "dummy", "--dtype", "bfloat16"]
    args = build_parser("one-batch").parse_args(argv)
    assert args.batch_size == [1, 8] and args.load_format == "dummy" and args.input_len == [1024]


# ---- the serving client against a scripted streaming server ---------------------------------

TOKEN_DELAY = 0.01


def _fake_app() -> FastAPI:
    """Streams `max_tokens` one-token chunks TOKEN_DELAY apart, with usage at the end (like
    srt/vLLM/SGLang); /generate streams cumulative text with completion_tokens. The third
    completion request gets an HTTP 500."""
    app = FastAPI()
    seen = {"n": 0, "bodies": []}
    app.state.seen = seen

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        seen["n"] += 1
        seen["bodies"].append(body)
        if seen["n"] == 3:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        n_prompt = len(body["prompt"]) if isinstance(body["prompt"], list) else -1

        async def stream() -> AsyncIterator[str]:
            for i in range(body["max_tokens"]):
                await asyncio.sleep(TOKEN_DELAY)
                chunk = {"choices": [{"index": 0, "text": f" w{i}", "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": n_prompt, "completion_tokens": body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await request.json()
        n = body["sampling_params"]["max_new_tokens"]

        async def stream() -> AsyncIterator[str]:
            text = ""
            for i in range(0, n, 2):  # two tokens per chunk
                await asyncio.sleep(TOKEN_DELAY)
                text += f" w{i} w{i + 1}"
                done = min(i + 2, n)
                meta = {"prompt_tokens": len(body["input_ids"]), "completion_tokens": done}
                yield f"data: {json.dumps({'text': text, 'meta_info': meta})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@pytest.fixture
def fake_server() -> Iterator[tuple[str, dict]]:
    import uvicorn

    app = _fake_app()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "fake server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.state.seen
    server.should_exit = True
    thread.join(timeout=10)


def _serving_args(base_url: str, tokenizer_path: str, out: Path, **kw: object) -> list[str]:
    argv = [
        "serving",
        "--base-url",
        base_url,
        "--tokenizer",
        tokenizer_path,
        "--num-prompts",
        "8",
        "--input-len",
        "24",
        "--output-len",
        "6",
        "--warmup-requests",
        "0",
        "--output-file",
        str(out),
        "--disable-tqdm",
    ]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def test_serving_client_against_fake_server(fake_server, tiny_model: str, tmp_path: Path) -> None:
    from srt.bench.__main__ import main

    url, seen = fake_server
    out, png = tmp_path / "serving.jsonl", tmp_path / "serving.png"
    argv = _serving_args(url, tiny_model, out, max_concurrency=4, plot=png)
    assert main(argv) == 0
    (rec,) = _records(out)
    assert rec["args"]["model"] == "fake-model"  # from /v1/models
    assert (rec["completed"], rec["failed"]) == (7, 1)  # the server failed request 3
    assert rec["total_input_tokens"] == 7 * 24 and rec["total_output_tokens"] == 7 * 6
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert 0 < rec[f"median_{key}"] <= rec[f"p99_{key}"] <= rec[f"max_{key}"]
    # Tokens come TOKEN_DELAY apart; the client must not see them much faster.
    assert rec["median_itl_ms"] >= TOKEN_DELAY * 1000 * 0.8
    assert rec["mean_tpot_ms"] >= TOKEN_DELAY * 1000 * 0.8
    assert rec["mean_e2e_latency_ms"] >= rec["mean_ttft_ms"]
    assert rec["output_throughput"] == pytest.approx(42 / rec["duration_s"], rel=1e-9)
    body = seen["bodies"][0]
    assert len(body["prompt"]) == 24 and body["max_tokens"] == 6  # exact token-id prompt
    assert body["ignore_eos"] is True and body["min_tokens"] == 6 and body["stream"] is True
    assert png.stat().st_size > 10_000


def test_serving_client_generate_backend(fake_server, tiny_model: str, tmp_path: Path) -> None:
    from srt.bench.__main__ import main

    url, _ = fake_server
    out = tmp_path / "gen.jsonl"
    assert main(_serving_args(url, tiny_model, out, backend="generate", model="m")) == 0
    (rec,) = _records(out)
    assert (rec["completed"], rec["failed"]) == (8, 0)
    assert rec["total_output_tokens"] == 8 * 6
    # Two tokens per chunk, TOKEN_DELAY apart: each token's ITL is half the gap (5 ms), close to
    # TPOT (2 gaps over 5 tokens, 4 ms); unsplit chunk gaps would be 2.5x TPOT.
    assert rec["median_itl_ms"] >= TOKEN_DELAY * 1000 * 0.4
    assert rec["median_itl_ms"] <= 1.6 * rec["median_tpot_ms"]


def test_request_rate_spreads_sends(fake_server, tiny_model: str) -> None:
    url, _ = fake_server
    tok = load_tokenizer(tiny_model)
    reqs = sample_random_requests(tok, 6, 8, 2)
    args = Namespace(
        backend="openai",
        base_url=url,
        model="m",
        temperature=0.0,
        disable_ignore_eos=True,
        extra_body={},
        max_concurrency=None,
    )
    offsets = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    results, duration = asyncio.run(serving.run_requests(args, reqs, offsets))
    sends = [r.send_time for r in results]
    for sent, due in zip(sends, offsets, strict=True):
        assert due <= sent < due + 0.3  # never early; late only by scheduling noise
    assert duration >= 0.5


# ---- end to end on a tiny model (merged runtime) ---------------------------------------------


@pytest.fixture(scope="module")
def live_server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "srt", "serve", "--model-path", tiny_model, "--port", str(port),
           "--device", "cpu", "--max-total-tokens", "4096"]  # fmt: skip
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_bench(argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "srt.bench", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@NEEDS_SERVER
def test_serving_bench_live_srt(live_server: str, tiny_model: str, tmp_path: Path) -> None:
    out, png = tmp_path / "serving.jsonl", tmp_path / "serving.png"
    argv = _serving_args(live_server, tiny_model, out, request_rate=20, plot=png)
    proc = _run_bench(argv + ["--warmup-requests", "1"])
    assert "Serving Benchmark Result" in proc.stdout
    (rec,) = _records(out)
    assert (rec["completed"], rec["failed"]) == (8, 0)
    assert rec["total_input_tokens"] == 8 * 24  # the server counted the exact prompt length
    assert rec["total_output_tokens"] == 8 * 6  # ignore_eos + min_tokens held
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert 0 < rec[f"median_{key}"] <= rec[f"p99_{key}"]
    assert rec["output_throughput"] == pytest.approx(48 / rec["duration_s"], rel=1e-9)
    assert png.stat().st_size > 10_000


@NEEDS_RUNNER
def test_one_batch_tiny(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "one.jsonl"
    argv = ["one-batch", "--model-path", tiny_model, "--batch-size", "1", "4", "--input-len",
            "16", "--output-len", "5", "--device", "cpu", "--max-total-tokens", "512",
            "--output-file", str(out), "--disable-tqdm"]  # fmt: skip
    proc = _run_bench(argv)
    assert "prefill tok/s" in proc.stdout
    recs = _records(out)
    assert [r["batch_size"] for r in recs] == [1, 4]
    for r in recs:
        assert r["tool"] == "one-batch" and r["input_len"] == 16 and r["output_len"] == 5
        assert r["prefill_latency_ms"] > 0 and r["median_decode_ms"] > 0
        want = r["batch_size"] * 16 / (r["prefill_latency_ms"] / 1000)
        assert r["prefill_throughput"] == pytest.approx(want, rel=1e-9)
        assert r["decode_throughput"] == pytest.approx(
            r["batch_size"] / (r["median_decode_ms"] / 1000), rel=1e-9
        )


@NEEDS_ENGINE
def test_offline_tiny(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "offline.jsonl"
    argv = ["offline", "--model-path", tiny_model, "--num-prompts", "8", "--input-len", "20",
            "--output-len", "6", "--range-ratio", "0.5", "--device", "cpu",
            "--max-total-tokens", "2048", "--output-file", str(out)]  # fmt: skip
    proc = _run_bench(argv)
    assert "Offline Throughput Result" in proc.stdout
    assert "8/8" in proc.stderr  # the progress bar reached every request
    (rec,) = _records(out)
    assert (rec["completed"], rec["failed"], rec["short_outputs"]) == (8, 0, 0)
    assert 8 * 10 <= rec["total_input_tokens"] <= 8 * 20
    assert rec["request_throughput"] == pytest.approx(8 / rec["duration_s"], rel=1e-9)
    assert rec["output_throughput"] == pytest.approx(
        rec["total_output_tokens"] / rec["duration_s"], rel=1e-9
    )


def test_plot_without_matplotlib_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found before the run (nothing is sent: the URL is never reached).
    from srt.bench.__main__ import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    argv = ["serving", "--base-url", "http://127.0.0.1:9", "--model", "m", "--plot", "x.png"]
    assert main(argv) == 1
    assert "pip install 'srt[bench]'" in capsys.readouterr().err


@NEEDS_SERVER
def test_serving_bench_takes_the_tokenizer_from_the_server(
    live_server: str, tiny_model: str, tmp_path: Path
) -> None:
    from srt.bench.serving import fetch_tokenizer_path

    # The live server serves tiny_model: it reports its tokenizer folder, so no --tokenizer.
    assert fetch_tokenizer_path(live_server) == tiny_model
    assert fetch_tokenizer_path("http://127.0.0.1:9") is None  # nothing there
    out = tmp_path / "serving.jsonl"
    argv = _serving_args(live_server, tiny_model, out)
    i = argv.index("--tokenizer")
    proc = _run_bench(argv[:i] + argv[i + 2 :])
    assert "Serving Benchmark Result" in proc.stdout
    (rec,) = _records(out)
    assert (rec["completed"], rec["failed"]) == (8, 0)
