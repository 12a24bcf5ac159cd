"""`python -m srt.bench serving`: load test of a running server, measured from the client.

Runs in its own process against any OpenAI-compatible server (srt, SGLang, vLLM) over HTTP.
In: a base URL, a dataset (random or ShareGPT), an arrival process (Poisson at --request-rate, or
everything at once) and a concurrency cap. Out: a table on stdout, optionally one JSON record
appended to --output-file and a PNG of latency distributions and throughput over time.

Requests stream (`/v1/completions` with `stream: true`, or SGLang-style `/generate`); the client
timestamps every chunk carrying output. The exact output length is asked for with `max_tokens`
plus `ignore_eos` and `min_tokens` (extensions srt, SGLang and vLLM accept).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from srt.bench.datasets import (
    BenchRequest,
    add_dataset_args,
    load_tokenizer,
    resolve_dataset_name,
    sample_requests,
)
from srt.bench.metrics import (
    RequestResult,
    append_jsonl,
    make_record,
    serving_metrics,
    serving_table,
)

BACKENDS = ("openai", "generate")


def arrival_offsets(n: int, request_rate: float, seed: int) -> list[float]:
    """Send times (seconds after the start) of `n` requests: a Poisson process of rate
    `request_rate` (exponential gaps, the first request at 0), or all at 0 for an infinite rate."""
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be positive, got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for i in range(n):
        if i > 0:
            t += rng.expovariate(request_rate)
        offsets.append(t)
    return offsets


# ---- one request -----------------------------------------------------------------------------


def _payload(args: argparse.Namespace, req: BenchRequest) -> tuple[str, dict[str, Any]]:
    prompt: Any = req.prompt_ids if req.prompt_ids is not None else req.prompt
    if args.backend == "openai":
        body: dict[str, Any] = {
            "model": args.model,
            "prompt": prompt,
            "max_tokens": req.output_len,
            "temperature": args.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if not args.disable_ignore_eos:
            body.update(ignore_eos=True, min_tokens=req.output_len)
        path = "/v1/completions"
    else:
        params: dict[str, Any] = {"max_new_tokens": req.output_len, "temperature": args.temperature}
        if not args.disable_ignore_eos:
            params.update(ignore_eos=True, min_new_tokens=req.output_len)
        key = "input_ids" if req.prompt_ids is not None else "text"
        body = {key: prompt, "sampling_params": params, "stream": True}
        path = "/generate"
    body.update(args.extra_body)
    return args.base_url.rstrip("/") + path, body


async def _sse_events(resp: httpx.Response) -> Any:
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def send_request(
    client: httpx.AsyncClient, args: argparse.Namespace, req: BenchRequest, bench_start: float
) -> RequestResult:
    """Sends one streaming request and timestamps every chunk that carries output."""
    url, body = _payload(args, req)
    res = RequestResult(success=False, prompt_len=req.prompt_len)
    t0 = time.perf_counter()
    res.send_time = t0 - bench_start
    usage_out: int | None = None
    gen_text, gen_tokens = "", 0  # /generate: cumulative text and completion_tokens so far
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:300]
                res.error = f"HTTP {resp.status_code}: {detail}"
                return res
            async for ev in _sse_events(resp):
                now = time.perf_counter() - t0
                if "error" in ev:
                    res.error = f"server error: {json.dumps(ev['error'])[:300]}"
                    return res
                if args.backend == "openai":
                    if ev.get("usage"):
                        usage_out = ev["usage"].get("completion_tokens", usage_out)
                        res.prompt_len = ev["usage"].get("prompt_tokens") or res.prompt_len
                    choices = ev.get("choices") or []
                    text = (choices[0].get("text") or "") if choices else ""
                    n_tok = 0  # unknown here: counted from the text after the run
                else:
                    text = ev.get("text", "")
                    meta = ev.get("meta_info") or {}
                    # SGLang streams the cumulative text by default; take the new part.
                    if gen_text and text.startswith(gen_text):
                        text, gen_text = text[len(gen_text) :], text
                    else:
                        gen_text += text
                    done = meta.get("completion_tokens", gen_tokens)
                    n_tok, gen_tokens = done - gen_tokens, done
                    usage_out = done if "completion_tokens" in meta else usage_out
                    res.prompt_len = meta.get("prompt_tokens") or res.prompt_len
                    if not text and n_tok == 0:
                        continue
                if not text and args.backend == "openai":
                    continue
                if not res.chunk_times:
                    res.ttft = now
                res.chunk_times.append(now)
                res.chunk_texts.append(text)
                res.chunk_tokens.append(n_tok)
        res.latency = time.perf_counter() - t0
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    if not res.chunk_times:
        res.error = "the response carried no output"
        return res
    res.output_len = usage_out if usage_out is not None else -1
    res.success = True
    return res


def count_chunk_tokens(results: list[RequestResult], tokenizer: Any) -> None:
    """Fills in output and per-chunk token counts the server did not report (after the run,
    so tokenizing never delays the client while it measures)."""
    for r in results:
        if not r.success:
            continue
        if r.output_len < 0:
            r.output_len = len(tokenizer(r.text, add_special_tokens=False).input_ids)
        if all(n > 0 for n in r.chunk_tokens):
            continue  # the server said how many tokens each chunk held
        if len(r.chunk_times) == r.output_len:
            r.chunk_tokens = [1] * len(r.chunk_times)  # one token per chunk: exact
        else:
            r.chunk_tokens = [
                max(1, len(tokenizer(t, add_special_tokens=False).input_ids)) for t in r.chunk_texts
            ]


# ---- the run ---------------------------------------------------------------------------------


async def run_requests(
    args: argparse.Namespace,
    requests: list[BenchRequest],
    offsets: list[float],
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Sends `requests[i]` at `offsets[i]` (or later, when --max-concurrency requests are
    already in flight); returns the results in request order and the run's duration."""
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    # NOTE: no connection cap (httpx's default of 100 would silently cap the concurrency) and
    # no timeout (a slow response is a measurement, not an error).
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        trust_env=False,
    ) as client:
        start = time.perf_counter()

        async def one(req: BenchRequest, offset: float) -> RequestResult:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is None:
                res = await send_request(client, args, req, start)
            else:
                async with limit:
                    res = await send_request(client, args, req, start)
            if on_done is not None:
                on_done(res)
            return res

        results = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets, strict=True)))
        duration = time.perf_counter() - start
    return list(results), duration


