"""How the weights of a model are held: dense at a dtype, or as GGUF blocks (`--quantization`).

Decided in the scheduler process by the ModelRunner, before the model is built. In: the
`--quantization` and `--dtype` values, the device, and the model folder (a folder converted
from a GGUF file holds `gguf/blocks.safetensors`). Out: a `WeightFormat`: the dtype of the
dense weights and activations, whether to load the GGUF blocks, and why, for the log line.

- `none`: dense weights at `--dtype` (auto: bf16 on GPU, fp32 on CPU), GGUF ones dequantized.
- `gguf`: the GGUF file's quantized tensors stay in their blocks and run through srt's CPU
  kernels; activations at `--dtype` (auto: fp32, the kernels' own input). CPU only, and only
  for a model given as a .gguf file.
- `auto`: `none`, except for a GGUF model on a CPU under `--dtype auto`: there the CPU decides.
  Where it multiplies bf16 natively (AMX or AVX512-BF16, which oneDNN uses for torch's bf16
  matmuls), bf16 weights: the default model's matmuls of one decode step take 4.8 ms in bf16
  against 10.5 ms through the GGUF kernels at batch 1, 10 against 34 at batch 8 (fastest of
  300 runs, 2 threads, an AMX CPU; benches/RESULTS.md "GGUF weights on a CPU"). Elsewhere
  torch's bf16 matmul is emulated and its fp32 one reads 5-6x the bytes the blocks take: the
  blocks, with fp32 activations. An explicit `--dtype` asks for full precision: dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from srt.model_loader.gguf import GGUF_BLOCKS_FILE

# /proc/cpuinfo flags of a CPU whose bf16 matmuls are native (oneDNN's AMX / AVX512-BF16 paths).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class WeightFormat:
    dtype: str  # of the dense weights, the activations and the KV cache: float32, bfloat16, ...
    gguf_blocks: bool  # load the GGUF blocks in place of their dequantized copies
    reason: str  # one line for the log: what was chosen and why


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU listed (empty where the file is unreadable)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_weight_format(
    quantization: str,
    dtype: str,
    device: str,
    model_path: str | Path,
    flags: frozenset[str] | None = None,
) -> WeightFormat:
    """The weight format for these flags on this machine; ValueError for `gguf` where it
    cannot run. `flags`: the CPU's feature flags (default: read from /proc/cpuinfo)."""
    on_cpu = device.split(":")[0] == "cpu"
    has_blocks = (Path(model_path) / GGUF_BLOCKS_FILE).is_file()
    dense_auto = "float32" if on_cpu else "bfloat16"
    if quantization == "none":
        chosen = dense_auto if dtype == "auto" else dtype
        return WeightFormat(chosen, False, f"--quantization none: {chosen} weights")
    if quantization == "gguf":
        if not on_cpu:
            raise ValueError(
                f"--quantization gguf runs on the CPU only (its kernels are CPU kernels), not "
                f"on {device}; pass --device cpu, or --quantization none for dense weights"
            )
        if not has_blocks:
            raise ValueError(
                f"--quantization gguf needs a model given as a .gguf file; {model_path} holds "
                f"no GGUF blocks ({GGUF_BLOCKS_FILE})"
            )
        chosen = "float32" if dtype == "auto" else dtype
        return WeightFormat(chosen, True, f"--quantization gguf: GGUF blocks, {chosen} activations")
    if quantization != "auto":
        raise ValueError(f"unknown --quantization {quantization!r}")
    if not has_blocks:
        chosen = dense_auto if dtype == "auto" else dtype
        return WeightFormat(chosen, False, f"{chosen} weights (not a GGUF model)")
    if not on_cpu:
        chosen = dense_auto if dtype == "auto" else dtype
        return WeightFormat(chosen, False, f"{chosen} weights (GGUF blocks run on the CPU only)")
    if dtype != "auto":
        return WeightFormat(dtype, False, f"{dtype} weights (--dtype {dtype} asks for them)")
    native = sorted((cpu_flags() if flags is None else flags) & set(NATIVE_BF16_FLAGS))
    if native:
        return WeightFormat(
            "bfloat16",
            False,
            f"bfloat16 weights: this CPU multiplies bf16 natively ({', '.join(native)}), "
            "faster than the GGUF kernels from a few concurrent requests on "
            "(--quantization gguf: faster for one, and lighter)",
        )
    return WeightFormat(
        "float32",
        True,
        "GGUF blocks, float32 activations: this CPU has no native bf16 matmul "
        f"({' / '.join(NATIVE_BF16_FLAGS)})",
    )
