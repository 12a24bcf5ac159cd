"""The request side of function calling: `ToolPlan.of` validates a chat request's `tools` and
`tool_choice` (and the legacy `functions` / `function_call`), `ToolPlan.grammar` is the
structural tag that enforces `required`, a named function or `strict` tools, and
`template_messages` prepares the messages (assistant `tool_calls`, `tool` results) for the chat
template: as the template's own tool variables when it has them, else as plain text in the
model's tool-call format with the tools described in the system message (the fallback for
templates without tool support).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from srt.function_call.formats import ToolFormat

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# A function without a parameters schema takes any JSON object.
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class ToolError(ValueError):
    """A client mistake in tools / tool_choice / tool messages (a 400 naming `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool

    def schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else _ANY_OBJECT

    def openai(self) -> dict[str, Any]:
        """The OpenAI tool shape that chat templates expect."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        fn["parameters"] = self.schema()
        return {"type": "function", "function": fn}


def _tool(d: Any, i: int) -> Tool:
    param = f"tools[{i}]"
    if not isinstance(d, dict) or d.get("type", "function") != "function":
        raise ToolError("only tools of type 'function' are supported", param)
    fn = d.get("function")
    if not isinstance(fn, dict):
        raise ToolError("a tool needs a 'function' object", f"{param}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ToolError(
            "a function name is 1-64 letters, digits, '_', '.' or '-'", f"{param}.function.name"
        )
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise ToolError("description must be a string", f"{param}.function.description")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ToolError("parameters must be a JSON schema object", f"{param}.function.parameters")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ToolError("strict must be a boolean", f"{param}.function.strict")
    return Tool(name, desc, params, bool(strict))


@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of tools: `choice` is none, auto, required, or the name of the one
    function to call."""

    tools: tuple[Tool, ...]
    choice: str
    parallel: bool

    @classmethod
    def of(
        cls,
        tools: list[Any] | None,
        tool_choice: Any,
        parallel_tool_calls: bool | None,
        functions: list[Any] | None = None,
        function_call: Any = None,
    ) -> ToolPlan | None:
        """The plan of a request, None when it has no tools. ToolError names a mistake."""
        if functions:
            if tools:
                raise ToolError("give tools or the older functions, not both", "functions")
            tools = [{"type": "function", "function": f} for f in functions]
            if function_call is not None:
                if tool_choice is not None:
                    raise ToolError("give tool_choice or function_call, not both", "function_call")
                tool_choice = (
                    {"type": "function", "function": function_call}
                    if isinstance(function_call, dict)
                    else function_call
                )
        elif function_call is not None:
            raise ToolError("function_call needs functions", "function_call")
        if not tools:
            if tool_choice not in (None, "none"):
                raise ToolError("tool_choice needs tools", "tool_choice")
            return None
        parsed = tuple(_tool(t, i) for i, t in enumerate(tools))
        names = [t.name for t in parsed]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ToolError(f"two tools are named {dup!r}", "tools")
        choice = _choice(tool_choice, set(names))
        return cls(parsed, choice, parallel_tool_calls is not False)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tools)

    @property
    def active(self) -> bool:
        """The model may call tools (tool_choice is not none)."""
        return self.choice != "none"

    def grammar(self, fmt: ToolFormat) -> str | None:
        """The structural tag (JSON) that constrains decoding, None when the output is free:
        required / named force calls that match the parameters schemas; auto constrains the
        calls only when some tool is strict."""
        if self.choice == "none":
            return None
        if self.choice == "auto":
            if not any(t.strict for t in self.tools):
                return None
            # NOTE: a call to a non-strict tool is still a JSON object, nothing more.
            pairs = [
                (t.name, _arguments(fmt, t.schema() if t.strict else _ANY_OBJECT, i))
                for i, t in enumerate(self.tools)
            ]
            return json.dumps(fmt.structural_tag(pairs, forced=False, parallel=self.parallel))
        chosen = [(i, t) for i, t in enumerate(self.tools) if self.choice in ("required", t.name)]
        pairs = [(t.name, _arguments(fmt, t.schema(), i)) for i, t in chosen]
        forced_one = self.choice != "required"
        return json.dumps(
            fmt.structural_tag(pairs, forced=True, parallel=self.parallel and not forced_one)
        )

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools a chat template is given (none when tool_choice is none, so the model is
        not invited to call them)."""
        return [t.openai() for t in self.tools] if self.active else []


def _arguments(fmt: ToolFormat, schema: dict[str, Any], index: int) -> dict[str, Any]:
    try:
        return fmt.arguments_content(schema)
    except ValueError as e:
        raise ToolError(
            f"the parameters schema cannot be enforced: {e}",
            f"tools[{index}].function.parameters",
        ) from e


def _choice(tool_choice: Any, names: set[str]) -> str:
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        if tool_choice in ("none", "auto", "required"):
            return tool_choice
        raise ToolError(
            f"tool_choice must be none, auto, required or a function, got {tool_choice!r}",
            "tool_choice",
        )
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ToolError(
                'a named tool_choice is {"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        if name not in names:
            raise ToolError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
        return name
    raise ToolError("tool_choice must be a string or an object", "tool_choice")


# ---- messages for the chat template --------------------------------------------------------


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template(s) use a `tools` variable."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = "\n".join(str(t) for t in template.values())
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


def _arguments_value(args: Any, param: str) -> Any:
    """A past call's arguments for the template: the object (templates `tojson` it), or the
    text as it was when it is not JSON."""
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    if isinstance(args, dict):
        return args
    raise ToolError("function.arguments must be a JSON string", param)


def _calls(msg: dict[str, Any], i: int) -> list[dict[str, Any]]:
    out = []
    for k, call in enumerate(msg.get("tool_calls") or []):
        param = f"messages[{i}].tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolError("a tool call needs function.name", param)
        out.append(
            {
                "id": call.get("id") or f"call_{i}_{k}",
                "type": "function",
                "function": {
                    "name": fn["name"],
                    "arguments": _arguments_value(fn.get("arguments", "{}"), param),
                },
            }
        )
    return out


def template_messages(
    messages: list[dict[str, Any]],
    plan: ToolPlan | None,
    fmt: ToolFormat,
    native: bool,
) -> list[dict[str, Any]]:
    """The messages as the chat template gets them. `native`: the template renders tools,
    tool_calls and tool messages itself (arguments as objects, tool results with their
    function's name). Otherwise calls are written into the assistant's text in `fmt`, tool
    results become user messages, and the tools (when the model may call them) are described
    in the system message."""
    names_by_id: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            calls = _calls(m, i)
            for c in calls:
                names_by_id[c["id"]] = c["function"]["name"]
            if native:
                out.append(
                    {"role": "assistant", "content": m.get("content") or "", "tool_calls": calls}
                )
            else:
                pairs = [
                    (c["function"]["name"], _args_text(c["function"]["arguments"])) for c in calls
                ]
                text = "\n".join(p for p in (m.get("content") or "", fmt.render_calls(pairs)) if p)
                out.append({"role": "assistant", "content": text})
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise ToolError("a tool message needs tool_call_id", f"messages[{i}].tool_call_id")
            name = m.get("name") or names_by_id.get(call_id, "")
            if native:
                out.append(
                    {
                        "role": "tool",
                        "content": m.get("content") or "",
                        "tool_call_id": call_id,
                        "name": name,
                    }
                )
            else:
                label = (
                    f"Result of {name} (call {call_id})" if name else f"Result of call {call_id}"
                )
                out.append({"role": "user", "content": f"{label}:\n{m.get('content') or ''}"})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    if not native and plan is not None and plan.active:
        out = _with_tool_prompt(out, plan, fmt)
    return out


def _args_text(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _with_tool_prompt(
    messages: list[dict[str, Any]], plan: ToolPlan, fmt: ToolFormat
) -> list[dict[str, Any]]:
    """The tools described at the end of the system message (one is added when there is
    none)."""
    tools = "\n".join(json.dumps(t.openai()["function"], ensure_ascii=False) for t in plan.tools)
    if plan.choice == "required":
        rule = "Answer with at least one function call."
    elif plan.choice != "auto":
        rule = f"Answer with a call to {plan.choice}."
    else:
        rule = "If no function helps, answer in plain text."
    text = (
        "You can call these functions (JSON schemas of their parameters):\n"
        f"{tools}\n\n"
        f"To call a function, write:\n{fmt.example}\n"
        "The results come back in the next message. " + rule
    )
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}".lstrip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
