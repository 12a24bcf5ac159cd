"""Helpers for the live-server and Engine tests: the tiny model, free ports, child processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest


def tiny_llama_path(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The tiny llama folder: conftest's `tiny_model_paths` when there is one, else built here."""
    try:
        paths: Any = request.getfixturevalue("tiny_model_paths")
    except pytest.FixtureLookupError:
        paths = None
    if isinstance(paths, dict) and "llama" in paths:
        return str(paths["llama"])
    if isinstance(paths, (str, os.PathLike)):
        return str(paths)
    from srt.testing.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama") / "llama", "llama")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("PPid:") and int(line.split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); it has exited all the same
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
