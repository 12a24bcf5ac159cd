"""Function calling and reasoning output end to end: a live server on the tiny random llama
(`--reasoning-parser qwen3`), driven by the openai client and langchain-openai. A random model
calls no tool of its own accord, so forced tool_choice shows the grammar at work, and a
`regex` makes the model write a given shape of call or reasoning where the parsers are
exercised."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from _live import start_server
from _tools import WEATHER

FLAG = {
    "type": "function",
    "function": {
        "name": "set_flag",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}},
            "required": ["on"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Live:
    def __init__(self, proc: object, base: str, log: Path) -> None:
        self.proc, self.base, self.log = proc, base, log
        self.client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def live(tiny_model_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("fc")
    args = ["--model-path", tiny_model_paths["llama"], "--reasoning-parser", "qwen3"]
    proc, base = start_server(args, tmp / "server.log", tmp)
    yield Live(proc, base, tmp / "server.log")
    proc.terminate()
    proc.wait(timeout=30)


def _check_weather(args_text: str) -> None:
    args = json.loads(args_text)
    assert set(args) == {"city", "days"}, args
    assert args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 7


def _reassemble(stream: openai.Stream) -> tuple[str, list[tuple[str, str]], str | None, str]:
    """(content, [(name, arguments)], finish_reason, reasoning) from a chat stream."""
    content, reasoning, reason = "", "", None
    calls: dict[int, list[str]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            d = choice.delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id and tc.function.name
                    calls[tc.index] = [tc.function.name, ""]
                calls[tc.index][1] += tc.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, [(n, a) for n, a in (calls[i] for i in sorted(calls))], reason, reasoning


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_call_parses_and_matches_the_schema(live: Live, choice: object) -> None:
    kw = dict(
        model="any",
        messages=ASK,
        tools=[WEATHER, FLAG],
        tool_choice=choice,
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
    )
    r = live.client.chat.completions.create(**kw)  # type: ignore[call-overload]
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content is None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    if call.function.name == "get_weather":
        _check_weather(call.function.arguments)
        # Written the way a model writes JSON: ", " and ": ", no other whitespace.
        assert call.function.arguments == json.dumps(json.loads(call.function.arguments))
    else:
        assert isinstance(json.loads(call.function.arguments)["on"], bool)
    # Streamed, the same (greedy) request's deltas reassemble into the same call.
    content, calls, reason, _ = _reassemble(live.client.chat.completions.create(**kw, stream=True))  # type: ignore[call-overload]
    assert content == "" and reason == "tool_calls"
    assert calls == [(call.function.name, call.function.arguments)]


def test_parallel_required_calls_all_match(live: Live) -> None:
    r = live.client.chat.completions.create(
        model="any",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=200,
        temperature=1.0,
        seed=3,
    )
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" for c in calls)
    done = calls if r.choices[0].finish_reason == "tool_calls" else calls[:-1]
    for c in done:  # the last one may be cut by max_tokens
        _check_weather(c.function.arguments)


def test_auto_reads_the_models_calls_and_text(live: Live) -> None:
    """The model (steered by a regex) writes text and a hermes call: the call is parsed out,
    the text stays content; streamed, no markup leaks into content."""
    regex = r'Checking\.\n<tool_call>\n\{"name": "set_flag", "arguments": \{"on": (true|false)\}\}\n</tool_call>'
    kw = dict(model="any", messages=ASK, tools=[WEATHER, FLAG], max_tokens=80, temperature=0)
    r = live.client.chat.completions.create(**kw, extra_body={"regex": regex})  # type: ignore[call-overload]
    msg = r.choices[0].message
    assert msg.content == "Checking."
    assert [c.function.name for c in msg.tool_calls] == ["set_flag"]
    assert json.loads(msg.tool_calls[0].function.arguments) in ({"on": True}, {"on": False})
    assert r.choices[0].finish_reason == "tool_calls"
    content, calls, reason, _ = _reassemble(
        live.client.chat.completions.create(**kw, stream=True, extra_body={"regex": regex})  # type: ignore[call-overload]
    )
    assert content == "Checking." and reason == "tool_calls"
    assert calls == [("set_flag", msg.tool_calls[0].function.arguments)]
    # tool_choice none: the same text is all content.
    r = live.client.chat.completions.create(
        **kw,
        tool_choice="none",
        extra_body={"regex": regex},  # type: ignore[call-overload]
    )
    assert "<tool_call>" in r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_tool_result_in_history(live: Live) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "days": 1}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    r = live.client.chat.completions.create(
        model="any", messages=history, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # Without tools in the request, the history still renders.
    r = live.client.chat.completions.create(
        model="any", messages=history, max_tokens=4, temperature=0
    )
    assert r.choices[0].message.content is not None


def test_legacy_functions(live: Live) -> None:
    r = live.client.chat.completions.create(
        model="any",
        messages=ASK,
        functions=[WEATHER["function"]],  # type: ignore[list-item]
        function_call={"name": "get_weather"},
        max_tokens=80,
        temperature=0,
    )
    (call,) = r.choices[0].message.tool_calls
    _check_weather(call.function.arguments)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"a": {"type": "bogus"}},
                            },
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
        ),
    ],
)
def test_tool_mistakes_are_400s(live: Live, body: dict, param: str) -> None:
    r = httpx.post(
        live.base + "/v1/chat/completions",
        json={"messages": ASK, "max_tokens": 4, **body},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["param"] == param, r.text
    assert live.client.models.list().data  # still serving


def test_reasoning_content(live: Live) -> None:
    regex = r"<think>\nabc [a-z]{3}\n</think>\n\nThe answer [a-z]{2}\."
    kw = dict(model="any", messages=ASK, max_tokens=60, temperature=0, extra_body={"regex": regex})
    r = live.client.chat.completions.create(**kw)  # type: ignore[call-overload]
    msg = r.choices[0].message
    assert msg.reasoning_content.startswith("abc ") and len(msg.reasoning_content) == 7
    assert msg.content.startswith("The answer ") and "<think>" not in msg.content
    _, _, _, reasoning = _reassemble(live.client.chat.completions.create(**kw, stream=True))  # type: ignore[call-overload]
    assert reasoning == msg.reasoning_content
    stream = live.client.chat.completions.create(**kw, stream=True)  # type: ignore[call-overload]
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert content == msg.content
    # separate_reasoning=false: the reasoning stays in the content.
    kw["extra_body"] = {"regex": regex, "separate_reasoning": False}
    r = live.client.chat.completions.create(**kw)  # type: ignore[call-overload]
    assert r.choices[0].message.content.startswith("<think>")
    assert getattr(r.choices[0].message, "reasoning_content", None) is None


def test_generate_takes_structural_tag_and_ebnf(live: Live) -> None:
    tag = {
        "structures": [
            {
                "begin": "<f>",
                "schema": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}},
                    "required": ["a"],
                },
                "end": "</f>",
            }
        ],
        "triggers": ["<f>"],
    }
    r = httpx.post(
        live.base + "/generate",
        json={
            "text": "x",
            "sampling_params": {
                "max_new_tokens": 10,
                "temperature": 0,
                "ebnf": 'root ::= "yes" | "no"',
            },
        },
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["text"] in ("yes", "no"), r.text
    r = httpx.post(
        live.base + "/generate",
        json={
            "text": "x",
            "sampling_params": {"max_new_tokens": 5, "structural_tag": json.dumps(tag)},
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        live.base + "/generate",
        json={"text": "x", "sampling_params": {"max_new_tokens": 5, "ebnf": "root ::= "}},
        timeout=30,
    )
    assert r.status_code == 400 and "ebnf" in r.json()["message"], r.text


def test_langchain_bind_tools_and_structured_output(live: Live) -> None:
    lc = pytest.importorskip("langchain_openai", reason="pip install langchain-openai")
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """The weather of a city."""

        city: str = Field(json_schema_extra={"enum": ["Paris", "Rome"]})
        days: int = Field(ge=1, le=7)

    llm = lc.ChatOpenAI(
        base_url=live.base + "/v1", api_key="none", model="any", temperature=0, max_tokens=80
    )
    bound = llm.bind_tools([Weather], tool_choice="Weather", parallel_tool_calls=False)
    msg = bound.invoke("What is the weather in Paris?")
    (call,) = msg.tool_calls
    assert call["name"] == "Weather"
    Weather.model_validate(call["args"])
    # Streamed through langchain: the chunks add up to the same call.
    total = None
    for chunk in bound.stream("What is the weather in Paris?"):
        total = chunk if total is None else total + chunk
    assert total is not None and [c["args"] for c in total.tool_calls] == [call["args"]]
    structured = llm.with_structured_output(Weather, method="function_calling")
    out = structured.invoke("What is the weather in Paris?")
    assert isinstance(out, Weather)


def test_sglang_parse_routes(live: Live) -> None:
    """/separate_reasoning and /parse_function_call parse text the client already has."""
    r = httpx.post(
        live.base + "/separate_reasoning",
        json={"text": "<think>\nhm\n</think>\n\nyes"},
        timeout=30,
    )
    assert r.status_code == 200 and r.json() == {"text": "yes", "reasoning_text": "hm"}, r.text
    r = httpx.post(
        live.base + "/separate_reasoning",
        json={"text": "a</think>b", "reasoning_parser": "deepseek-r1"},
        timeout=30,
    )
    assert r.json() == {"text": "b", "reasoning_text": "a"}
    bad = httpx.post(
        live.base + "/separate_reasoning", json={"text": "x", "reasoning_parser": "?"}, timeout=30
    )
    assert bad.status_code == 400 and bad.json()["param"] == "reasoning_parser"
    text = 'Sure.\n<tool_call>\n{"name": "set_flag", "arguments": {"on": true}}\n</tool_call>'
    r = httpx.post(
        live.base + "/parse_function_call",
        json={"text": text, "tools": [FLAG]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "normal_text": "Sure.",
        "calls": [{"name": "set_flag", "parameters": {"on": True}}],
    }
    r = httpx.post(
        live.base + "/parse_function_call",
        json={"text": "[set_flag(on=False)]", "tools": [FLAG], "tool_call_parser": "pythonic"},
        timeout=30,
    )
    assert r.json()["calls"] == [{"name": "set_flag", "parameters": {"on": False}}]
