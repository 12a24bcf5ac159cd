"""A chat output turned into content and tool calls: `parse_calls` for a complete output,
`ToolCallStream` for one that arrives in pieces (stream=true).

The stream sends, per call, a first delta with its index, id, type and name, then argument
fragments; the fragments of a call concatenate exactly to the arguments of the final parse.
Text that may still turn into a call is held back until that is known; call markup never
reaches `content`.
"""

from __future__ import annotations

import uuid
from typing import Any

from srt.function_call.formats import ToolFormat


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_dict(call_id: str, name: str, args: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def parse_calls(
    fmt: ToolFormat, text: str, names: frozenset[str], forced: bool = False
) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a complete output. Content is None when the output is only
    calls; malformed call text stays content. A call cut short (max_tokens) is content, unless
    the calls were `forced` (tool_choice required or named): then it is a call with the
    arguments written so far."""
    scan = fmt.scan(text, names, final=True, keep_partial=forced)
    calls = [_call_dict(new_call_id(), c.name, c.args) for c in scan.calls]
    content = scan.content if scan.content or not calls else None
    return content, calls


class ToolCallStream:
    """Follows one choice's content text as it grows; `update` returns what is new."""

    def __init__(self, fmt: ToolFormat, names: frozenset[str]) -> None:
        self.fmt = fmt
        self.names = names
        self._content_sent = 0
        # Per call sent so far: [id, arguments sent].
        self._sent: list[list[Any]] = []

    @property
    def num_calls(self) -> int:
        return len(self._sent)

    def update(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(new content, tool-call deltas) for the content text so far (`final`: all of it)."""
        scan = self.fmt.scan(text, self.names, final=final, keep_partial=True)
        content = scan.content[self._content_sent :]
        self._content_sent = len(scan.content)
        deltas: list[dict[str, Any]] = []
        for i, call in enumerate(scan.calls):
            if i == len(self._sent):
                call_id = new_call_id()
                self._sent.append([call_id, 0])
                deltas.append({"index": i, **_call_dict(call_id, call.name, "")})
            sent = self._sent[i]
            if call.streamable or call.complete or final:
                fragment = call.args[sent[1] :]
                if fragment:
                    sent[1] = len(call.args)
                    deltas.append({"index": i, "function": {"arguments": fragment}})
        return content, deltas
