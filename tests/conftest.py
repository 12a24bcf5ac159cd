"""Shared pytest fixtures: tiny random-weight HF model folders built once per session."""

from __future__ import annotations

import pytest

from srt.testing.tiny_model import ARCHS, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{arch: path} of a tiny llama, qwen2 and qwen3 model (fp32 safetensors + tokenizer)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow are skipped unless --run-slow (the marker is declared in
    pyproject.toml)."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
