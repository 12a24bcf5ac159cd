"""Checkpoint weights for the ModelRunner: lazy safetensors iteration and dummy init.

`iterate_safetensors(folder)` yields (name, tensor) one tensor at a time, one file at a time
(safe_open), so peak host memory stays near one tensor rather than the whole checkpoint. Files
come from `model.safetensors.index.json` when present, else every `*.safetensors` file.
`init_dummy_weights` fills parameters with small seeded uniform values (`--load-format dummy`).

A folder converted from a GGUF file also holds the file's quantized tensors as they were shipped
(`gguf/blocks.safetensors`, see srt.model_loader.gguf); `iterate_weights(folder, gguf_blocks=True)`
yields those as `GGUFWeight`s (srt.layers.quantization) in place of their fp32 copies.

A load that takes longer than a moment logs its progress: a line at 25, 50 and 75 percent of
the checkpoint's bytes and one at the end (`LoadProgress`); a quick one logs nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from srt.layers.quantization import GGUFWeight
from srt.model_loader.gguf import GGUF_BLOCKS_FILE, GGUF_BLOCKS_TYPES_KEY

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
# A load quicker than this logs no progress.
PROGRESS_AFTER_S = 2.0


def safetensors_files(model_path: str | Path) -> list[Path]:
    folder = Path(model_path)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{INDEX_FILE} names {f.name}, which is missing in {folder}")
    return files


class LoadProgress:
    """Logs "loading weights: N% (...)" each time the bytes done cross a quarter of `total`,
    and "loaded ..." at `finish()`, once `after_s` seconds have passed since the start."""

    def __init__(self, total: int, after_s: float = PROGRESS_AFTER_S) -> None:
        self.total, self.after_s = max(total, 1), after_s
        self.done = 0
        self.start = time.monotonic()
        self.next_quarter = 1

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        quarter = min(4 * self.done // self.total, 3)
        if quarter < self.next_quarter:
            return
        self.next_quarter = quarter + 1
        elapsed = time.monotonic() - self.start
        if elapsed >= self.after_s:
            logger.info(
                "loading weights: %d%% (%s of %s, %.1f s)",
                25 * quarter,
                _size(self.done),
                _size(self.total),
                elapsed,
            )

    def finish(self) -> None:
        elapsed = time.monotonic() - self.start
        if elapsed >= self.after_s:
            logger.info("loaded %s of weights in %.1f s", _size(self.done), elapsed)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def iterate_safetensors(
    model_path: str | Path,
    progress_after_s: float = PROGRESS_AFTER_S,
    skip: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the folder's weight files but those named in `skip`."""
    files = safetensors_files(model_path)
    # NOTE: the time between two tensors is mostly the consumer's (copies to the device), so
    # the progress counts a tensor once it has been taken.
    progress = LoadProgress(sum(f.stat().st_size for f in files), progress_after_s)
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if name in skip:
                    continue
                tensor = f.get_tensor(name)
                yield name, tensor
                progress.add(tensor.numel() * tensor.element_size())
    progress.finish()


def has_gguf_blocks(model_path: str | Path) -> bool:
    return (Path(model_path) / GGUF_BLOCKS_FILE).is_file()


def iterate_gguf_blocks(model_path: str | Path) -> Iterator[tuple[str, GGUFWeight]]:
    """The GGUF-quantized tensors of a converted folder, by their HF names."""
    path = Path(model_path) / GGUF_BLOCKS_FILE
    with safe_open(str(path), framework="pt", device="cpu") as f:
        types = json.loads((f.metadata() or {}).get(GGUF_BLOCKS_TYPES_KEY, "null"))
        if not isinstance(types, dict):
            raise ValueError(f"{path} lacks the {GGUF_BLOCKS_TYPES_KEY!r} metadata")
        for name, (qtype, k) in types.items():
            yield name, GGUFWeight(qtype, f.get_tensor(name), int(k))


def iterate_weights(
    model_path: str | Path,
    gguf_blocks: bool = False,
    progress_after_s: float = PROGRESS_AFTER_S,
) -> Iterator[tuple[str, torch.Tensor | GGUFWeight]]:
    """The folder's checkpoint tensors; with `gguf_blocks`, those the GGUF file shipped
    quantized come as `GGUFWeight`s (their fp32 copies are not read)."""
    if not gguf_blocks:
        yield from iterate_safetensors(model_path, progress_after_s)
        return
    names = set()
    for name, weight in iterate_gguf_blocks(model_path):
        names.add(name)
        yield name, weight
    yield from iterate_safetensors(model_path, progress_after_s, skip=frozenset(names))


@torch.no_grad()
def init_dummy_weights(
    model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3
) -> None:
    """Uniform(low, high) in every parameter, reproducible for a given seed."""
    for i, param in enumerate(model.parameters()):
        gen = torch.Generator(device=param.device)
        gen.manual_seed(seed + i)  # per-parameter seed: independent of iteration chunking
        param.uniform_(low, high, generator=gen)
