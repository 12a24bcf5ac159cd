"""transformers in srt's own processes: configs and tokenizers, without its torch side.

transformers imports torch whenever it is installed (its `is_torch_available()` looks for the
package, and its modules import it when found): in the HTTP process that costs ~600 MiB of
memory it never uses (tokenizing needs only `tokenizers`), and in a scheduler ~0.6 s of its
start (a Llama config pulls in torch.distributed and sympy). `transformers_without_torch()`
hides torch while transformers is imported and asks it once whether torch is available, so
it caches the answer no and works from then on as on an install without torch. Only for a
process that is srt's own: in a user's process (`srt.Engine`) the user may need transformers
with torch, so the Engine's tokenizer loads plainly (`torch_free=False`).

A scheduler process imports transformers only when it needs it (a config not seen before, the
first constrained request): `mark_own_process()` at its start says that whatever imports it
there goes through `prepare_transformers()`, which hides torch in such a process.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from srt.server_args import ServerArgs

# transformers' advisory warnings (its "PyTorch was not found" line under `torch_free`).
_ADVICE_ENV = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


_own_process = False


def mark_own_process() -> None:
    """This process is srt's own (a scheduler): transformers, when imported, goes without
    torch."""
    global _own_process
    _own_process = True


def own_process() -> bool:
    return _own_process


def prepare_transformers() -> None:
    """Call before importing transformers in code that runs in srt's own processes."""
    if _own_process:
        transformers_without_torch()


def tokenizer_path_of(server_args: ServerArgs) -> str:
    return server_args.tokenizer_path or server_args.model_path or ""


def transformers_without_torch() -> None:
    """Imports transformers as if torch were not installed, unless it is imported already.

    Its configs and tokenizers then load without its torch integrations, which import most of
    torch.distributed and sympy (~0.6 s of a scheduler's start, ~500 MiB in the HTTP process,
    which never loads torch otherwise). srt's processes use transformers for those alone: the
    model itself is srt's, and a GGUF file is converted before (in the main process)."""
    if "transformers" in sys.modules:
        return
    # NOTE: None in sys.modules makes importlib report the package missing (and any import
    # of it fail) until the entry is restored.
    torch = sys.modules.get("torch")
    sys.modules["torch"] = None  # type: ignore[assignment]
    quiet = _ADVICE_ENV not in os.environ
    if quiet:
        os.environ[_ADVICE_ENV] = "1"
    try:
        from transformers.utils import import_utils

        import_utils.is_torch_available()  # cached: False from now on
    finally:
        if torch is None:
            del sys.modules["torch"]
        else:
            sys.modules["torch"] = torch
        if quiet:
            del os.environ[_ADVICE_ENV]


def load_tokenizer(path: str, *, torch_free: bool) -> Any:
    """`AutoTokenizer.from_pretrained(path)`; with `torch_free`, through
    `transformers_without_torch` (for srt's own processes only)."""
    if torch_free:
        transformers_without_torch()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
