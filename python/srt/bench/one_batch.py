"""`python -m srt.bench one-batch`: latency of one static batch through the ModelRunner alone.

Runs in one process, without the server, scheduler or tokenizer. In: a model (real weights, or
`--load-format dummy` for random weights from config.json), batch sizes, input and output
lengths. Out: per shape, the prefill latency and the per-step decode latency (median over the
steps), printed as a table and optionally appended as JSON lines.

The batch is fixed: every sequence gets a ReqToTokenPool row and a contiguous run of KV slots
for its whole length, written into `req_to_token` up front, the way the scheduler would have.
Each step's argmax feeds the next (greedy), and host<->device work the scheduler does per step
(building the ForwardBatch, reading back the next ids) is inside the timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from srt.bench.metrics import append_jsonl, make_record


@dataclass
class Bench:
    runner: Any  # ModelRunner
    model_config: Any  # ModelConfig
    server_args: Any  # ServerArgs


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_once(
    bench: Bench,
    batch_size: int,
    input_len: int,
    output_len: int,
    seed: int,
    show_progress: bool = False,
) -> dict[str, Any]:
    """One prefill of `batch_size` x `input_len` random tokens, then `output_len - 1` decode
    steps (the prefill already yields the first output token)."""
    import torch
    from tqdm import tqdm

    from srt.model_executor.forward_batch import ForwardBatch

    runner = bench.runner
    pool = runner.req_to_token_pool
    seq_len = input_len + output_len
    page = bench.server_args.page_size
    first_slot = page  # page 0 is reserved
    # NOTE: each sequence starts on a page boundary, as the allocator would place it.
    stride = -(-seq_len // page) * page
    if batch_size * stride > runner.max_total_num_tokens:
        raise ValueError(
            f"batch {batch_size} x {seq_len} tokens needs {batch_size * stride} KV slots; the "
            f"pool holds {runner.max_total_num_tokens} (raise --max-total-tokens)"
        )
    if seq_len > pool.req_to_token.shape[1]:
        raise ValueError(
            f"{seq_len} tokens per sequence exceed the context length "
            f"{pool.req_to_token.shape[1]} (pass --context-length)"
        )
    if batch_size > pool.pad_row:
        raise ValueError(
            f"batch {batch_size} exceeds the ReqToTokenPool (raise --max-running-requests)"
        )
    rows = list(range(batch_size))
    slots = [
        list(range(first_slot + i * stride, first_slot + i * stride + seq_len))
        for i in range(batch_size)
    ]
    dev = pool.req_to_token.device
    for row, s in zip(rows, slots, strict=True):
        pool.req_to_token[row, :seq_len] = torch.tensor(s, dtype=torch.int32, device=dev)
    gen = torch.Generator().manual_seed(seed)
    vocab = bench.model_config.vocab_size
    input_ids = torch.randint(0, vocab, (batch_size * input_len,), generator=gen).tolist()

    with torch.inference_mode():
        _sync(runner.device)
        t0 = time.perf_counter()
        batch = ForwardBatch.extend(
            input_ids,
            [x for s in slots for x in s[:input_len]],
            rows,
            [0] * batch_size,
            [input_len] * batch_size,
            device=runner.device,
        )
        next_ids = runner.forward(batch).argmax(dim=-1).tolist()
        _sync(runner.device)
        prefill = time.perf_counter() - t0

        steps: list[float] = []
        for step in tqdm(
            range(output_len - 1),
            disable=not show_progress,
            leave=False,
            desc=f"decode bs={batch_size}",
        ):
            pos = input_len + step  # position of the token fed in this step
            t1 = time.perf_counter()
            batch = ForwardBatch.decode(
                next_ids,
                [s[pos] for s in slots],
                rows,
                [pos + 1] * batch_size,
                device=runner.device,
            )
            next_ids = runner.forward(batch).argmax(dim=-1).tolist()
            _sync(runner.device)
            steps.append(time.perf_counter() - t1)

    total = prefill + sum(steps)
    median = statistics.median(steps) if steps else None
    return {
        "batch_size": batch_size,
        "input_len": input_len,
        "output_len": output_len,
        "prefill_latency_ms": prefill * 1000,
        "prefill_throughput": batch_size * input_len / prefill,
        "median_decode_ms": median * 1000 if median is not None else None,
        "mean_decode_ms": statistics.fmean(steps) * 1000 if steps else None,
        "decode_throughput": batch_size / median if median else None,
        "total_latency_s": total,
        "overall_throughput": batch_size * seq_len / total,
    }


def build_runner(args: argparse.Namespace) -> Bench:
    from srt.configs.model_config import ModelConfig
    from srt.model_executor.model_runner import ModelRunner
    from srt.server_args import ServerArgs

    server_args = ServerArgs.from_cli_args(args)
    if server_args.world_size > 1 or server_args.dp_size > 1:
        raise ValueError(
            "one-batch runs the model in this process, as one rank; measure --tp-size, "
            "--pp-size or --dp-size with `srt.bench offline` or `serving`"
        )
    try:
        from srt.model_loader.gguf import resolve_model_paths
    except ImportError:
        if server_args.model_path is None:
            raise ValueError("pass --model-path") from None
    else:
        model_dir, tok_dir = resolve_model_paths(server_args.model_path, server_args.tokenizer_path)
        server_args = server_args.replace(model_path=model_dir, tokenizer_path=tok_dir)
    model_config = ModelConfig(
        server_args.model_path,
        context_length=server_args.context_length,
        dtype=server_args.dtype,
        device=server_args.device,
    )
    return Bench(ModelRunner(model_config, server_args), model_config, server_args)


def _row(r: dict[str, Any]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    return (
        f"{r['batch_size']:>6} {r['input_len']:>7} {r['output_len']:>7} "
        f"{f(r['prefill_latency_ms'], '12.2f')} {f(r['prefill_throughput'], '13.1f')} "
        f"{f(r['median_decode_ms'], '12.2f')} {f(r['decode_throughput'], '12.1f')}"
    )


HEADER = (
    f"{'batch':>6} {'input':>7} {'output':>7} {'prefill ms':>12} {'prefill tok/s':>13} "
    f"{'decode ms':>12} {'decode tok/s':>12}"
)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    for name in ("batch_size", "input_len", "output_len"):
        if any(v < 1 for v in getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} values must be >= 1")
    bench = build_runner(args)
    runner = bench.runner
    print(
        f"model {bench.server_args.model_path} on {runner.device}, "
        f"{str(runner.dtype).removeprefix('torch.')}, KV pool {runner.max_total_num_tokens} tokens",
        file=sys.stderr,
    )
    print(HEADER)
    out = []
    for bs in args.batch_size:
        for n_in in args.input_len:
            for n_out in args.output_len:
                # Warmup: same batch and prompt shape (kernel selection, JIT, allocator), short.
                run_once(bench, bs, n_in, min(n_out, 4), seed=args.seed)
                r = run_once(
                    bench, bs, n_in, n_out, seed=args.seed, show_progress=not args.disable_tqdm
                )
                print(_row(r), flush=True)
                r.update(device=str(runner.device), dtype=str(runner.dtype).removeprefix("torch."))
                if args.output_file:
                    append_jsonl(args.output_file, make_record("one-batch", args, r))
                out.append(r)
    return out


def add_args(parser: argparse.ArgumentParser) -> None:
    from srt.server_args import ServerArgs

    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, nargs="+", default=[1024])
    parser.add_argument("--output-len", type=int, nargs="+", default=[16])
    parser.add_argument("--seed", type=int, default=1, help="Seed of the random prompts.")
    parser.add_argument("--output-file", default=None, help="Append one JSON record per shape.")
    parser.add_argument("--disable-tqdm", action="store_true")
    group = parser.add_argument_group("runtime (ServerArgs)")
    ServerArgs.add_cli_args(group)
