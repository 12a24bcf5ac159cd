"""What a chat choice's generated text becomes (main process): reasoning (with
--reasoning-parser), content, and tool calls (when the request has tools), for a whole
output (`ChatOutputParser.complete`) or a stream of deltas (`ChoiceStream`).

The reasoning is split off first; tool calls are read from the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from srt.function_call.formats import ToolFormat
from srt.function_call.stream import ToolCallStream, parse_calls
from srt.reasoning import ReasoningParser


@dataclass
class ChoiceMessage:
    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]]


@dataclass
class ChoiceDelta:
    content: str
    reasoning: str
    tool_calls: list[dict[str, Any]]

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


@dataclass(frozen=True)
class ChatOutputParser:
    """`reasoning`: the reasoning parser, None to leave reasoning in the content. `tools`:
    the tool-call format and the names of the request's tools, None when the model may not
    call any."""

    reasoning: ReasoningParser | None
    tools: tuple[ToolFormat, frozenset[str]] | None
    stream_reasoning: bool = True
    # tool_choice required or named: the output is only calls.
    forced: bool = False

    @property
    def passthrough(self) -> bool:
        """Nothing to parse: the text is the content, as it comes."""
        return self.reasoning is None and self.tools is None

    def complete(self, text: str) -> ChoiceMessage:
        reasoning: str | None = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.split(text, final=True)
        if self.tools is None:
            return ChoiceMessage(text, reasoning or None, [])
        content, calls = parse_calls(self.tools[0], text, self.tools[1], self.forced)
        return ChoiceMessage(content, reasoning or None, calls)

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)


class ChoiceStream:
    """One choice's output as it grows; `update` gives what to send next."""

    def __init__(self, parser: ChatOutputParser) -> None:
        self.parser = parser
        self.text = ""
        self._reasoning_sent = 0
        self._held_reasoning = ""
        self._content_sent = 0
        self._tools = ToolCallStream(*parser.tools) if parser.tools is not None else None

    @property
    def has_calls(self) -> bool:
        return self._tools is not None and self._tools.num_calls > 0

    def update(self, delta: str, final: bool) -> ChoiceDelta:
        self.text += delta
        reasoning, answer = "", self.text
        if self.parser.reasoning is not None:
            reasoning, answer = self.parser.reasoning.split(self.text, final)
        new_reasoning = reasoning[self._reasoning_sent :]
        self._reasoning_sent = len(reasoning)
        if self._tools is not None:
            content, calls = self._tools.update(answer, final)
        else:
            content, calls = answer[self._content_sent :], []
            self._content_sent = len(answer)
        if not self.parser.stream_reasoning:
            # The reasoning goes out in one piece, once the answer begins or the output ends.
            self._held_reasoning += new_reasoning
            new_reasoning = ""
            if self._held_reasoning and (content or calls or answer or final):
                new_reasoning, self._held_reasoning = self._held_reasoning, ""
        return ChoiceDelta(content, new_reasoning, calls)
