"""Grammars from a request's spec (JSON schema, regex, EBNF, structural tag), without torch.

Main process: `check_grammar(params)` builds a request's grammar without a tokenizer and raises
ValueError (a 400) when it is invalid, before anything is sent to the scheduler. The scheduler
builds the same grammars (`build_grammar`) and compiles them against its tokenizer
(`grammar.GrammarBackend`).

xgrammar's package `__init__` imports its torch-based matcher and kernels; the main process
never loads torch (~500 MiB of RSS and torch's thread pools), so `xgr()` gives the parts a
grammar is built from (`xgrammar.grammar`, `xgrammar.structural_tag`, which need only
xgrammar's C++ core and pydantic) without running that `__init__`, and with torch hidden
from the binding layer (tvm_ffi), which imports it when it can. Where xgrammar is already
imported whole (the scheduler), or its modules are laid out differently, it is the whole
package.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
import types
from typing import Any

from srt.sampling_params import SamplingParams

# xgrammar errors start with "[HH:MM:SS] /path/file.cc:123: "; clients need only the message.
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")

_lite: Any = None


def clean_error(e: Exception) -> str:
    return _CPP_PREFIX.sub("", str(e)).strip()


def _grammar_modules() -> Any:
    """xgrammar's grammar and structural-tag modules, imported under a bare package module (the
    package's `__init__` does not run), as a namespace; None if that fails."""
    spec = importlib.util.find_spec("xgrammar")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = types.ModuleType("xgrammar")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__package__ = "xgrammar"
    sys.modules["xgrammar"] = pkg
    # NOTE: tvm_ffi (xgrammar's binding layer) imports torch if it can; None in sys.modules
    # makes that import fail, as if torch were not installed (a process with torch loaded
    # keeps it).
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        # As the package's __init__ does first: its C++ library, which registers the types.
        importlib.import_module("xgrammar.load_binding")
        grammar = importlib.import_module("xgrammar.grammar")
        tag = importlib.import_module("xgrammar.structural_tag")
        return types.SimpleNamespace(
            Grammar=grammar.Grammar,
            StructuralTag=tag.StructuralTag,
            StructuralTagItem=tag.StructuralTagItem,
        )
    except Exception:  # noqa: BLE001 (any failure: the whole package serves)
        return None
    finally:
        # NOTE: a later plain `import xgrammar` runs the package's own __init__ (which reuses
        # the submodules loaded here: the same classes).
        if sys.modules.get("xgrammar") is pkg:
            del sys.modules["xgrammar"]
        if hide_torch:
            del sys.modules["torch"]


def xgr() -> Any:
    """What grammars are built from: `Grammar`, `StructuralTag`, `StructuralTagItem`."""
    global _lite
    full = sys.modules.get("xgrammar")
    if full is not None and hasattr(full, "GrammarMatcher"):
        return full
    if _lite is None:
        _lite = _grammar_modules()
        if _lite is None:  # an xgrammar laid out otherwise: the whole package (and torch)
            import xgrammar

            _lite = xgrammar
    return _lite


def _structural_tag(spec: str) -> Any:
    """xgrammar's structural tag (`{"type": "structural_tag", "format": ...}`), or SGLang's
    older shape `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`."""
    x = xgr()
    try:
        d = json.loads(spec)
    except ValueError as e:
        raise ValueError(f"structural_tag is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError("structural_tag must be a JSON object")
    try:
        if "structures" in d:
            items = [
                x.StructuralTagItem(begin=s["begin"], schema=s["schema"], end=s["end"])
                for s in d["structures"]
            ]
            tag = x.StructuralTag.from_legacy_structural_tag(items, d.get("triggers", []))
        else:
            tag = x.StructuralTag.from_json(d)
        return x.Grammar.from_structural_tag(tag)
    except (KeyError, TypeError) as e:
        raise ValueError(f"invalid structural_tag: missing or wrong field {e}") from e
    except Exception as e:  # pydantic ValidationError, xgrammar's own errors
        raise ValueError(f"invalid structural_tag: {clean_error(e)}") from e


def json_schema_grammar(schema: str) -> Any:
    """The grammar of compact JSON matching `schema` (", " and ": " between items, no other
    whitespace). ValueError (the bare reason) when xgrammar cannot use the schema."""
    try:
        return xgr().Grammar.from_json_schema(schema, any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(clean_error(e)) from e


def build_grammar(kind: str, spec: str) -> Any:
    """The xgrammar Grammar of a (kind, spec) grammar key; ValueError naming the problem."""
    if kind == "json_schema":
        try:
            json.loads(spec)
        except ValueError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from e
        try:
            return json_schema_grammar(spec)
        except ValueError as e:
            raise ValueError(f"invalid json_schema: {e}") from e
    if kind == "structural_tag":
        return _structural_tag(spec)
    if kind == "ebnf":
        try:
            return xgr().Grammar.from_ebnf(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"invalid ebnf: {clean_error(e)}") from e
    try:
        return xgr().Grammar.from_regex(spec)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"invalid regex: {clean_error(e)}") from e


def check_grammar(params: SamplingParams) -> None:
    """Raises ValueError naming the problem if the request's grammar cannot be built."""
    if params.grammar is not None:
        build_grammar(*params.grammar)
