"""`python -m srt.bench offline`: throughput of the offline Engine over a whole dataset.

Runs the Engine in this process (which starts the scheduler and detokenizer processes). In: a
model, a dataset (random or ShareGPT) and any ServerArgs flag. Out: requests/s, input and
output tokens/s and the total time of the whole dataset submitted at once (the scheduler sees
every request up front, as in batch inference), printed as a table and optionally appended as
one JSON line. A progress bar counts the finished requests and their output tokens/s so far
(--disable-tqdm hides it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from typing import Any

from srt.bench.datasets import (
    BenchRequest,
    add_dataset_args,
    load_tokenizer,
    resolve_dataset_name,
    sample_requests,
)
from srt.bench.metrics import append_jsonl, format_table, make_record, summarize


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerArgs fields the command line set away from their defaults."""
    from srt.server_args import ServerArgs

    out = {}
    for f in dataclasses.fields(ServerArgs):
        value = getattr(args, f.name)
        if value != f.default:
            out[f.name] = value
    return out


def resolve_paths(args: argparse.Namespace) -> None:
    """Turns --model-path / --tokenizer-path (None: the default model; a .gguf file) into the
    HF folders srt actually loads, so the benchmark tokenizes with the Engine's tokenizer."""
    try:
        from srt.model_loader.gguf import resolve_model_paths
    except ImportError:
        if args.model_path is None:
            raise ValueError("pass --model-path") from None
        args.tokenizer_path = args.tokenizer_path or args.model_path
        return
    args.model_path, args.tokenizer_path = resolve_model_paths(args.model_path, args.tokenizer_path)


def _generate(
    engine: Any, requests: list[BenchRequest], temperature: float, progress: bool = False
) -> list[dict]:
    """Every request submitted at once, one Engine call each (so each finish can be counted);
    the outputs in the order of `requests`."""
    return asyncio.run(_generate_all(engine, requests, temperature, progress))


async def _generate_all(
    engine: Any, requests: list[BenchRequest], temperature: float, progress: bool
) -> list[dict]:
    from tqdm import tqdm

    by_ids = all(r.prompt_ids is not None for r in requests)
    generated = 0
    start = time.perf_counter()

    async def one(r: BenchRequest) -> dict:
        params = {
            "max_new_tokens": r.output_len,
            "min_new_tokens": r.output_len,
            "ignore_eos": True,
            "temperature": temperature,
        }
        if by_ids:
            out = await engine.async_generate(None, params, input_ids=r.prompt_ids)
        else:
            out = await engine.async_generate(r.prompt, params)
        nonlocal generated
        generated += out["meta_info"]["completion_tokens"]
        bar.set_postfix_str(f"{generated / (time.perf_counter() - start):.0f} output tok/s")
        bar.update(1)
        return out

    with tqdm(total=len(requests), disable=not progress, unit="req") as bar:
        return list(await asyncio.gather(*(one(r) for r in requests)))


def offline_metrics(requests: list[BenchRequest], outs: list[dict], duration: float) -> dict:
    if len(outs) != len(requests):
        raise RuntimeError(f"the Engine returned {len(outs)} outputs for {len(requests)} prompts")
    ok = [o for o in outs if (o["meta_info"].get("finish_reason") or {}).get("type") != "abort"]
    total_in = sum(o["meta_info"]["prompt_tokens"] for o in ok)
    total_out = sum(o["meta_info"]["completion_tokens"] for o in ok)
    m: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(outs) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        # Output lengths the dataset asked for and did not get: nonzero means the server ended
        # requests early (EOS, context) and the throughput is not for the intended work.
        "short_outputs": sum(
            1
            for r, o in zip(requests, outs, strict=True)
            if o in ok and o["meta_info"]["completion_tokens"] != r.output_len
        ),
    }
    lat = [o["meta_info"]["e2e_latency"] for o in ok if o["meta_info"].get("e2e_latency")]
    for stat, v in summarize(lat, scale=1000.0).items():
        m[f"{stat}_e2e_latency_ms"] = v
    return m


def offline_table(m: dict[str, Any]) -> str:
    return format_table(
        "Offline Throughput Result",
        [
            ("Successful requests:", m["completed"]),
            ("Failed requests:", m["failed"]),
            ("Total time (s):", m["duration_s"]),
            ("Total input tokens:", m["total_input_tokens"]),
            ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", m["request_throughput"]),
            ("Input token throughput (tok/s):", m["input_throughput"]),
            ("Output token throughput (tok/s):", m["output_throughput"]),
            ("Total token throughput (tok/s):", m["total_token_throughput"]),
            ("Median E2E latency (ms):", m["median_e2e_latency_ms"]),
        ],
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from srt import Engine

    resolve_dataset_name(args)
    resolve_paths(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    requests = sample_requests(args, tokenizer)
    engine = Engine(**engine_kwargs(args))
    try:
        if args.warmup_requests > 0:
            warm = [dataclasses.replace(r, output_len=min(r.output_len, 8)) for r in requests]
            _generate(engine, warm[: args.warmup_requests], args.temperature)
        print(f"{len(requests)} {args.dataset} requests, all at once", file=sys.stderr)
        t0 = time.perf_counter()
        outs = _generate(engine, requests, args.temperature, progress=not args.disable_tqdm)
        duration = time.perf_counter() - t0
    finally:
        engine.shutdown()
    m = offline_metrics(requests, outs, duration)
    print(offline_table(m))
    if args.output_file:
        append_jsonl(args.output_file, make_record("offline", args, m))
    return m


def add_args(parser: argparse.ArgumentParser) -> None:
    from srt.server_args import ServerArgs

    add_dataset_args(parser, num_prompts=1000)
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=4,
        help="Short requests run (and not measured) before the run.",
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--output-file", default=None, help="Append one JSON record per run.")
    parser.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    group = parser.add_argument_group("runtime (ServerArgs)")
    ServerArgs.add_cli_args(group)
