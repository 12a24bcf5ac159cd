"""srt.model_loader.weights: safetensors iteration (one file after another, as the index says)
and the progress log of a slow load."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from srt.model_loader.weights import iterate_safetensors, safetensors_files


def _checkpoint(folder: Path, shards: int = 2, per_shard: int = 4) -> dict[str, torch.Tensor]:
    """`shards` files of `per_shard` 1 KiB tensors each, with an index; returns every tensor."""
    folder.mkdir(exist_ok=True)
    tensors, weight_map = {}, {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {f"layer{s}.w{i}": torch.full((256,), float(s * 10 + i)) for i in range(per_shard)}
        save_file(part, str(folder / name))
        tensors |= part
        weight_map |= dict.fromkeys(part, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def test_iterates_every_tensor_of_every_shard(tmp_path: Path) -> None:
    want = _checkpoint(tmp_path / "m")
    got = dict(iterate_safetensors(tmp_path / "m"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names model-00002-of-00002.safetensors"):
        safetensors_files(tmp_path / "m")


def test_slow_load_logs_quarters_then_the_total(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _checkpoint(tmp_path / "m", shards=2, per_shard=8)  # 16 tensors
    with caplog.at_level(logging.INFO, logger="srt.model_loader.weights"):
        # progress_after_s=0: every load counts as slow.
        assert len(list(iterate_safetensors(tmp_path / "m", progress_after_s=0))) == 16
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines[:3]] == [
        "loading weights: 25%",
        "loading weights: 50%",
        "loading weights: 75%",
    ]
    # Bytes of the tensors taken, of the files' sizes (headers included).
    assert re.fullmatch(r"loading weights: 25% \(5\.0 KiB of 1\d\.\d KiB, \d+\.\d s\)", lines[0])
    assert lines[3].startswith("loaded 16.0 KiB of weights in ")
    assert len(lines) == 4  # a few lines, not one per tensor


def test_quick_load_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _checkpoint(tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="srt.model_loader.weights"):
        list(iterate_safetensors(tmp_path / "m", progress_after_s=3600))
    assert caplog.records == []
