"""Checkpoint weights for the ModelRunner: lazy safetensors iteration and dummy init.

`iterate_safetensors(folder)` yields (name, tensor) one tensor at a time, one file at a time
(safe_open), so peak host memory stays near one tensor rather than the whole checkpoint. Files
come from `model.safetensors.index.json` when present, else every `*.safetensors` file.
`init_dummy_weights` fills parameters with small seeded uniform values (`--load-format dummy`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"


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


def iterate_safetensors(model_path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(model_path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(
    model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3
) -> None:
    """Uniform(low, high) in every parameter, reproducible for a given seed."""
    for i, param in enumerate(model.parameters()):
        gen = torch.Generator(device=param.device)
        gen.manual_seed(seed + i)  # per-parameter seed: independent of iteration chunking
        param.uniform_(low, high, generator=gen)
