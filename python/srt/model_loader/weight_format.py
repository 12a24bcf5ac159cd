"""How the weights of a model are held: dense at a dtype, or as GGUF blocks (`--quantization`).

Decided in the scheduler process by the ModelRunner, before the model is built. In: the
`--quantization` and `--dtype` values, the device, and the model folder (a folder converted
from a GGUF file holds `gguf/blocks.safetensors`). Out: a `WeightFormat`: the dtype of the
dense weights and activations, whether to load the GGUF blocks, and why, for the log line.

- `none`: dense weights at `--dtype` (auto: bf16 on GPU, fp32 on CPU), GGUF ones dequantized.
- `gguf`: the GGUF file's quantized tensors stay in their blocks and run through srt's CPU
  kernels; activations at `--dtype` (auto: fp32, the kernels' own input). CPU only, and only
  for a model given as a .gguf file.
- `auto`: `none`, except for a GGUF model on a CPU under `--dtype auto`: there the blocks, with
  fp32 activations. A decode step streams every weight from memory once, and the blocks are
  1/5 of fp32's bytes and 2/5 of bf16's; with the whole step in one native call
  (`model_executor/cpu_step.py`) they beat bf16 weights even on CPUs that multiply bf16
  natively (AMX): the default model decodes one user 4-5x faster and 32 users about as fast
  (benches/RESULTS.md "the native decode step"). An explicit `--dtype` asks for full
  precision: dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from srt.model_loader.gguf import GGUF_BLOCKS_FILE


@dataclass(frozen=True)
class WeightFormat:
    dtype: str  # of the dense weights, the activations and the KV cache: float32, bfloat16, ...
    gguf_blocks: bool  # load the GGUF blocks in place of their dequantized copies
    reason: str  # one line for the log: what was chosen and why


def resolve_weight_format(
    quantization: str,
    dtype: str,
    device: str,
    model_path: str | Path,
) -> WeightFormat:
    """The weight format for these flags; ValueError for `gguf` where it cannot run."""
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
    return WeightFormat(
        "float32",
        True,
        "GGUF blocks, float32 activations (--quantization none or a --dtype for dense weights)",
    )
