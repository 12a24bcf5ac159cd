"""Scanning JSON that may still be growing (a model's output mid-stream).

`value_end(s, i)` finds where the JSON value starting at `s[i]` ends; `call_object(s, i)`
reads a tool call object `{"name": ..., "arguments": {...}}` as far as it goes, giving the name
once its string is complete and the span of the raw arguments text. Nothing is re-serialised:
a call's arguments are the model's own text, so streamed fragments concatenate exactly to the
final arguments.

Both raise `Malformed` as soon as the text cannot become valid JSON (of that shape), and
answer "incomplete" (None) while it still can.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_WS = " \t\r\n"
_LITERALS = ("true", "false", "null")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
# The keys that hold a call's arguments: "arguments" (OpenAI, Hermes, Mistral) or
# "parameters" (Llama 3).
ARGUMENT_KEYS = ("arguments", "parameters")


class Malformed(ValueError):
    """The text cannot be completed into the JSON expected here."""


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


# A whole JSON string, and one still being written (its end reached, maybe mid-escape).
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"', re.S)
_STRING_OPEN = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*\\?\Z', re.S)


def _string_end(s: str, i: int) -> int | None:
    """End (exclusive) of the JSON string whose quote is at s[i]; None if not closed yet.
    NOTE: by regex, not a Python loop: a stream scans its output again at every token."""
    m = _STRING.match(s, i)
    if m is not None:
        return m.end()
    if _STRING_OPEN.match(s, i) is not None:
        return None
    raise Malformed("control character in a string")


def value_end(s: str, i: int) -> int | None:
    """End (exclusive) of the JSON value that starts at s[i] (no leading whitespace); None
    while it is incomplete. A number at the very end of `s` is incomplete (more digits may
    follow)."""
    if i >= len(s):
        return None
    c = s[i]
    if c == '"':
        return _string_end(s, i)
    if c in "{[":
        return _container_end(s, i)
    if c in "-0123456789":
        j = i
        while j < len(s) and s[j] in _NUMBER_CHARS:
            j += 1
        if j == len(s):
            return None
        try:
            json.loads(s[i:j])
        except ValueError as e:
            raise Malformed(f"bad number {s[i:j]!r}") from e
        return j
    for lit in _LITERALS:
        end = i + len(lit)
        if s.startswith(lit, i):
            return end
        if lit.startswith(s[i:]):
            return None
    raise Malformed(f"unexpected {c!r}")


def _container_end(s: str, i: int) -> int | None:
    """End of the object / array at s[i]; checks its structure as far as it goes."""
    is_obj = s[i] == "{"
    close = "}" if is_obj else "]"
    j = skip_ws(s, i + 1)
    if j < len(s) and s[j] == close:
        return j + 1
    while True:
        if j >= len(s):
            return None
        if is_obj:
            if s[j] != '"':
                raise Malformed("object key is not a string")
            k = _string_end(s, j)
            if k is None:
                return None
            j = skip_ws(s, k)
            if j >= len(s):
                return None
            if s[j] != ":":
                raise Malformed("expected ':' after an object key")
            j = skip_ws(s, j + 1)
        end = value_end(s, j)
        if end is None:
            return None
        j = skip_ws(s, end)
        if j >= len(s):
            return None
        if s[j] == close:
            return j + 1
        if s[j] != ",":
            raise Malformed(f"expected ',' or {close!r}")
        j = skip_ws(s, j + 1)


@dataclass
class CallObject:
    """A tool call object read from s[start:]: `name` once its string is complete, the raw
    arguments span [args_start, args_end) (args_end None while they grow), and `end` (None
    while the object is open)."""

    start: int
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None

    def args_text(self, s: str) -> str:
        """The arguments text so far ("" before they start; "{}" for a closed object that
        has none)."""
        if self.args_start is None:
            return "{}" if self.end is not None else ""
        return s[self.args_start : len(s) if self.args_end is None else self.args_end]


def call_object(s: str, i: int) -> CallObject:
    """Reads the call object at s[i] (a '{'). Malformed if it cannot become one: a key that is
    not a string, a name that is not a string, arguments that are not an object or a string."""
    if s[i] != "{":
        raise Malformed("a tool call is a JSON object")
    call = CallObject(start=i)
    j = skip_ws(s, i + 1)
    if j < len(s) and s[j] == "}":
        raise Malformed("a tool call needs a name")
    while True:
        if j >= len(s):
            return call
        if s[j] != '"':
            raise Malformed("object key is not a string")
        k = _string_end(s, j)
        if k is None:
            return call
        key = json.loads(s[j:k])
        j = skip_ws(s, k)
        if j >= len(s):
            return call
        if s[j] != ":":
            raise Malformed("expected ':' after an object key")
        j = skip_ws(s, j + 1)
        if j >= len(s):
            return call
        if key == "name" and s[j] != '"':
            raise Malformed("a tool call's name is a string")
        if key in ARGUMENT_KEYS:
            if s[j] not in '{"':
                raise Malformed("a tool call's arguments are an object")
            call.args_start = j
        end = value_end(s, j)
        if end is None:
            return call
        if key == "name":
            call.name = json.loads(s[j:end])
        elif key in ARGUMENT_KEYS:
            call.args_end = end
        j = skip_ws(s, end)
        if j >= len(s):
            return call
        if s[j] == "}":
            if call.name is None:
                raise Malformed("a tool call needs a name")
            call.end = j + 1
            return call
        if s[j] != ",":
            raise Malformed("expected ',' or '}'")
        j = skip_ws(s, j + 1)


def final_arguments(raw: str) -> str:
    """The arguments string of a complete call: the object's text; arguments a model wrote as
    a JSON string holding an object are unwrapped. Malformed unless it is a JSON object."""
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise Malformed(f"arguments are not JSON: {e}") from e
    if isinstance(value, str):
        try:
            inner = json.loads(value)
        except ValueError as e:
            raise Malformed("arguments are a string, not a JSON object") from e
        if not isinstance(inner, dict):
            raise Malformed("arguments are not a JSON object")
        return value
    if not isinstance(value, dict):
        raise Malformed("arguments are not a JSON object")
    return raw
