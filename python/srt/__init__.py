"""srt: an LLM serving runtime with a Rust core.

`python -m srt serve --model-path PATH` starts the OpenAI-compatible server;
`srt.Engine(model_path=...)` drives the same runtime offline.
"""

from srt.version import __version__

__all__ = ["Engine", "__version__"]


def __getattr__(name: str):  # lazy: importing srt must not import torch or fastapi
    if name == "Engine":
        from srt.entrypoints.engine import Engine

        return Engine
    raise AttributeError(f"module 'srt' has no attribute {name!r}")
