"""How models write tool calls: one `ToolFormat` per convention, each able to
- `scan` an output (complete, or growing while it streams) into content and calls;
- describe its calls as an xgrammar structural tag, so `tool_choice` required / named and
  `strict` tools can be enforced while decoding;
- write the tool list and past calls as plain text, for chat templates that know no tools.

Formats:
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen 2.5 / 3, Hermes);
- llama3_json: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`,
  several joined by `;` (Llama 3.1+);
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the newer
  `[TOOL_CALLS]name[ARGS]{...}`;
- pythonic: `[get_weather(city="Paris"), other()]` at the start of the output (Llama 3.2 /
  4); arguments are Python (or JSON) literals, turned into a JSON object.

A scan is pure: the same text gives the same answer, and while text grows the content and the
calls only grow (text that might still become a call is held back, not shown as content). Text
that turns out not to be a well-formed call to a known tool is content.
"""

from __future__ import annotations

import ast
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from srt.function_call.json_scan import (
    CallObject,
    Malformed,
    call_object,
    final_arguments,
    skip_ws,
    value_end,
)


@dataclass
class ParsedCall:
    """One call as far as it is written: `args` is the arguments text so far (complete when
    `complete`); `streamable` says whether that text may be sent before it is complete (it is
    the model's own JSON object text, so its prefixes are prefixes of the final arguments)."""

    name: str
    args: str
    complete: bool
    streamable: bool


@dataclass
class Region:
    """The calls of one marked-up region of the output, and where it ends (None: still open,
    the rest of the text belongs to it)."""

    calls: list[ParsedCall] = field(default_factory=list)
    end: int | None = None


@dataclass
class Scan:
    content: str
    calls: list[ParsedCall]
    # The text ends inside a region (a call being written, or text that may become one).
    open_region: bool = False


class _Content:
    """Content text built around calls: whitespace next to a call is dropped and the content
    on either side of a call is joined by a newline."""

    def __init__(self) -> None:
        self.text = ""
        self._after_call = False

    def add(self, piece: str) -> None:
        if self._after_call:
            piece = piece.lstrip()
            if not piece:
                return
            if self.text:
                self.text += "\n"
            self._after_call = False
        self.text += piece

    def call_follows(self, has_calls: bool) -> None:
        if has_calls:
            self.text = self.text.rstrip()
            self._after_call = True


def _suffix_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _json_call(call: CallObject, text: str, names: frozenset[str]) -> ParsedCall | None:
    """A JSON call object as a ParsedCall (None until its name is complete); Malformed when
    it names no tool of the request, or its complete arguments are not an object."""
    if call.name is None:
        return None
    if call.name not in names:
        raise Malformed(f"no tool named {call.name!r}")
    if call.end is not None:
        return ParsedCall(call.name, final_arguments(call.args_text(text)), True, True)
    streamable = call.args_start is not None and text[call.args_start] == "{"
    args = call.args_text(text) if streamable else ""
    return ParsedCall(call.name, args, False, streamable)


