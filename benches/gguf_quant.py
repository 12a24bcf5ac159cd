"""GGUF weights in their blocks against dequantized bf16 and fp32 weights, on the default model.

For each mode (no flags, `--quantization gguf`, the same with `--disable-native-decode`,
`none --dtype bfloat16`, `none --dtype float32`), one
subprocess starts an `srt.Engine` on the default model (SmolLM2-135M-Instruct Q4_1, CPU), warms
it up, and times two greedy workloads: one user (1 prompt x `--output-len` tokens) and
`--users` concurrent prompts (each x `--output-len` tokens), every prompt `--input-len` random
token ids, `ignore_eos`. It also reads the resident memory (RSS) of the scheduler process, the
one holding the weights, once the model is loaded, and the greedy answer to "The capital of
France is" (a sanity check of each mode's output). Modes run `--repeats` times, interleaved,
and the table gives each one's best run, with output tok/s relative to fp32.

    python benches/gguf_quant.py
    python benches/gguf_quant.py --modes gguf bf16 --repeats 3
    python benches/gguf_quant.py --matmuls      # the per-step matmul table instead

`--matmuls` times, in this process, the matmuls of one decode step of the default model (its
30 layers' q/k/v, o, gate/up and down, and the lm_head) at batch 1 to 32: through srt's GGUF
kernels (bf16 activations in, as under `--quantization gguf --dtype bfloat16`), and as torch
bf16 and fp32 matmuls of the dequantized weights; each the fastest of many runs, so that a
shared machine's noise stays out of the comparison (the basis of `--quantization auto`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

MODES: dict[str, dict[str, str | bool]] = {
    "auto": {},  # what `srt serve` picks on this machine (see srt.model_loader.weight_format)
    "gguf": {"quantization": "gguf"},
    # the blocks through the torch forward, layer by layer (no native decode step)
    "gguf-torch": {"quantization": "gguf", "disable_native_decode": True},
    "bf16": {"quantization": "none", "dtype": "bfloat16"},
    "fp32": {"quantization": "none", "dtype": "float32"},
}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def worker(spec_path: str, out_path: str) -> None:
    """In the subprocess: one Engine, a warm-up, then the timed workloads."""
    import srt

    spec = json.loads(Path(spec_path).read_text())
    rng = random.Random(0)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(100, 40000) for _ in range(spec["input_len"])] for _ in range(n)]

    result: dict[str, object] = {}
    with srt.Engine(log_level="warning", **spec["engine_kwargs"]) as engine:
        # The scheduler is the child holding the model: the largest.
        result["scheduler_rss_mib"] = max(rss_mib(c) for c in children(os.getpid()))
        greedy = {"temperature": 0.0, "max_new_tokens": 8}
        result["answer"] = engine.generate("The capital of France is", greedy)["text"]
        base = {"temperature": 0.0, "ignore_eos": True}
        engine.generate(None, {**base, "max_new_tokens": 8}, input_ids=prompts(2))
        for name, n in (("1 user", 1), (f"{spec['users']} users", spec["users"])):
            params = {**base, "max_new_tokens": spec["output_len"]}
            t = time.perf_counter()
            outs = engine.generate(None, params, input_ids=prompts(n))
            took = time.perf_counter() - t
            tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
            result[name] = tokens / took
        result["scheduler_rss_after_mib"] = max(rss_mib(c) for c in children(os.getpid()))
    Path(out_path).write_text(json.dumps(result))


def run(mode: str, args: argparse.Namespace) -> dict:
    spec = {
        # A KV pool just big enough: its size, not the weights', would dominate the RSS.
        "engine_kwargs": {
            **MODES[mode],
            "max_total_tokens": max(2048, args.users * (args.input_len + args.output_len + 16)),
        },
        "input_len": args.input_len,
        "output_len": args.output_len,
        "users": args.users,
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, __file__, "_worker", str(spec_path), str(out_path)]
        subprocess.run(cmd, check=True, timeout=args.timeout)
        return json.loads(out_path.read_text())


def _kernels(parts: list, xb: object, out: object) -> None:
    """One layer's matmul through the GGUF kernels, bf16 in and out as a layer does it."""
    import torch

    x32 = xb.float().contiguous()  # type: ignore[attr-defined]
    col = 0
    for p in parts:
        p.multiply(x32, out, col)
        col += p.rows
    out.to(torch.bfloat16)  # type: ignore[attr-defined]


