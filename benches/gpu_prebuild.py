"""Compile, on a machine without a GPU, the FlashInfer kernels srt's CUDA path loads, so a lent
GPU machine spends no device time in FlashInfer's JIT (~4 minutes on a fresh H100 machine).

FlashInfer loads a module from `<flashinfer package>/data/aot/<name>/<name>.so` before it
considers compiling one. This script builds exactly the modules srt asks for (bf16, the given
head dims, with and without a sliding window and a logits soft-cap) with nvcc from PyPI and
writes them there, in the flashinfer tree the GPU suite carries:

    pip install --target /tmp/cuda nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88
    CUDA_HOME=/tmp/cuda/nvidia/cu13 PYTHONPATH=<flashinfer tree>:<tvm-ffi, ninja> \
        python benches/gpu_prebuild.py --out <flashinfer tree>/flashinfer/data/aot

(CUDA_HOME needs lib64 -> lib and lib/libcudart.so -> libcudart.so.13.) The module names are
FlashInfer's own URIs, made by the same generator functions its wrappers call at plan time,
so a name the runtime asks for that is not built here is simply compiled there as before.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import time
from pathlib import Path


def specs(head_dims: list[int]) -> list:
    import torch
    from flashinfer.jit.activation import gen_act_and_mul_module
    from flashinfer.jit.norm import gen_norm_module
    from flashinfer.jit.rope import gen_rope_module
    from flashinfer.prefill import (
        _gen_batch_prefill_independent_paged_module,
        _gen_batch_prefill_primary_module,
        gen_batch_prefill_module,
    )

    out = [
        gen_norm_module(),
        gen_rope_module(),
        gen_act_and_mul_module("silu"),
        gen_act_and_mul_module("gelu_tanh"),
    ]
    bf16 = torch.bfloat16
    for d, window, softcap in itertools.product(head_dims, (False, True), (False, True)):
        # get_batch_prefill_module's arguments: q, kv, o dtypes, index dtype, qk / vo head
        # dims, pos encoding (none), sliding window, soft-cap, fp16 qk reduction.
        args = (bf16, bf16, bf16, torch.int32, d, d, 0, window, softcap, False)
        out.append(gen_batch_prefill_module("fa3", *args))  # prefill on sm90a
        out.append(_gen_batch_prefill_primary_module("fa2", *args))  # tensor-core decode
        out.append(_gen_batch_prefill_independent_paged_module("fa2", *args))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="flashinfer/data/aot of the tree")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128])
    ap.add_argument("--build-dir", type=Path, default=Path("/tmp/flashinfer-aot-build"))
    ap.add_argument("--list", action="store_true", help="print the module names only")
    args = ap.parse_args()
    os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")
    if "CUDA_HOME" not in os.environ and not args.list:
        raise SystemExit("set CUDA_HOME to a CUDA 13 toolkit (see this script's docstring)")

    from flashinfer.jit import env as jit_env

    jit_env.FLASHINFER_WORKSPACE_DIR = args.build_dir
    jit_env.FLASHINFER_JIT_DIR = args.build_dir / "cached_ops"
    jit_env.FLASHINFER_GEN_SRC_DIR = args.build_dir / "generated"
    jit_env.FLASHINFER_JIT_DIR.mkdir(parents=True, exist_ok=True)
    jit_env.FLASHINFER_GEN_SRC_DIR.mkdir(parents=True, exist_ok=True)

    todo = specs(args.head_dims)
    if args.list:
        print("\n".join(s.name for s in todo))
        return
    for spec in todo:
        dst = args.out / spec.name / f"{spec.name}.so"
        if dst.exists():
            print(f"{spec.name}: already built", flush=True)
            continue
        t = time.time()
        spec.build(verbose=False)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(jit_env.FLASHINFER_JIT_DIR / spec.name / f"{spec.name}.so", dst)
        print(f"{spec.name}: {time.time() - t:.0f} s, {dst.stat().st_size >> 10} KiB", flush=True)


if __name__ == "__main__":
    main()