class ToolFormat(ABC):
    """A tool-call convention. Subclasses find regions (`find_start`, `region`) and say how
    calls look (`call_begin`, `call_end`, ...)."""

    name: ClassVar[str]
    # Literal markers that open a region (a text ending in a beginning of one is held back).
    markers: ClassVar[tuple[str, ...]] = ()
    # Markers that tokenizers often hold as special tokens: the output keeps special tokens
    # when this format is in use, so the markers survive detokenization.
    special_markers: ClassVar[tuple[str, ...]] = ()

    # ---- scanning -----------------------------------------------------------------------

    def scan(self, text: str, names: frozenset[str], final: bool, keep_partial: bool) -> Scan:
        """Content and calls of `text`. Not `final`: a possible start of a region at the end
        (and trailing whitespace) is held back, and an open region's calls are reported as far
        as they go. `final`: an open region keeps its complete calls, or with `keep_partial`
        (a stream that already sent them) all its named calls; an open region without calls
        is content. Whitespace next to calls is dropped; content on both sides of a call is
        joined by a newline."""
        out = _Content()
        calls: list[ParsedCall] = []
        pos = 0
        while True:
            start = self.find_start(text, pos)
            if start is None:
                tail = text[pos:]
                if not final:
                    tail = tail[: len(tail) - self.held(text, pos)]
                out.add(tail)
                return Scan(out.text, calls)
            out.add(text[pos:start])
            try:
                region = self.region(text, start, names)
            except Malformed:
                # Not a call: the marker is text; look for the next one after it.
                step = self.marker_len(text, start) or 1
                out.add(text[start : start + step])
                pos = start + step
                continue
            if region.end is not None:
                out.call_follows(bool(region.calls))
                calls += region.calls
                pos = region.end
                continue
            if not final:
                # NOTE: the whitespace before the region stays unseen until it is known
                # whether the region holds calls (then it is dropped) or text (then it is not).
                calls += region.calls
                return Scan(out.text.rstrip(), calls, open_region=True)
            kept = region.calls if keep_partial else [c for c in region.calls if c.complete]
            if kept:
                out.call_follows(True)
                calls += kept
            else:
                out.add(text[start:])
            return Scan(out.text, calls)

    def find_start(self, text: str, pos: int) -> int | None:
        """Index of the next region's start at or after `pos`."""
        found = [i for i in (text.find(m, pos) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def marker_len(self, text: str, start: int) -> int:
        return next((len(m) for m in self.markers if text.startswith(m, start)), 0)

    def held(self, text: str, pos: int) -> int:
        """How much of the end of text[pos:] to hold back: a beginning of a marker, and the
        whitespace before it (dropped if a call follows)."""
        tail = text[pos:]
        n = max((_suffix_prefix(tail, m) for m in self.markers), default=0)
        return n + (len(tail) - n - len(tail[: len(tail) - n].rstrip()))

    @abstractmethod
    def region(self, text: str, start: int, names: frozenset[str]) -> Region:
        """The calls of the region whose marker starts at `start`; Malformed when it cannot
        be calls (to tools in `names`)."""

    # ---- constrained decoding -------------------------------------------------------------

    trigger: ClassVar[str]
    separator: ClassVar[str] = "\n"

    @abstractmethod
    def call_begin(self, name: str) -> str:
        """The text a call to `name` starts with, up to its arguments."""

    call_end: ClassVar[str] = "}"

    def structural_tag(
        self, tools: list[tuple[str, dict[str, Any]]], forced: bool, parallel: bool
    ) -> dict[str, Any]:
        """xgrammar's structural tag for calls to `tools` ((name, arguments format) pairs, the
        format an xgrammar structural-tag content): only calls (`forced`: tool_choice required
        or named), or free text with calls that must match (auto with strict tools); one call
        at most unless `parallel`."""
        tags = [
            {
                "type": "tag",
                "begin": self.call_begin(name),
                "content": content,
                "end": self.call_end,
            }
            for name, content in tools
        ]
        if forced:
            fmt: dict[str, Any] = {
                "type": "tags_with_separator",
                "tags": tags,
                "separator": self.separator,
                "at_least_one": True,
                "stop_after_first": not parallel,
            }
        else:
            fmt = {
                "type": "triggered_tags",
                "triggers": [self.trigger],
                "tags": tags,
                "stop_after_first": not parallel,
            }
        return {"type": "structural_tag", "format": self.wrap(fmt, forced)}

    def wrap(self, fmt: dict[str, Any], forced: bool) -> dict[str, Any]:
        return fmt

    def arguments_content(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The structural-tag content of a call's arguments that match `schema` (ValueError
        when it cannot be enforced)."""
        return json_content(schema)

    # ---- plain-text prompting (templates without tool support) ----------------------------

    example: ClassVar[str]

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        """Past calls ((name, arguments JSON text) pairs) as the model would have written
        them."""
        return self.separator.join(self.call_begin(n) + a + self.call_end for n, a in calls)


def _json_regions(
    text: str, j: int, names: frozenset[str], sep: str, close: str | None
) -> tuple[list[ParsedCall], int | None]:
    """Call objects from text[j:] joined by `sep`, up to `close` (or, without one, to the
    first text that is not another call). Returns (calls, end or None while open)."""
    calls: list[ParsedCall] = []
    while True:
        j = skip_ws(text, j)
        if j >= len(text):
            return calls, None
        obj = call_object(text, j)
        parsed = _json_call(obj, text, names)
        if parsed is not None:
            calls.append(parsed)
        if obj.end is None:
            return calls, None
        j = skip_ws(text, obj.end)
        if j >= len(text):
            return calls, None
        if close is not None and text.startswith(close, j):
            return calls, j + len(close)
        if text.startswith(sep, j):
            j += len(sep)
            continue
        if close is None:
            return calls, j
        raise Malformed(f"expected {sep!r} or {close!r} between calls")


class HermesFormat(ToolFormat):
    name = "hermes"
    markers = ("<tool_call>",)
    trigger = "<tool_call>"
    call_end = "}\n</tool_call>"
    _close = "</tool_call>"
    example = '<tool_call>\n{"name": "<function name>", "arguments": {<arguments>}}\n</tool_call>'

    def call_begin(self, name: str) -> str:
        return '<tool_call>\n{"name": ' + json.dumps(name) + ', "arguments": '

    def region(self, text: str, start: int, names: frozenset[str]) -> Region:
        j = skip_ws(text, start + len(self.trigger))
        if j >= len(text):
            return Region()
        obj = call_object(text, j)
        parsed = _json_call(obj, text, names)
        calls = [parsed] if parsed is not None else []
        if obj.end is None:
            return Region(calls)
        k = skip_ws(text, obj.end)
        if text.startswith(self._close, k):
            return Region(calls, k + len(self._close))
        if k >= len(text) or self._close.startswith(text[k:]):
            return Region(calls)
        return Region(calls, obj.end)  # no closing tag: the call ends with its object


class Llama3JsonFormat(ToolFormat):
    name = "llama3_json"
    markers = ("<|python_tag|>",)
    special_markers = ("<|python_tag|>",)
    trigger = '{"name": '
    separator = "; "
    example = '{"name": "<function name>", "parameters": {<arguments>}}'
    _start = re.compile(r'\{\s*"name"\s*:')
    _maybe_start = re.compile(r'\{\s*("(n(a(m(e("\s*)?)?)?)?)?)?$')

    def call_begin(self, name: str) -> str:
        return '{"name": ' + json.dumps(name) + ', "parameters": '

    def find_start(self, text: str, pos: int) -> int | None:
        found = [i for i in (text.find(self.markers[0], pos),) if i >= 0]
        m = self._start.search(text, pos)
        if m:
            found.append(m.start())
        return min(found) if found else None

    def marker_len(self, text: str, start: int) -> int:
        return len(self.markers[0]) if text.startswith(self.markers[0], start) else 1

    def held(self, text: str, pos: int) -> int:
        n = super().held(text, pos)
        brace = text.rfind("{", pos)
        if brace >= 0 and self._maybe_start.match(text, brace):
            tail = text[pos:brace]
            n = max(n, len(text) - brace + len(tail) - len(tail.rstrip()))
        return n

    def region(self, text: str, start: int, names: frozenset[str]) -> Region:
        j = start
        if text.startswith(self.markers[0], j):
            j += len(self.markers[0])
        calls, end = _json_regions(text, j, names, ";", None)
        return Region(calls, end)


class MistralFormat(ToolFormat):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    special_markers = ("[TOOL_CALLS]",)
    trigger = "[TOOL_CALLS]"
    separator = ", "
    example = '[TOOL_CALLS][{"name": "<function name>", "arguments": {<arguments>}}]'
    _named = re.compile(r"([A-Za-z0-9_.\-]+)\[ARGS\]")
    _maybe_named = re.compile(r"[A-Za-z0-9_.\-]*(\[(A(R(G(S)?)?)?)?)?$")

    def call_begin(self, name: str) -> str:
        return '{"name": ' + json.dumps(name) + ', "arguments": '

    def wrap(self, fmt: dict[str, Any], forced: bool) -> dict[str, Any]:
        calls = {"type": "tag", "begin": "[TOOL_CALLS][", "content": fmt, "end": "]"}
        if forced:
            return calls
        # NOTE: in auto mode the list itself is what the trigger opens.
        inner = {**fmt, "type": "tags_with_separator", "separator": self.separator}
        inner.pop("triggers", None)
        inner["at_least_one"] = True
        tag = {**calls, "content": inner}
        return {
            "type": "triggered_tags",
            "triggers": [self.trigger],
            "tags": [tag],
            "stop_after_first": True,
        }

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        inner = ", ".join(self.call_begin(n) + a + "}" for n, a in calls)
        return f"[TOOL_CALLS][{inner}]"

    def region(self, text: str, start: int, names: frozenset[str]) -> Region:
        j = skip_ws(text, start + len(self.trigger))
        if j >= len(text):
            return Region()
        if text[j] == "[":
            calls, end = _json_regions(text, j + 1, names, ",", "]")
            return Region(calls, end)
        if text[j] == "{":
            calls, end = _json_regions(text, j, names, ",", None)
            return Region(calls, end)
        m = self._named.match(text, j)
        if m is None:
            maybe = self._maybe_named.match(text, j)
            if maybe is not None and maybe.end() == len(text):
                return Region()
            raise Malformed("[TOOL_CALLS] is followed by neither a list nor a name")
        name = m.group(1)
        if name not in names:
            raise Malformed(f"no tool named {name!r}")
        a = skip_ws(text, m.end())
        if a >= len(text):
            return Region([ParsedCall(name, "", False, False)])
        if text[a] != "{":
            raise Malformed("arguments are not a JSON object")
        end = value_end(text, a)
        if end is None:
            return Region([ParsedCall(name, text[a:], False, True)])
        return Region([ParsedCall(name, final_arguments(text[a:end]), True, True)], end)


class PythonicFormat(ToolFormat):
    name = "pythonic"
    markers = ("<|python_start|>",)
    special_markers = ("<|python_start|>", "<|python_end|>")
    example = '[function_name(argument="value", other=1)]'
    _call_start = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
    _maybe = re.compile(r"\s*(\[\s*([A-Za-z_][\w.]*\s*)?)?$")

    def find_start(self, text: str, pos: int) -> int | None:
        i = text.find(self.markers[0], pos)
        if i >= 0:
            return i
        if pos == 0:
            j = skip_ws(text, 0)
            if self._call_start.match(text, j):
                return j
        return None

    def marker_len(self, text: str, start: int) -> int:
        return len(self.markers[0]) if text.startswith(self.markers[0], start) else 1

    def held(self, text: str, pos: int) -> int:
        n = super().held(text, pos)
        maybe = self._maybe.match(text) if pos == 0 else None
        if maybe is not None and maybe.end() == len(text):
            return len(text)
        return n

    def region(self, text: str, start: int, names: frozenset[str]) -> Region:
        j = start
        if text.startswith(self.markers[0], j):
            j = skip_ws(text, j + len(self.markers[0]))
            if j >= len(text):
                return Region()
        if text[j] != "[":
            raise Malformed("a pythonic call list starts with '['")
        calls: list[ParsedCall] = []
        j += 1
        while True:
            j = skip_ws(text, j)
            if j >= len(text):
                return Region(calls)
            m = _IDENT.match(text, j)
            if m is None:
                if text[j] == "]" and calls:
                    return Region(calls, self._after(text, j + 1))
                raise Malformed("expected a function call")
            name = m.group(0)
            k = skip_ws(text, m.end())
            if k >= len(text):
                return Region(calls)
            if text[k] != "(":
                raise Malformed("expected '(' after the function name")
            if name not in names:
                raise Malformed(f"no tool named {name!r}")
            close = _python_close(text, k)
            if close is None:
                # NOTE: a call is reported only once it is complete and its arguments are
                # literals, so a stream never sends one that turns out not to be a call.
                return Region(calls)
            calls.append(ParsedCall(name, _python_kwargs(text[j:close]), True, False))
            j = skip_ws(text, close)
            if j >= len(text):
                return Region(calls)
            if text[j] == ",":
                j += 1
                continue
            if text[j] == "]":
                return Region(calls, self._after(text, j + 1))
            raise Malformed("expected ',' or ']' after a call")

    def _after(self, text: str, end: int) -> int | None:
        """The region's end after its ']': past a closing <|python_end|>; None while the
        text may still become one."""
        k = skip_ws(text, end)
        if text.startswith(_PY_END, k):
            return k + len(_PY_END)
        if k >= len(text) or _PY_END.startswith(text[k:]):
            return None
        return end

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        parts = []
        for name, args in calls:
            kwargs = ", ".join(f"{k}={v!r}" for k, v in json.loads(args).items())
            parts.append(f"{name}({kwargs})")
        return "[" + ", ".join(parts) + "]"

    call_end = ")"

    def call_begin(self, name: str) -> str:
        return name + "("

    def structural_tag(
        self, tools: list[tuple[str, dict[str, Any]]], forced: bool, parallel: bool
    ) -> dict[str, Any]:
        if not forced:
            # NOTE: its calls open with a bare '[', which plain text uses too.
            raise ValueError(
                "strict tools under tool_choice auto cannot be enforced with the pythonic "
                "tool-call format; use tool_choice required or a named function, or another "
                "--tool-call-parser"
            )
        tags = [
            {"type": "tag", "begin": self.call_begin(name), "content": content, "end": ")"}
            for name, content in tools
        ]
        calls = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": ", ",
            "at_least_one": True,
            "stop_after_first": not parallel,
        }
        return {
            "type": "structural_tag",
            "format": {"type": "tag", "begin": "[", "content": calls, "end": "]"},
        }

    def arguments_content(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments whose values are JSON (which the parser reads as Python
        literals): the schema's required properties in order, then its optional ones."""
        props = schema.get("properties", {})
        if schema.get("type", "object") != "object" or not isinstance(props, dict):
            raise ValueError("pythonic calls need a parameters schema of type object")
        if not props:
            return {"type": "const_string", "value": ""}
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        required = set(schema.get("required") or [])
        values = {}
        for name, sub in props.items():
            if not name.isidentifier():
                raise ValueError(f"pythonic calls need identifier parameter names, not {name!r}")
            values[name] = json_content({**sub, **defs} if isinstance(sub, dict) else sub)
        elements: list[dict[str, Any]] = []
        for name in (n for n in props if n in required):
            sep = ", " if elements else ""
            elements += [{"type": "const_string", "value": f"{sep}{name}="}, values[name]]
        optional = [n for n in props if n not in required]
        if elements:
            for name in optional:
                kw = [{"type": "const_string", "value": f", {name}="}, values[name]]
                elements.append(
                    {"type": "optional", "content": {"type": "sequence", "elements": kw}}
                )
            return {"type": "sequence", "elements": elements}
        # No required argument: each optional one may follow the one before it.
        tail: dict[str, Any] | None = None
        for k in range(len(optional) - 1, -1, -1):
            sep = ", " if k else ""
            kw = [{"type": "const_string", "value": f"{sep}{optional[k]}="}, values[optional[k]]]
            if tail is not None:
                kw.append(tail)
            tail = {"type": "optional", "content": {"type": "sequence", "elements": kw}}
        assert tail is not None
        return tail


def _python_close(text: str, open_paren: int) -> int | None:
    """Index after the ')' matching text[open_paren]; None while it is not written yet."""
    depth = 0
    j = open_paren
    quote: str | None = None
    while j < len(text):
        c = text[j]
        if quote is not None:
            if c == "\\":
                j += 2
                continue
            if text.startswith(quote, j):
                j += len(quote)
                quote = None
                continue
        elif c in "\"'":
            quote = text[j : j + 3] if text[j : j + 3] in ('"""', "'''") else c
            j += len(quote)
            continue
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def json_content(schema: Any) -> dict[str, Any]:
    """A structural-tag content holding JSON that matches `schema`, written the way srt writes
    constrained JSON: ", " and ": " between items, no other whitespace (a weak model cannot
    wander off into whitespace, and the arguments read like a model's own). ValueError when
    xgrammar cannot use the schema."""
    from srt.constrained.build import clean_error, json_schema_grammar

    try:
        grammar = json_schema_grammar(json.dumps(schema))
    except Exception as e:  # xgrammar's errors for schemas it cannot use
        raise ValueError(clean_error(e)) from e
    return {"type": "grammar", "grammar": str(grammar)}


_PY_END = "<|python_end|>"
_IDENT = re.compile(r"[A-Za-z_][\w.]*")
_JSON_NAMES = {"true": True, "false": False, "null": None}


class _JsonNames(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_NAMES:
            return ast.copy_location(ast.Constant(_JSON_NAMES[node.id]), node)
        return node


def _python_kwargs(call_text: str) -> str:
    """`name(a=1, b="x")` -> '{"a": 1, "b": "x"}'; Malformed unless every argument is a
    keyword with a literal value."""
    try:
        tree = ast.parse(call_text, mode="eval")
    except SyntaxError as e:
        raise Malformed(f"not a Python call: {e.msg}") from e
    call = tree.body
    if not isinstance(call, ast.Call) or call.args:
        raise Malformed("a pythonic call takes keyword arguments only")
    out: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise Malformed("a pythonic call takes keyword arguments only")
        try:
            out[kw.arg] = ast.literal_eval(_JsonNames().visit(kw.value))
        except (ValueError, SyntaxError, TypeError) as e:
            raise Malformed(f"argument {kw.arg} is not a literal") from e
    try:
        return json.dumps(out, ensure_ascii=False)
    except (TypeError, ValueError) as e:  # a set, bytes, complex ...
        raise Malformed(f"arguments are not JSON values: {e}") from e


FORMATS: dict[str, type[ToolFormat]] = {
    f.name: f for f in (HermesFormat, Llama3JsonFormat, MistralFormat, PythonicFormat)
}
# Other servers' names for the same formats.
ALIASES = {
    "qwen": "hermes",
    "qwen25": "hermes",
    "qwen3": "hermes",
    "llama3": "llama3_json",
    "llama": "llama3_json",
    "llama4": "pythonic",
}
# What in a chat template's source tells its format.
_TEMPLATE_SIGNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hermes", ("<tool_call>",)),
    ("mistral", ("[TOOL_CALLS]",)),
    ("llama3_json", ("<|python_tag|>", '"parameters": ')),
    ("pythonic", ("[func_name1(", "<|python_start|>")),
)


def format_named(name: str) -> ToolFormat:
    key = ALIASES.get(name, name)
    if key not in FORMATS:
        raise ValueError(
            f"unknown tool-call parser {name!r}; choose one of {', '.join(sorted(FORMATS))}"
        )
    return FORMATS[key]()


def detect_format(template: str) -> str | None:
    """The format a chat template's source shows, when exactly one matches."""
    found = [name for name, signs in _TEMPLATE_SIGNS if any(s in template for s in signs)]
    return found[0] if len(found) == 1 else None
