"""Grammar-constrained sampling with xgrammar (JSON schema, regex, EBNF, structural tag).

Main process: `check_grammar(params)` parses a request's grammar without a tokenizer and raises ValueError (a 400) when it is invalid, before anything is sent.
Scheduler process: `GrammarBackend` compiles a grammar once per distinct spec against the
tokenizer (cached), `new_matcher` gives each request its own `GrammarMatcher`; for every step
with constrained rows the scheduler fills one token bitmask on the host (`fill_bitmask`, from
the matchers' states after the previous token) and the step worker masks those rows' logits
with it (`apply_bitmask`); the scheduler feeds the sampled token back with
`matcher.accept_token`. A request ends when its matcher terminates (the grammar is complete and
a stop token was accepted).

JSON is generated compact (no free whitespace between tokens, `any_whitespace=False`): still
valid JSON, and a weak model cannot spend its whole budget on whitespace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from srt.sampling_params import SamplingParams

# Compiled grammars kept per backend (distinct specs); the oldest goes first.
_CACHE_SIZE = 256
# xgrammar errors start with "[HH:MM:SS] /path/file.cc:123: "; clients need only the message.
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


def _clean(e: Exception) -> str:
    return _CPP_PREFIX.sub("", str(e)).strip()


def grammar_key(params: SamplingParams) -> tuple[str, str] | None:
    """(kind, spec) of a constrained request, else None; kind is one of json_schema, regex,
    ebnf, structural_tag."""
    return params.grammar


def _structural_tag(spec: str) -> Any:
    """xgrammar's structural tag (`{"type": "structural_tag", "format": ...}`), or SGLang's
    older shape `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`."""
    import xgrammar as xgr

    try:
        d = json.loads(spec)
    except ValueError as e:
        raise ValueError(f"structural_tag is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError("structural_tag must be a JSON object")
    try:
        if "structures" in d:
            items = [
                xgr.StructuralTagItem(begin=s["begin"], schema=s["schema"], end=s["end"])
                for s in d["structures"]
            ]
            tag = xgr.StructuralTag.from_legacy_structural_tag(items, d.get("triggers", []))
        else:
            tag = xgr.StructuralTag.from_json(d)
        return xgr.Grammar.from_structural_tag(tag)
    except (KeyError, TypeError) as e:
        raise ValueError(f"invalid structural_tag: missing or wrong field {e}") from e
    except Exception as e:  # pydantic ValidationError, xgrammar's own errors
        raise ValueError(f"invalid structural_tag: {_clean(e)}") from e


def _grammar(kind: str, spec: str) -> Any:
    import xgrammar as xgr

    if kind == "json_schema":
        try:
            json.loads(spec)
        except ValueError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from e
        try:
            return xgr.Grammar.from_json_schema(spec, any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"invalid json_schema: {_clean(e)}") from e
    if kind == "structural_tag":
        return _structural_tag(spec)
    if kind == "ebnf":
        try:
            return xgr.Grammar.from_ebnf(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"invalid ebnf: {_clean(e)}") from e
    try:
        return xgr.Grammar.from_regex(spec)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"invalid regex: {_clean(e)}") from e


def check_grammar(params: SamplingParams) -> None:
    """Raises ValueError naming the problem if the request's grammar cannot be built."""
    key = grammar_key(params)
    if key is not None:
        _grammar(*key)


class GrammarBackend:
    """Compiles grammars for one tokenizer / vocabulary (scheduler process)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids) or None
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._cache: dict[tuple[str, str], Any] = {}

    def compile(self, key: tuple[str, str]) -> Any:
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self.compiler.compile_grammar(_grammar(*key))
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = compiled
        return compiled

    def new_matcher(self, key: tuple[str, str]) -> Any:
        """A fresh matcher for one request. ValueError if the grammar is invalid."""
        return self._xgr.GrammarMatcher(self.compile(key))

    def fill_bitmask(self, matchers: Sequence[Any]) -> torch.Tensor:
        """The host bitmask of the tokens each matcher allows next (one row per matcher; a
        terminated matcher's row allows everything, its sample is dropped anyway)."""
        bitmask = self._xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i, m in enumerate(matchers):
            if not m.is_terminated():
                m.fill_next_token_bitmask(bitmask, i)
        return bitmask

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Masks (in place, -inf) the tokens `bitmask` forbids, row by row."""
        if logits.device.type != "cpu":
            # NOTE: from pinned memory, so the copy does not wait for the device.
            bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(logits, bitmask)
