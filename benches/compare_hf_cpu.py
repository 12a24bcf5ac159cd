"""CPU throughput of srt's offline Engine against HF transformers' `generate`, same model, same
prompts, one run; also checks that the greedy outputs agree token for token.

Usage:
    python benches/compare_hf_cpu.py                      # the default SmolLM2 GGUF model
    python benches/compare_hf_cpu.py --model-path DIR --num-prompts 8 --output-len 64

Both sides get the same token ids (tokenized once here), decode greedily and produce exactly
--output-len tokens: EOS neither stops nor is masked (srt: `ignore_eos`; HF: no EOS in the
generation config). HF runs the prompts the way a user would: one `generate` call over the
left-padded batch (--hf-mode batched, the default) or one call per prompt (sequential). srt gets
them all in one `Engine.generate` call. Each side runs a short warmup first. Prints the table and
exits 1 when a greedy output differs (unless --allow-mismatch).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in one paragraph why the sky is blue.",
    "List three uses of a paperclip:",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the river,",
    "The three primary colors are",
    "Translate to French: I would like a cup of coffee.",
    "What is 17 times 23? Let's think step by step.",
    "A good name for a cat is",
    "The main difference between a list and a tuple in Python is",
    "Summer is my favourite season because",
]


def resolve_model(model_path: str | None) -> tuple[str, str]:
    """(model folder, tokenizer folder): srt's own resolution (the default GGUF model when no
    path is given; a .gguf file is converted once to an HF folder), else the path as given."""
    try:
        from srt.model_loader.gguf import resolve_model_paths
    except ImportError:
        if model_path is None:
            sys.exit("error: srt cannot resolve the default model here; pass --model-path")
        return model_path, model_path
    return resolve_model_paths(model_path, None)


def run_srt(model_dir: str, prompts: list[list[int]], n: int, args: argparse.Namespace) -> Any:
    from srt import Engine

    params = {"max_new_tokens": n, "ignore_eos": True, "temperature": 0.0}
    engine = Engine(model_path=model_dir, device="cpu", dtype=args.dtype)
    try:
        warm = {**params, "max_new_tokens": 2}
        engine.generate(None, [warm] * len(prompts), input_ids=prompts)  # warmup, same batch
        t0 = time.perf_counter()
        outs = engine.generate(None, [params] * len(prompts), input_ids=prompts)
        elapsed = time.perf_counter() - t0
    finally:
        engine.shutdown()
    return [list(o["output_ids"]) for o in outs], elapsed


def run_hf(model_dir: str, prompts: list[list[int]], n: int, args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen_cfg = copy.deepcopy(model.generation_config)
    # ignore_eos: with no EOS in the config, HF neither stops at it nor masks it.
    gen_cfg.eos_token_id = []
    gen_cfg.update(do_sample=False, max_new_tokens=n, pad_token_id=pad, temperature=None,
                   top_p=None, top_k=None)  # fmt: skip

    def generate(batch: list[list[int]], max_new_tokens: int = n) -> list[list[int]]:
        enc = tok.pad({"input_ids": batch}, return_tensors="pt")
        cfg = copy.deepcopy(gen_cfg)
        # NOTE: generation kwargs beside a generation_config make transformers 5 merge the
        # model's defaults back in (EOS included), so everything goes through the config.
        cfg.max_new_tokens = max_new_tokens
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=cfg)
        return out[:, enc["input_ids"].shape[1] :].tolist()

    # Warmup in the shape measured next (a padded batch takes other kernels than one prompt).
    generate(prompts if args.hf_mode == "batched" else prompts[:1], max_new_tokens=2)
    t0 = time.perf_counter()
    if args.hf_mode == "batched":
        outs = generate(prompts)
    else:
        outs = [generate([p])[0] for p in prompts]
    return outs, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-path", default=None, help="HF folder or .gguf (default: SmolLM2).")
    p.add_argument("--num-prompts", type=int, default=8, help=f"At most {len(PROMPTS)}.")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--hf-mode", choices=("batched", "sequential"), default="batched")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--allow-mismatch", action="store_true")
    p.add_argument("--output-file", default=None, help="Append one JSON record.")
    args = p.parse_args()
    if not 1 <= args.num_prompts <= len(PROMPTS):
        sys.exit(f"error: --num-prompts must be in [1, {len(PROMPTS)}]")

    from transformers import AutoTokenizer

    model_dir, tok_dir = resolve_model(args.model_path)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    prompts = [tok(t).input_ids for t in PROMPTS[: args.num_prompts]]
    n = args.output_len
    print(f"model {model_dir}: {len(prompts)} prompts, {n} greedy tokens each, CPU {args.dtype}")

    srt_ids, srt_s = run_srt(model_dir, prompts, n, args)
    hf_ids, hf_s = run_hf(model_dir, prompts, n, args)

    total = len(prompts) * n
    for name, outs in (("srt", srt_ids), ("HF", hf_ids)):
        if any(len(o) != n for o in outs):
            sys.exit(f"error: {name} did not produce exactly {n} tokens for every prompt")
    agree = [a == b for a, b in zip(srt_ids, hf_ids, strict=True)]
    record = {
        "model": model_dir,
        "num_prompts": len(prompts),
        "output_len": n,
        "hf_mode": args.hf_mode,
        "dtype": args.dtype,
        "srt_s": srt_s,
        "hf_s": hf_s,
        "srt_tok_s": total / srt_s,
        "hf_tok_s": total / hf_s,
        "speedup": hf_s / srt_s,
        "greedy_agree": sum(agree),
    }
    print(f"{'':8}{'time (s)':>10}{'output tok/s':>14}")
    print(f"{'srt':8}{srt_s:>10.2f}{record['srt_tok_s']:>14.1f}")
    print(f"{'HF':8}{hf_s:>10.2f}{record['hf_tok_s']:>14.1f}   ({args.hf_mode})")
    print(f"srt/HF throughput: {record['speedup']:.2f}x")
    print(f"greedy outputs identical: {sum(agree)}/{len(agree)}")
    for i, ok in enumerate(agree):
        if not ok:
            a, b = srt_ids[i], hf_ids[i]
            at = next(j for j in range(n) if a[j] != b[j])
            print(f"  prompt {i} differs from token {at}:")
            print(f"    srt: {tok.decode(a)!r}\n    HF:  {tok.decode(b)!r}")
    if args.output_file:
        with open(args.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return 0 if all(agree) or args.allow_mismatch else 1


if __name__ == "__main__":
    sys.exit(main())
