"""Shared pytest fixtures: tiny random-weight HF model folders built once per session."""

from __future__ import annotations

import pytest

from srt.testing.tiny_model import ARCHS, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{arch: path} of a tiny llama, qwen2 and qwen3 model (fp32 safetensors + tokenizer)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}
