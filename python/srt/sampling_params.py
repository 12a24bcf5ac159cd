"""Per-request sampling parameters: defined once, validated in the main process, carried to the
scheduler inside `GenerateReq`.

Validation raises `ValueError` with a message naming the parameter; the HTTP layer turns that
into a 400 with an OpenAI-style error body.

`from_dict` reads SGLang's sampling_params as its clients send them: a null means the default,
`sampling_seed` is the seed, and SGLang's keys that srt does not implement (beam search,
watermarks, ...) are accepted only while they hold their null / default value (a 400 naming the key
otherwise), so nothing is silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import msgspec

# NOTE: top_k = -1 (or 0 from OpenAI-style clients) means "no top-k".
_NO_TOP_K = -1
# Limits on stop_regex: each pattern is searched in the output text after every token.
MAX_STOP_REGEX = 16
MAX_STOP_REGEX_CHARS = 512

# SGLang sampling keys srt does not implement, with the values that ask for nothing (what
# SGLang's own clients send when the feature is unused).
_UNSUPPORTED_UNLESS_DEFAULT: dict[str, tuple[Any, ...]] = {
    "beam_width": (None, 1),
    "custom_params": (None, {}),
    "watermark": (None, False, {}),
    "stream_interval": (None,),
}


# The fields that constrain the output with a grammar (srt.constrained.grammar).
_GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "structural_tag")


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = _NO_TOP_K
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    n: int = 1
    # Structured output (srt.constrained): the output must match this JSON schema (a JSON
    # string), this regex, this EBNF grammar (xgrammar's GBNF dialect), or this structural tag
    # (xgrammar's JSON format, or SGLang's {"structures", "triggers"}); at most one of them.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    # Stop when the output text (as the client sees it) contains a match of one of these
    # regexes; the request ends with finish_reason stop, `matched` the pattern (SGLang's).
    stop_regex: list[str] = msgspec.field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict | None) -> SamplingParams:
        """Builds from a JSON-like dict (unknown keys are an error), then validates."""
        d = dict(d or {})
        for key, allowed in _UNSUPPORTED_UNLESS_DEFAULT.items():
            if key in d:
                value = d.pop(key)
                if not any(value == a and type(value) is type(a) for a in allowed):
                    raise ValueError(f"sampling parameter {key}={value!r} is not supported")
        if "sampling_seed" in d:  # SGLang's name for the seed
            seed = d.pop("sampling_seed")
            if seed is not None and d.get("seed") not in (None, seed):
                raise ValueError("give at most one of seed and sampling_seed")
            if seed is not None:
                d["seed"] = seed
        # NOTE: like SGLang, a null means the default (except max_new_tokens, where null
        # means "up to the context length").
        d = {k: v for k, v in d.items() if v is not None or k == "max_new_tokens"}
        for key in ("ebnf", "structural_tag"):  # SGLang's clients send "" for none
            if d.get(key) == "":
                del d[key]
        for key in ("json_schema", "structural_tag"):  # given as an object, not a string
            if isinstance(d.get(key), dict):
                d[key] = json.dumps(d[key])
        for key in ("stop", "stop_regex"):
            if isinstance(d.get(key), str):
                d[key] = [d[key]]
        if d.get("top_k") == 0:
            d["top_k"] = _NO_TOP_K
        if isinstance(d.get("logit_bias"), dict):
            try:
                d["logit_bias"] = {int(k): v for k, v in d["logit_bias"].items()}
            except (TypeError, ValueError) as e:
                raise ValueError("logit_bias keys must be token ids") from e
        try:
            p = msgspec.convert(d, cls)
        except msgspec.ValidationError as e:
            raise ValueError(f"invalid sampling parameter: {e}") from e
        p.verify()
        return p

    def verify(self, vocab_size: int | None = None) -> None:
        def finite(name: str, v: float) -> None:
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")

        for name in (
            "temperature",
            "top_p",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
        ):
            finite(name, getattr(self, name))
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                f"({self.max_new_tokens})"
            )
        if self.n < 1 or self.n > 128:
            raise ValueError(f"n must be in [1, 128], got {self.n}")
        if len(self.stop) > 64:
            raise ValueError(f"at most 64 stop strings are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise ValueError("stop strings must be non-empty")
            if len(s) > 512:
                raise ValueError("a stop string may be at most 512 characters")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        given = [k for k in _GRAMMAR_KINDS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of {', '.join(_GRAMMAR_KINDS)}, got {given}")
        if len(self.stop_regex) > MAX_STOP_REGEX:
            raise ValueError(f"at most {MAX_STOP_REGEX} stop_regex patterns are allowed")
        for pattern in self.stop_regex:
            if len(pattern) > MAX_STOP_REGEX_CHARS:
                raise ValueError(f"a stop_regex may be at most {MAX_STOP_REGEX_CHARS} characters")
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"stop_regex {pattern!r} is not a valid regex: {e}") from None
            if compiled.search("") is not None:
                raise ValueError(f"stop_regex {pattern!r} matches the empty text")
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if not 0 <= t < vocab_size:
                    raise ValueError(f"stop_token_ids: {t} is outside the vocabulary")
            for t in self.logit_bias or {}:
                if not 0 <= t < vocab_size:
                    raise ValueError(f"logit_bias: token {t} is outside the vocabulary")
        for t, b in (self.logit_bias or {}).items():
            if not math.isfinite(b) or not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias for token {t} must be in [-100, 100], got {b}")

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(kind, spec) of the output grammar (see _GRAMMAR_KINDS), None when unconstrained."""
        for kind in _GRAMMAR_KINDS:
            spec = getattr(self, kind)
            if spec is not None:
                return (kind, spec)
        return None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
