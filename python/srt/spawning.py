"""Starting processes with multiprocessing's "spawn" from a caller's program.

"spawn" re-imports the parent's main module in every child, running whatever it does at top
level: an `srt.Engine` in a plain script without `if __name__ == "__main__":` would start
another Engine in each child (and a GGUF conversion's child would wait forever for the lock its
parent holds). srt's children run srt's own entry points and need nothing from that module.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def caller_main_hidden() -> Iterator[None]:
    """While children start: the caller's `__main__` (a script, or a `-m` module) hidden from
    multiprocessing, so a spawned child does not import it again (the preparation data is
    built without it)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in vars(main)}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)
