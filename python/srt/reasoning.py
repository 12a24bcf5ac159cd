"""Reasoning output (`--reasoning-parser`): the `<think>...</think>` part of a reasoning
model's answer, separated from the answer itself (main process).

- qwen3: the reasoning is there when the output starts with `<think>` (Qwen3 with thinking
  on; with `chat_template_kwargs: {"enable_thinking": false}` the template closes it in the
  prompt and the output is all answer);
- deepseek-r1: the template opens `<think>` in the prompt, so the output starts inside the
  reasoning (a leading `<think>` is allowed) and it ends at `</think>`; without one, the whole
  output is reasoning;
- qwen3-thinking: like deepseek-r1, for Qwen3 thinking-only models.

`split` is pure over the text so far; while it grows the reasoning and the answer only grow
(a possible beginning of a tag at the end is held back), so streams send their differences.
"""

from __future__ import annotations

from dataclasses import dataclass

from srt.function_call.formats import _suffix_prefix


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    # The output starts inside the reasoning (the template opened it).
    forced: bool
    start: str = "<think>"
    end: str = "</think>"

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, answer) of `text`, without the tags and the whitespace around them."""
        i = len(text) - len(text.lstrip())
        if text.startswith(self.start, i):
            r0 = i + len(self.start)
        elif not final and self.start.startswith(text[i:]):
            return "", ""  # may still be the opening tag
        elif self.forced:
            r0 = 0
        else:
            return "", text
        e = text.find(self.end, r0)
        if e < 0:
            reasoning = text[r0:]
            if not final:
                reasoning = reasoning[: len(reasoning) - _suffix_prefix(reasoning, self.end)]
            return reasoning.strip(), ""
        return text[r0:e].strip(), text[e + len(self.end) :].lstrip()


PARSERS = {
    "qwen3": ReasoningParser("qwen3", forced=False),
    "deepseek-r1": ReasoningParser("deepseek-r1", forced=True),
    "qwen3-thinking": ReasoningParser("qwen3-thinking", forced=True),
}


def reasoning_parser(name: str) -> ReasoningParser:
    if name not in PARSERS:
        raise ValueError(
            f"unknown reasoning parser {name!r}; choose one of {', '.join(sorted(PARSERS))}"
        )
    return PARSERS[name]


class ReasoningStream:
    """Follows one output as it grows; `update` returns (new reasoning, new answer)."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self._sent = (0, 0)

    def update(self, text: str, final: bool) -> tuple[str, str]:
        reasoning, answer = self.parser.split(text, final)
        r, a = self._sent
        self._sent = (len(reasoning), len(answer))
        return reasoning[r:], answer[a:]
