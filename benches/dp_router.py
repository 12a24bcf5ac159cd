"""Data-parallel routing benchmark: cache-aware against round-robin, back to back, in one run.

Starts `python -m srt serve --dp-size 2` once per method on the same model and pool, and sends
both the same shared-prefix workload: many requests, each a few long "system prompts" (token
ids, picked at random per request) followed by a short question, with a few requests in flight
at a time. Each replica's KV pool holds only some of the system prompts, so where a request is
routed decides whether its prefix is still cached. Prints, per method, the prefix-cache hit
rate (the cached_tokens each response reports over its prompt tokens), request and token
throughput, and how many requests each replica got.

    python benches/dp_router.py                      # a random-weight llama built on the fly
    python benches/dp_router.py --model-path DIR     # any HF model folder
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _server import launch

# The model built when no --model-path is given: big enough that a prefill costs real time.
MODEL_SHAPE = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2)
MODEL_SHAPE |= dict(intermediate_size=768, max_position_embeddings=2048)


def start_server(model: str, method: str, args: argparse.Namespace, log: Path) -> tuple:
    flags = ["--model-path", model, "--dp-size", str(args.dp_size)]
    flags += ["--load-balance-method", method, "--max-total-tokens", str(args.pool)]
    return launch(flags, log)


def workload(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    systems = [
        [rng.randrange(3, vocab) for _ in range(args.system_len)] for _ in range(args.systems)
    ]
    prompts = []
    for _ in range(args.requests):
        question = [rng.randrange(3, vocab) for _ in range(args.question_len)]
        prompts.append(systems[rng.randrange(args.systems)] + question)
    return prompts


async def run_load(base: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    sem = asyncio.Semaphore(args.concurrency)
    totals = {"prompt": 0, "cached": 0, "completion": 0}

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> None:
        body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
        body["ignore_eos"] = True
        async with sem:
            r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        usage = r.json()["usage"]
        totals["prompt"] += usage["prompt_tokens"]
        totals["cached"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        totals["completion"] += usage["completion_tokens"]

    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        before = (await client.get("/server_info")).json()["stats"]["router"]["routed"]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, p) for p in prompts))
        elapsed = time.perf_counter() - t0
        info = (await client.get("/server_info")).json()
    return {
        **totals,
        "elapsed": elapsed,
        "routed": [a - b for a, b in zip(info["stats"]["router"]["routed"], before, strict=True)],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None)
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--pool", type=int, default=2048, help="KV pool tokens per replica")
    p.add_argument("--systems", type=int, default=6, help="distinct system prompts")
    p.add_argument("--system-len", type=int, default=512)
    p.add_argument("--question-len", type=int, default=16)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["cache_aware", "round_robin"])
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="srt-dp-bench-"))
    model = args.model_path
    if model is None:
        from srt.testing.tiny_model import make_tiny_model

        model = make_tiny_model(tmp / "model", "llama", **MODEL_SHAPE)  # type: ignore[arg-type]
        print(f"model: random-weight llama {MODEL_SHAPE}")
    else:
        print(f"model: {model}")
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(model).vocab_size)
    prompts = workload(args, vocab)
    print(
        f"workload: {args.requests} requests over {args.systems} system prompts of "
        f"{args.system_len} tokens + {args.question_len}-token questions, {args.max_tokens} "
        f"output tokens, {args.concurrency} in flight; dp {args.dp_size}, {args.pool}-token "
        f"KV pool per replica"
    )
    print(f"{'method':<14}{'hit rate':>10}{'req/s':>9}{'tok/s':>10}{'time s':>9}  routed")
    for method in args.methods:
        proc, base = start_server(model, method, args, tmp / f"{method}.log")
        try:
            asyncio.run(run_load(base, prompts[: args.concurrency * 2], args))  # warm-up
            httpx.post(base + "/flush_cache", timeout=60).raise_for_status()
            r = asyncio.run(run_load(base, prompts, args))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        hit = r["cached"] / r["prompt"]
        tok_s = (r["prompt"] + r["completion"]) / r["elapsed"]
        print(
            f"{method:<14}{hit:>10.3f}{len(prompts) / r['elapsed']:>9.2f}{tok_s:>10.0f}"
            f"{r['elapsed']:>9.2f}  {r['routed']}"
        )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