def fetch_model_id(base_url: str) -> str:
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30.0, trust_env=False)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return data[0]["id"]


def fetch_tokenizer_path(base_url: str) -> str | None:
    """The tokenizer folder an srt (or SGLang) server reports at /get_model_info, when it
    exists on this machine; None otherwise (another server, or a remote one)."""
    try:
        resp = httpx.get(base_url.rstrip("/") + "/get_model_info", timeout=30.0, trust_env=False)
        resp.raise_for_status()
        path = resp.json().get("tokenizer_path")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return path if isinstance(path, str) and os.path.isdir(path) else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    resolve_dataset_name(args)
    if args.plot:
        from srt.bench.plot import require_matplotlib

        require_matplotlib()
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if args.model is None:
        args.model = fetch_model_id(args.base_url)
    # NOTE: the server's own tokenizer when it tells us where it is, so nothing is looked up
    # under the model's name (which would be a hub id).
    tokenizer_path = args.tokenizer or fetch_tokenizer_path(args.base_url) or args.model
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except Exception as e:
        raise RuntimeError(
            f"cannot load a tokenizer from {tokenizer_path!r} ({type(e).__name__}: {e}); pass "
            f"--tokenizer with the server's tokenizer folder"
        ) from e
    requests = sample_requests(args, tokenizer)

    if args.warmup_requests > 0:
        warm = [requests[i % len(requests)] for i in range(args.warmup_requests)]
        warm_results, _ = asyncio.run(run_requests(args, warm, [0.0] * len(warm)))
        failed = [r for r in warm_results if not r.success]
        if failed:
            raise RuntimeError(f"warmup request failed: {failed[0].error}")

    offsets = arrival_offsets(len(requests), args.request_rate, args.seed)
    print(
        f"{args.num_prompts} {args.dataset} requests to {args.base_url} ({args.backend}), "
        f"rate {args.request_rate}, max concurrency {args.max_concurrency or 'none'}",
        file=sys.stderr,
    )
    with tqdm(total=len(requests), disable=args.disable_tqdm, unit="req") as bar:
        results, duration = asyncio.run(
            run_requests(args, requests, offsets, on_done=lambda _r: bar.update(1))
        )
    count_chunk_tokens(results, tokenizer)
    metrics = serving_metrics(results, duration)
    print(serving_table(metrics))
    if args.output_file:
        record = make_record("serving", args, metrics)
        if args.output_details:
            record["details"] = [
                {
                    "send_time": r.send_time,
                    "prompt_len": r.prompt_len,
                    "output_len": r.output_len,
                    "ttft": r.ttft,
                    "latency": r.latency,
                    "itl": r.itl,
                    "error": r.error,
                }
                for r in results
            ]
        append_jsonl(args.output_file, record)
    if args.plot:
        from srt.bench.plot import plot_serving

        plot_serving(results, duration, args.plot, title=f"{args.model} @ {args.base_url}")
    return metrics


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:30000", help="Server URL.")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="openai",
        help="openai: /v1/completions; generate: SGLang-style /generate.",
    )
    parser.add_argument("--model", default=None, help="Model name (default: first of /v1/models).")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="Tokenizer folder (default: the one the server reports at /get_model_info when "
        "it is on this machine, else the model name as a local path). Never downloaded.",
    )
    add_dataset_args(parser, num_prompts=200)
    parser.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Requests per second (Poisson arrivals); inf sends all at once.",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=None, help="Most requests in flight at once."
    )
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=1,
        help="Requests sent (and not measured) before the run.",
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--disable-ignore-eos",
        action="store_true",
        help="Do not send ignore_eos/min_tokens (for servers that reject them).",
    )
    parser.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        help="JSON object merged into every request body.",
    )
    parser.add_argument("--output-file", default=None, help="Append one JSON record per run.")
    parser.add_argument(
        "--output-details",
        action="store_true",
        help="Include per-request timings in the JSON record.",
    )
    parser.add_argument("--plot", default=None, help="Write latency/throughput plots (PNG).")
    parser.add_argument("--disable-tqdm", action="store_true")
