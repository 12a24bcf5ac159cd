"""srt-kernels against the torch code they replace, on the CPU, in one process.

- attention: a decode step's attention over the paged KV pool, native (`paged_decode_attention`,
  K/V read in place through the table) against the torch path it replaces (gather the keys and
  values of every sequence, padded, then one masked SDPA), at a few shapes: the step-path
  bench's nearly free model (B 256, 4 heads / 2 KV heads of 16) and SmolLM2-135M's heads (9 /
  3 of 64) at batch 1 .. 32 and contexts up to 2000. Slots are laid out as the allocator does
  (a prompt's run contiguous, decode tokens of many requests interleaved).
- sampler: `SamplingState.sample` at batch 256, vocab 512 (the step-path bench's sampled
  workload: temperature, top-k 50, top-p 0.9, frequency penalty) and at batch 32, vocab 49152
  (SmolLM2's) with top-p alone, against the torch path (what runs on a GPU) on the same CPU.
- rope: a 256-token decode step and an 8192-token prefill of the bench model's q/k.

One torch thread unless `--threads`; the median of `--repeats` timings of `--iters` calls.

    python benches/cpu_kernels.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from srt._native import (
    FLAG_OUTPUT_PENALTY,
    FLAG_SAMPLED,
    FLAG_TOP_K_P,
    paged_decode_attention,
)
from srt.layers import sampler as S
from srt.layers.rotary import RotaryEmbedding, rotate_half


def timed(fn: Callable[[], object], iters: int, repeats: int) -> float:
    """Median ms per call."""
    for _ in range(max(2, iters // 10)):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        runs.append((time.perf_counter() - t) / iters * 1e3)
    return statistics.median(runs)


def attention(args: argparse.Namespace) -> None:
    print("attention (decode step, one layer): ms per call")
    print("| B | heads / KV heads x dim | context | dtype | gather + SDPA | native | speedup |")
    print("|---:|---|---:|---|---:|---:|---:|")
    shapes = [
        (256, 4, 2, 16, 96, torch.float32),
        (1, 9, 3, 64, 300, torch.float32),
        (32, 9, 3, 64, 300, torch.float32),
        (32, 9, 3, 64, 1000, torch.bfloat16),
        (8, 9, 3, 64, 2000, torch.float32),
    ]
    for shape in shapes:
        attention_case(args, *shape)


def attention_case(
    args: argparse.Namespace, b: int, hq: int, hkv: int, d: int, ctx: int, dtype: torch.dtype
) -> None:
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    n = b * ctx + 100
    k_buf = torch.randn(n, hkv, d, generator=g).to(dtype)
    v_buf = torch.randn(n, hkv, d, generator=g).to(dtype)
    lens = torch.randint(ctx // 2, ctx + 1, (b,), generator=g)
    lens[0] = ctx
    table = torch.zeros(b + 4, ctx + 8, dtype=torch.int32)
    prompt = ctx // 3
    for i in range(b):
        table[i, :prompt] = 1 + i * prompt + torch.arange(prompt)
        table[i, prompt:ctx] = 1 + b * prompt + torch.arange(ctx - prompt) * b + i
    rows = torch.arange(b)
    q = torch.randn(b, hq, d, generator=g).to(dtype)

    def gathered() -> torch.Tensor:
        valid = torch.arange(ctx)[None, :] < lens[:, None]
        slots = table[:, :ctx].index_select(0, rows).long().masked_fill_(~valid, 0).view(-1)
        keys = k_buf.index_select(0, slots).view(b, ctx, hkv, d).transpose(1, 2)
        values = v_buf.index_select(0, slots).view(b, ctx, hkv, d).transpose(1, 2)
        return F.scaled_dot_product_attention(
            q.view(b, hkv, hq // hkv, d), keys, values, valid[:, None, None, :], scale=d**-0.5
        )

    view = torch.int16 if dtype == torch.bfloat16 else torch.float32
    arrays = [x.view(view).numpy() for x in (q, k_buf, v_buf)]
    out = torch.empty_like(q)
    t_np, r_np, l_np, o_np = table.numpy(), rows.numpy(), lens.numpy(), out.view(view).numpy()

    def native() -> None:
        paged_decode_attention(*arrays, t_np, r_np, l_np, d**-0.5, o_np, threads)

    native()
    err = (out.float() - gathered().reshape(b, hq, d).float()).abs().max().item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
    iters = max(5, min(200, 20000 // (b * ctx // 10 + 1)))
    t_torch = timed(gathered, iters, args.repeats)
    t_native = timed(native, iters, args.repeats)
    name = str(dtype).removeprefix("torch.")
    print(
        f"| {b} | {hq} / {hkv} x {d} | {ctx} | {name} | {t_torch:.3f} | {t_native:.3f} "
        f"| {t_torch / t_native:.1f}x |"
    )


def sampler(args: argparse.Namespace) -> None:
    print("\nsampler (SamplingState.sample + record): ms per step")
    print("| batch x vocab | parameters | torch path | native (CPU path) | speedup |")
    print("|---|---|---:|---:|---:|")
    cases = [
        (256, 512, "t 0.8, top-k 50, top-p 0.9, freq 0.5", 50, 0.9, 0.5),
        (32, 49152, "t 0.7, top-p 0.95", None, 0.95, 0.0),
    ]
    for case in cases:
        sampler_case(args, *case)


def sampler_case(
    args: argparse.Namespace,
    b: int,
    vocab: int,
    label: str,
    top_k: int | None,
    top_p: float,
    freq: float,
) -> None:
    g = torch.Generator().manual_seed(1)
    state = S.SamplingState(b + 8, vocab, "cpu")
    rows = torch.arange(b)
    state.floats[rows, S.TEMPERATURE] = 0.8
    state.floats[rows, S.TOP_P] = top_p
    state.floats[rows, S.FREQUENCY] = freq
    state.top_k[rows] = top_k or vocab
    state.greedy[rows] = False
    state.seeds[rows] = rows
    flags = FLAG_SAMPLED | FLAG_TOP_K_P
    if freq:
        state.counts = torch.zeros(b + 8, vocab)
        flags |= FLAG_OUTPUT_PENALTY
    logits = torch.randn(b, vocab, generator=g) * 3
    steps = torch.full((b,), 5)
    top_k_max = top_k or vocab

    def native() -> None:
        state.record(rows, state.sample(logits, rows, steps, flags, None, None, top_k_max), flags)

    def torch_path() -> None:
        f = state.floats.index_select(0, rows)
        x = state.process_logits(logits, rows, flags)
        probs = torch.softmax(x / f[:, S.TEMPERATURE : S.TEMPERATURE + 1], dim=-1)
        probs = S._top_k_top_p(probs, state.top_k[rows], f[:, S.TOP_P], top_k_max)
        ids = S._inverse_cdf(probs, S.seeded_uniforms(state.seeds[rows], steps))
        state.record(rows, ids, flags)

    iters = 50 if vocab < 4096 else 5
    t_torch = timed(torch_path, iters, args.repeats)
    t_native = timed(native, iters, args.repeats)
    print(
        f"| {b} x {vocab} | {label} | {t_torch:.3f} | {t_native:.3f} | {t_torch / t_native:.1f}x |"
    )


def rope(args: argparse.Namespace) -> None:
    print("\nrope (q 4 heads, k 2 heads, dim 16, in place on the qkv output): ms per call")
    print("| tokens | torch expression | native | speedup |")
    print("|---:|---:|---:|---:|")
    for tokens in (256, 8192):
        rope_case(args, tokens)


def rope_case(args: argparse.Namespace, tokens: int) -> None:
    emb = RotaryEmbedding(16, 2048, 10000.0)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(tokens, 8 * 16, generator=g)
    q, k = qkv[:, :64].view(tokens, 4, 16), qkv[:, 64:96].view(tokens, 2, 16)
    positions = torch.randint(0, 2048, (tokens,), generator=g)

    def torch_expr() -> None:
        cos = emb.cos_cache[positions].unsqueeze(1)
        sin = emb.sin_cache[positions].unsqueeze(1)
        _ = (q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)

    iters = 200 if tokens < 1000 else 20
    t_torch = timed(torch_expr, iters, args.repeats)
    t_native = timed(lambda: emb(positions, q, k), iters, args.repeats)
    print(f"| {tokens} | {t_torch:.3f} | {t_native:.3f} | {t_torch / t_native:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    with torch.inference_mode():
        attention(args)
        sampler(args)
        rope(args)


if __name__ == "__main__":
    main()
