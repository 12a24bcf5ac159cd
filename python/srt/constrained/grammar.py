"""Grammar-constrained sampling with xgrammar (JSON schema, regex, EBNF, structural tag).

The main process only builds grammars to check them (`srt.constrained.build`, torch-free).
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

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from srt.constrained.build import build_grammar

# Compiled grammars kept per backend (distinct specs); the oldest goes first.
_CACHE_SIZE = 256


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
            compiled = self.compiler.compile_grammar(build_grammar(*key))
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
