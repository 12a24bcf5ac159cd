"""Config snapshots: a model folder's transformers config, read without importing transformers.

Importing transformers and its config class is ~1.1 s of a scheduler's start on a 2-core
machine, more than a third of it, for a handful of numbers. The first time a process reads a
config (`load_hf_config` in srt.configs.model_config), it goes through transformers and
records every public, non-callable attribute of the result, and of its text config when that
is another object, in `$SRT_CACHE_DIR/configs/<key>.json` (default `~/.cache/srt/configs`). The
key hashes config.json's bytes, the transformers version, whether transformers sees torch
there, and this format's version: a changed file, an upgrade or the other torch mode makes
another snapshot, never a stale one.

A `SnapshotConfig` answers attribute reads from the snapshot. Attributes JSON cannot carry
exactly (tuples, sets, dicts with int keys, objects) are recorded by name only; reading one
loads the real config through transformers then and returns its value. An attribute the real
config lacks is missing here too, so `getattr(config, name, default)` behaves the same.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from srt.cache_dir import srt_cache_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def snapshot_dir() -> Path:
    return srt_cache_dir() / "configs"


def _transformers_sees_torch(torch_hidden: bool) -> bool:
    if "transformers" in sys.modules:
        from transformers.utils import import_utils

        return bool(import_utils.is_torch_available())
    return not torch_hidden and importlib.util.find_spec("torch") is not None


def snapshot_key(model_path: str, torch_hidden: bool) -> str | None:
    """The snapshot's file stem for this folder's config.json, or None when it has none (or
    transformers is not installed)."""
    try:
        raw = (Path(model_path) / "config.json").read_bytes()
        version = importlib.metadata.version("transformers")
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None
    h = hashlib.sha256(raw)
    sees = _transformers_sees_torch(torch_hidden)
    h.update(f"\0{version}\0{int(sees)}\0{FORMAT_VERSION}".encode())
    return h.hexdigest()[:32]


def _attributes(config: Any) -> tuple[dict[str, Any], list[str]]:
    """(the public non-callable attributes JSON holds exactly, the names of the others)."""
    kept: dict[str, Any] = {}
    other: list[str] = []
    names = set(dir(config)) | set(getattr(type(config), "attribute_map", {}) or {})
    for name in sorted(names):
        if name.startswith("_"):
            continue
        try:
            value = getattr(config, name)
        except Exception:  # noqa: BLE001 - a property that raises: absent, as for getattr
            continue
        if callable(value):
            continue
        try:
            exact = json.loads(json.dumps(value)) == value and _same_types(value)
        except (TypeError, ValueError):
            exact = False
        if exact:
            kept[name] = value
        else:
            other.append(name)
    return kept, other


def _same_types(value: Any) -> bool:
    """Whether JSON gives back this value's types too (no tuples, no non-str keys)."""
    if isinstance(value, tuple | set | frozenset):
        return False
    if isinstance(value, list):
        return all(_same_types(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _same_types(v) for k, v in value.items())
    return value is None or isinstance(value, bool | int | float | str)


def capture(config: Any) -> dict[str, Any]:
    """The snapshot of a transformers config (see the module docstring)."""
    # NOTE: reading every attribute trips transformers' deprecation notices (torch_dtype,
    # use_return_dict); they say nothing about the model.
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        attrs, other = _attributes(config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text_snap = None
        if text is not config:
            t_attrs, t_other = _attributes(text)
            text_snap = {"attrs": t_attrs, "other": t_other}
    finally:
        quiet.setLevel(level)
    return {"version": FORMAT_VERSION, "attrs": attrs, "other": other, "text": text_snap}


class SnapshotConfig:
    """A transformers config as its snapshot recorded it. `real()` loads the config through
    transformers (once), for the attributes the snapshot names but could not hold."""

    def __init__(
        self,
        attrs: dict[str, Any],
        other: list[str],
        real: Callable[[], Any],
        text: SnapshotConfig | None = None,
    ) -> None:
        self.__dict__.update(attrs)
        self._other = frozenset(other)
        self._real = real
        self._text = text

    def __getattr__(self, name: str) -> Any:
        # Only called for names the snapshot does not hold.
        if name.startswith("__") or name not in self.__dict__.get("_other", ()):
            raise AttributeError(name)
        return getattr(self._real(), name)

    def get_text_config(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return self._real().get_text_config(*args, **kwargs)
        return self if self._text is None else self._text

    def __repr__(self) -> str:
        return f"SnapshotConfig({self.__dict__.get('model_type', '?')})"


def from_snapshot(snap: dict[str, Any], real: Callable[[], Any]) -> SnapshotConfig:
    text = None
    if snap.get("text") is not None:
        t = snap["text"]
        text = SnapshotConfig(t["attrs"], t["other"], lambda: real().get_text_config())
    return SnapshotConfig(snap["attrs"], snap["other"], real, text)


def read(key: str) -> dict[str, Any] | None:
    path = snapshot_dir() / f"{key}.json"
    try:
        snap = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(snap, dict) or snap.get("version") != FORMAT_VERSION:
        return None
    return snap


def write(key: str, snap: dict[str, Any]) -> None:
    """Stores a snapshot (atomically: a reader sees the whole file or none). A cache that
    cannot be written only costs the next start its speed."""
    folder = snapshot_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(snap, f)
            os.replace(tmp, folder / f"{key}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        logger.debug("config snapshot not written to %s: %s", folder, e)
