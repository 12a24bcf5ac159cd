"""Loading the HF tokenizer in a process that must not hold torch (the HTTP server's).

transformers imports torch whenever it is installed (its `is_torch_available()` looks for the
package, and its modules import it when found), which costs the HTTP process ~600 MiB of
memory it never uses: tokenizing needs only `tokenizers`. `load_tokenizer(path,
torch_free=True)` hides torch while transformers is imported and asks it once whether torch
is available, so it caches the answer no and works from then on as on an install without
torch. Only for a process that is srt's own: in a user's process (`srt.Engine`) the user may
need transformers with torch, so `torch_free=False` there, and nothing is hidden when torch is
already imported.
"""

from __future__ import annotations

import sys
from typing import Any


def load_tokenizer(path: str, *, torch_free: bool) -> Any:
    """`AutoTokenizer.from_pretrained(path)`; with `torch_free`, without importing torch."""
    if torch_free and "torch" not in sys.modules and "transformers" not in sys.modules:
        # NOTE: None in sys.modules makes importlib report the package missing (and any
        # import of it fail) until the entry is removed.
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            from transformers.utils import import_utils

            import_utils.is_torch_available()  # cached: False from now on
        finally:
            del sys.modules["torch"]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