def matmul_table(threads: int) -> None:
    import torch
    import torch.nn.functional as F

    from srt.layers.quantization import KERNEL_MAX_ROWS, GGUFBlocks
    from srt.model_loader.gguf import resolve_model_paths
    from srt.model_loader.weights import iterate_gguf_blocks

    torch.set_num_threads(threads)
    weights = dict(iterate_gguf_blocks(resolve_model_paths(None, None)[0]))
    layer = "model.layers.0."
    groups = {  # name: (projections, how many per step)
        "qkv": ([f"{layer}self_attn.{p}_proj.weight" for p in "qkv"], 30),
        "o": ([f"{layer}self_attn.o_proj.weight"], 30),
        "gate_up": ([f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up")], 30),
        "down": ([f"{layer}mlp.down_proj.weight"], 30),
        "lm_head": (["model.embed_tokens.weight"], 1),
    }

    def fastest_us(f: Callable[[], object], runs: int) -> float:
        for _ in range(3):
            f()
        best = float("inf")
        for _ in range(runs):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        return best * 1e6

    totals: dict[int, list[float]] = {}
    with torch.inference_mode():
        for names, per_step in groups.values():
            parts = [GGUFBlocks(weights[n]) for n in names]
            k = parts[0].k
            dense = torch.cat([weights[n].dequantize() for n in names])
            dense_bf16 = dense.to(torch.bfloat16)
            runs = 30 if per_step == 1 else 200
            for b in (1, 2, 4, 8, 16, 32):
                assert b <= KERNEL_MAX_ROWS
                x = torch.randn(b, k)
                xb = x.to(torch.bfloat16)
                out = torch.empty(b, dense.shape[0])

                row = totals.setdefault(b, [0.0, 0.0, 0.0])
                row[0] += per_step * fastest_us(partial(_kernels, parts, xb, out), runs)
                row[1] += per_step * fastest_us(partial(F.linear, xb, dense_bf16), runs)
                row[2] += per_step * fastest_us(partial(F.linear, x, dense), runs)
    print(f"threads: {threads}; matmuls of one decode step, ms (fastest run of each)")
    print("| batch | GGUF kernels | bf16 | fp32 |")
    print("|---:|---:|---:|---:|")
    for b, (g, bf, f32) in totals.items():
        print(f"| {b} | {g / 1000:.2f} | {bf / 1000:.2f} | {f32 / 1000:.2f} |")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--matmuls", action="store_true", help="The matmul table instead.")
    parser.add_argument("--threads", type=int, default=2, help="Threads of --matmuls.")
    args = parser.parse_args()
    if args.matmuls:
        matmul_table(args.threads)
        return
    workloads = ["1 user", f"{args.users} users"]
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode in args.modes:  # interleaved: a noisy neighbour hits every mode alike
            r = run(mode, args)
            print(f"{mode}: {json.dumps(r)}", flush=True)
            if mode in best:
                for w in workloads:
                    r[w] = max(r[w], best[mode][w])
            best[mode] = r
    ref = best.get("fp32")
    print(f"cores: {len(os.sched_getaffinity(0))}")
    print("| mode | workload | output tok/s | vs fp32 | scheduler RSS (MiB) | answer |")
    print("|---|---|---:|---:|---:|---|")
    for mode, r in best.items():
        for w in workloads:
            ratio = f"{r[w] / ref[w]:.2f}x" if ref else "-"
            answer = json.dumps(r["answer"])
            rss = f"{r['scheduler_rss_mib']:.0f} / {r['scheduler_rss_after_mib']:.0f}"
            print(f"| {mode} | {w} | {r[w]:.1f} | {ratio} | {rss} | {answer} |")


if __name__ == "__main__":
    main()
