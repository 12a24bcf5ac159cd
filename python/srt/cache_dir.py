"""Where srt keeps what it derives from model files: `$SRT_CACHE_DIR`, else `~/.cache/srt`."""

from __future__ import annotations

import os
from pathlib import Path


def srt_cache_dir() -> Path:
    base = os.environ.get("SRT_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "srt"
