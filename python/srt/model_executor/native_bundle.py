"""Native bundles: what the native CPU step of a model needs, saved once so later starts run
it without torch; importing this module does not import torch.

A scheduler that loads a model through torch (the `ModelRunner`) and finds the native step
applies to it (`CpuStepRunner`) saves the step's model spec: the decoder's weights as they
stand after loading (GGUF blocks repacked, RoPE tables built), and its options. The next
scheduler with the same model files, the same flags that shape the model, and the same srt
code finds the bundle and starts the `NativeRunner` from it instead, without importing torch:
no torch import (1-2 s), no weight repacking, ~0.5 GB less memory.

Where: `$SRT_CACHE_DIR/native/<model>/<key>/` (default `~/.cache/srt/...`), `<model>` a hash of
the model folder's path, `<key>` a hash of the model folder's files (name, size, mtime), the
flags in `SPEC_ARGS`, and srt's own files (so an upgrade or an edit builds a new bundle). A
bundle is written under a temporary name and renamed into place, and replaces the model's
older bundles. Files: `spec.json` (the spec's structure, its arrays named by index, and the
runner's `meta`) and `arrays.bin` (the arrays, each 64-byte aligned), mapped read-only at load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import srt
from srt.cache_dir import srt_cache_dir
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

FORMAT = 1
# The server flags that shape the model the native step runs (beyond its files).
SPEC_ARGS = (
    "dtype",
    "quantization",
    "kv_cache_dtype",
    "context_length",
    "load_format",
    "attention_backend",
)
_SPEC_FILE = "spec.json"
_ARRAYS_FILE = "arrays.bin"
_ALIGN = 64


@dataclass
class Bundle:
    spec: dict[str, Any]
    # What the runner needs besides the spec: dtype, kv_dtype, weight_bytes, num_layers,
    # num_kv_heads, head_dim.
    meta: dict[str, Any]


def bundle_dir(server_args: ServerArgs, device: str) -> Path | None:
    """Where the bundle of this server's model lives, or None where the native CPU step cannot
    run without torch (another device, several ranks, dummy weights, the step turned off)."""
    if (
        device != "cpu"
        or server_args.world_size > 1
        or server_args.disable_native_decode
        or server_args.load_format == "dummy"
    ):
        return None
    folder = Path(server_args.model_path).resolve()
    if not folder.is_dir():
        return None
    model = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    args = {name: getattr(server_args, name) for name in SPEC_ARGS}
    h.update(json.dumps({"format": FORMAT, "args": args}, sort_keys=True).encode())
    for root in (folder, Path(srt.__file__).parent):
        _hash_files(h, root)
    return srt_cache_dir() / "native" / model / h.hexdigest()[:32]


def _hash_files(h: Any, root: Path) -> None:
    """Names, sizes and modification times of the files under `root` (no contents: a model's
    weights are gigabytes)."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in filenames:
            if name.endswith(".pyc"):
                continue
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            entries.append(f"{os.path.relpath(path, root)}:{st.st_size}:{st.st_mtime_ns}")
    h.update("\n".join(sorted(entries)).encode())


def load(path: Path | None) -> Bundle | None:
    """The bundle at `path`, or None when there is none (or it cannot be read)."""
    if path is None or not (path / _SPEC_FILE).is_file():
        return None
    try:
        doc = json.loads((path / _SPEC_FILE).read_text())
        if doc.get("format") != FORMAT:
            return None
        data = np.memmap(path / _ARRAYS_FILE, dtype=np.uint8, mode="r")
        arrays = []
        for a in doc["arrays"]:
            dtype = np.dtype(a["dtype"])
            count = int(np.prod(a["shape"], dtype=np.int64))
            view = data[a["offset"] : a["offset"] + count * dtype.itemsize]
            arrays.append(np.asarray(view).view(dtype).reshape(a["shape"]))
        return Bundle(_decode(doc["spec"], arrays), doc["meta"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("native bundle %s unreadable (%s); loading through torch", path, e)
        return None


def save(path: Path, spec: dict[str, Any], meta: dict[str, Any]) -> None:
    """Writes the bundle (a failure is logged, not raised: the bundle only saves time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        try:
            arrays: list[np.ndarray] = []
            seen: dict[tuple, int] = {}
            encoded = _encode(spec, arrays, seen)
            index = []
            offset = 0
            with open(tmp / _ARRAYS_FILE, "wb") as f:
                for a in arrays:
                    pad = -offset % _ALIGN
                    f.write(b"\0" * pad)
                    offset += pad
                    index.append({"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
                    data = np.ascontiguousarray(a)
                    f.write(data.data)
                    offset += data.nbytes
            doc = {"format": FORMAT, "meta": meta, "arrays": index, "spec": encoded}
            (tmp / _SPEC_FILE).write_text(json.dumps(doc))
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in path.parent.iterdir():
            if old != path and not old.name.startswith(".tmp-"):
                shutil.rmtree(old, ignore_errors=True)
        logger.info("native bundle saved: %s (%.1f MiB)", path, offset / 2**20)
    except (OSError, TypeError, ValueError) as e:
        logger.warning("native bundle not saved (%s): the next start loads through torch again", e)


def _encode(obj: Any, arrays: list[np.ndarray], seen: dict[tuple, int]) -> Any:
    """JSON of the spec: arrays as {"a": index} (an array shared by several entries, as the
    layers' RoPE tables or tied embeddings, stored once), tuples as {"t": [...]}, dicts as
    {"d": {...}}."""
    if isinstance(obj, np.ndarray):
        key = (obj.__array_interface__["data"][0], obj.shape, obj.strides, obj.dtype.str)
        if key not in seen:
            seen[key] = len(arrays)
            arrays.append(obj)
        return {"a": seen[key]}
    if isinstance(obj, tuple):
        return {"t": [_encode(x, arrays, seen) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, arrays, seen) for x in obj]
    if isinstance(obj, dict):
        return {"d": {k: _encode(v, arrays, seen) for k, v in obj.items()}}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"a native spec holds a {type(obj).__name__}")


def _decode(obj: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(obj, list):
        return [_decode(x, arrays) for x in obj]
    if isinstance(obj, dict):
        if "a" in obj:
            return arrays[obj["a"]]
        if "t" in obj:
            return tuple(_decode(x, arrays) for x in obj["t"])
        return {k: _decode(v, arrays) for k, v in obj["d"].items()}
    return obj
