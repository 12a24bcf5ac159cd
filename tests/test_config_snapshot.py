"""Config snapshots (srt.configs.snapshot): a model config read a second time comes from its
snapshot, without importing transformers, and answers every attribute as transformers'
config object does."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_model_families import LONGROPE

from srt.configs.model_config import load_hf_config
from srt.configs.snapshot import SnapshotConfig
from srt.testing.tiny_model import ALL_ARCHS, make_tiny_model


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("snapshot_models")
    out = {a: make_tiny_model(root / a, a, sliding_window=8) for a in ALL_ARCHS}
    out["phi3_longrope"] = make_tiny_model(root / "phi3_lr", "phi3", rope_scaling=LONGROPE)
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SRT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def public(config: Any) -> dict[str, Any]:
    """Every public, non-callable attribute a config answers."""
    out = {}
    names = set(dir(config)) | set(getattr(type(config), "attribute_map", {}) or {})
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # deprecation notices of some attributes
    try:
        for name in names:
            if name.startswith("_"):
                continue
            try:
                value = getattr(config, name)
            except Exception:  # noqa: BLE001 - absent for getattr too
                continue
            if not callable(value):
                out[name] = value
    finally:
        logger.setLevel(level)
    return out


def assert_same(real: Any, snap: SnapshotConfig) -> None:
    want = public(real)
    assert want, "no attributes read"
    for name, value in want.items():
        got = getattr(snap, name)
        if name in snap.__dict__:
            assert got == value and type(got) is type(value), name
        else:  # not in the snapshot: read from transformers' config
            assert type(got) is type(value), name
    assert not hasattr(snap, "no_such_attribute")
    assert getattr(snap, "no_such_attribute", 7) == 7


@pytest.mark.parametrize("arch", [*ALL_ARCHS, "phi3_longrope"])
def test_second_read_is_the_snapshot_and_answers_alike(arch: str, paths: dict[str, str]) -> None:
    real = load_hf_config(paths[arch])
    assert not isinstance(real, SnapshotConfig)
    snap = load_hf_config(paths[arch])
    assert isinstance(snap, SnapshotConfig)
    assert_same(real, snap)
    real_text, snap_text = real.get_text_config(), snap.get_text_config()
    assert (real_text is real) == (snap_text is snap)
    if snap_text is not snap:
        assert isinstance(snap_text, SnapshotConfig)
        assert_same(real_text, snap_text)


def test_an_edited_config_is_read_again(paths: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((Path(paths["llama"]) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    assert load_hf_config(str(folder)).rms_norm_eps == config["rms_norm_eps"]
    assert isinstance(load_hf_config(str(folder)), SnapshotConfig)
    config["rms_norm_eps"] = 0.125
    (folder / "config.json").write_text(json.dumps(config))
    again = load_hf_config(str(folder))
    assert not isinstance(again, SnapshotConfig)
    assert again.rms_norm_eps == 0.125
    assert load_hf_config(str(folder)).rms_norm_eps == 0.125


def test_a_scheduler_reads_a_known_config_without_transformers(
    paths: dict[str, str], cache: Path
) -> None:
    """In a scheduler process (srt's own: transformers without torch), the second start's
    ModelConfig imports neither transformers nor torch."""
    code = (
        "import sys\n"
        "from srt.managers.hf_tokenizer import mark_own_process\n"
        "mark_own_process()\n"
        "from srt.configs.model_config import ModelConfig\n"
        f"c = ModelConfig({paths['gemma3_mm']!r})\n"
        "print(type(c.hf_config).__name__, c.num_layers, c.context_len, sorted(c.eos_token_ids),"
        " 'transformers' in sys.modules, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "SRT_CACHE_DIR": str(cache)}

    def run() -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return out.stdout.split()

    first, second = run(), run()
    assert first[0] != "SnapshotConfig" and first[-2:] == ["True", "False"]
    assert second[0] == "SnapshotConfig" and second[-2:] == ["False", "False"]
    assert first[1:-2] == second[1:-2]
