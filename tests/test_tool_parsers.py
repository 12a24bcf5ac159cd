"""Function calling and reasoning output without a server: every tool-call format parsed whole
and streamed split at every character boundary (content and calls only grow, argument
fragments reassemble to the final arguments), malformed calls kept as content, tools /
tool_choice validation, the messages given to chat templates, reasoning split, and the
structural tags that enforce tool_choice walked by a "model" that picks random allowed tokens.
"""

from __future__ import annotations

import json
import random

import pytest
from _tools import WEATHER

from srt.function_call.formats import FORMATS, detect_format, format_named
from srt.function_call.stream import ToolCallStream, parse_calls
from srt.function_call.tools import ToolError, ToolPlan, template_messages
from srt.reasoning import ReasoningStream, reasoning_parser

NAMES = frozenset({"get_weather", "add"})

# (format, output text, expected content, expected [(name, arguments object)])
CASES = [
    (
        "hermes",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": [1, 2], "note": "a } \\" <tool_call>"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "add", "arguments": {"a": 1, "b": -2.5e3}}\n</tool_call>',
        "Let me look.",
        [
            ("get_weather", {"city": "Paris", "days": [1, 2], "note": 'a } " <tool_call>'}),
            ("add", {"a": 1, "b": -2500.0}),
        ],
    ),
    (
        "hermes",
        '<tool_call>\n{"arguments": {"a": true}, "name": "add"}\n</tool_call>\nDone.',
        "Done.",
        [("add", {"a": True})],
    ),
    ("hermes", "No calls here, 1 < 2 and <tool fine.", "No calls here, 1 < 2 and <tool fine.", []),
    (
        "hermes",  # a name that is no tool: the whole block is text
        'A <tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
        'A <tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
        [],
    ),
    (
        "hermes",  # not JSON after the tag
        "<tool_call> just words </tool_call> ok",
        "<tool_call> just words </tool_call> ok",
        [],
    ),
    (
        "hermes",  # the closing tag forgotten
        '<tool_call>{"name": "add", "arguments": {"x": null}}',
        "",
        [("add", {"x": None})],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Rome"}}; '
        '{"name": "add", "parameters": {}}',
        "",
        [("get_weather", {"city": "Rome"}), ("add", {})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "add", "parameters": {"a": [{"b": "}"}]}}',
        "",
        [("add", {"a": [{"b": "}"}]})],
    ),
    ("llama3_json", 'Use {"a": 1} like {"name": "x"}.', 'Use {"a": 1} like {"name": "x"}.', []),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, '
        '{"name": "get_weather", "arguments": {"city": "X"}}]',
        "",
        [("add", {"a": 1}), ("get_weather", {"city": "X"})],
    ),
    (
        "mistral",
        'Sure. [TOOL_CALLS]add[ARGS]{"a": 3}[TOOL_CALLS]get_weather[ARGS]{"city": "Y"}',
        "Sure.",
        [("add", {"a": 3}), ("get_weather", {"city": "Y"})],
    ),
    (
        "mistral",
        "[TOOL_CALLS] something else",
        "[TOOL_CALLS] something else",
        [],
    ),
    (
        "pythonic",
        '[get_weather(city="Paris, \'FR\')", days=3, ok=True, extra=None), add(a=[1, {"k": false}])]',
        "",
        [
            ("get_weather", {"city": "Paris, 'FR')", "days": 3, "ok": True, "extra": None}),
            ("add", {"a": [1, {"k": False}]}),
        ],
    ),
    (
        "pythonic",
        "<|python_start|>[add(a=1)]<|python_end|> then text",
        "then text",
        [("add", {"a": 1})],
    ),
    ("pythonic", "[1, 2, 3] is a list", "[1, 2, 3] is a list", []),
    ("pythonic", 'See [get_weather(city="x")]', 'See [get_weather(city="x")]', []),
    ("pythonic", "[get_weather(1, 2)]", "[get_weather(1, 2)]", []),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_parse_whole_output(fmt: str, text: str, content: str, calls: list) -> None:
    got_content, got_calls = parse_calls(FORMATS[fmt](), text, NAMES)
    assert (got_content or "") == content
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls
    ] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got_calls)
    if calls and not content:
        assert got_content is None  # only calls: content is null, as OpenAI sends it


def _stream(fmt: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Feeds `pieces` to a ToolCallStream; returns the content and (name, arguments) of the
    calls as a client reassembles them from the deltas, checking the delta shapes."""
    s = ToolCallStream(FORMATS[fmt](), NAMES)
    text, content = "", ""
    calls: dict[int, list[str]] = {}
    for k, piece in enumerate(pieces):
        text += piece
        c, deltas = s.update(text, final=k == len(pieces) - 1)
        content += c
        for d in deltas:
            if d["index"] not in calls:
                assert d["type"] == "function" and d["id"].startswith("call_")
                assert d["function"]["arguments"] == ""
                calls[d["index"]] = [d["function"]["name"], ""]
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]][1] += d["function"]["arguments"]
    return content, [(n, a) for n, a in (calls[i] for i in sorted(calls))]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_stream_split_at_every_boundary(fmt: str, text: str, content: str, calls: list) -> None:
    whole_content, whole_calls = parse_calls(FORMATS[fmt](), text, NAMES)
    want_calls = [(c["function"]["name"], c["function"]["arguments"]) for c in whole_calls]
    # One character at a time, and cut in two at every boundary.
    splits = [list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]
    for pieces in splits:
        got_content, got_calls = _stream(fmt, pieces)
        assert got_content == (whole_content or ""), pieces
        assert got_calls == want_calls, pieces
    # Nothing of a call's markup is ever shown as content while it streams.
    s = ToolCallStream(FORMATS[fmt](), NAMES)
    shown = ""
    for i in range(1, len(text) + 1):
        shown += s.update(text[:i], final=False)[0]
        assert (whole_content or "").startswith(shown)


def test_stream_sends_arguments_before_the_call_ends() -> None:
    s = ToolCallStream(FORMATS["hermes"](), NAMES)
    _, deltas = s.update('<tool_call>\n{"name": "add", "arguments": {"a": 12', final=False)
    assert deltas[0]["function"]["name"] == "add"
    assert deltas[1]["function"]["arguments"].startswith('{"a": 1')


def test_stream_of_a_call_cut_short_keeps_what_was_sent() -> None:
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1'
    content, calls = _stream("hermes", list(text))
    assert content == "" and calls == [("add", '{"a": 1')]
    # Whole, the same text is content (auto), or the call so far (tool_choice forced).
    assert parse_calls(FORMATS["hermes"](), text, NAMES) == (text, [])
    _, forced = parse_calls(FORMATS["hermes"](), text, NAMES, forced=True)
    assert forced[0]["function"]["arguments"] == '{"a": 1'


def test_formats_by_name_and_template() -> None:
    assert format_named("qwen25").name == "hermes"
    assert format_named("llama3").name == "llama3_json"
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        format_named("bogus")
    assert detect_format("{% for t in tools %}<tool_call>{% endfor %}") == "hermes"
    assert detect_format("[TOOL_CALLS] {{ tools }}") == "mistral"
    assert detect_format("<|python_tag|>") == "llama3_json"
    assert detect_format("{{ messages }}") is None
    assert detect_format("<tool_call> [TOOL_CALLS]") is None  # ambiguous


# ---- tools and tool_choice -----------------------------------------------------------------

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"x": {"type": "boolean"}},
            "required": ["x"],
        },
        "strict": True,
    },
}


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]", "type 'function'"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "'function' object"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools[0].function.name",
            "1-64",
        ),
        ({"tools": [ADD, ADD]}, "tools", "two tools are named 'add'"),
        ({"tools": [ADD], "tool_choice": "sometimes"}, "tool_choice", "none, auto, required"),
        (
            {"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "not in tools",
        ),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {
                "tools": [ADD],
                "tool_choice": None,
                "functions": [ADD["function"]],
            },
            "functions",
            "not both",
        ),
    ],
)
def test_tool_plan_rejects(kwargs: dict, param: str, message: str) -> None:
    args = {"tools": None, "tool_choice": None, "parallel_tool_calls": None, **kwargs}
    with pytest.raises(ToolError, match=message) as e:
        ToolPlan.of(**args)
    assert e.value.param == param


def test_tool_plan_choices_and_legacy_functions() -> None:
    assert ToolPlan.of(None, "none", None) is None
    plan = ToolPlan.of([WEATHER, ADD], None, None)
    assert plan is not None and plan.choice == "auto" and plan.parallel
    assert plan.names == {"get_weather", "add"}
    named = {"type": "function", "function": {"name": "add"}}
    assert ToolPlan.of([WEATHER, ADD], named, False).choice == "add"  # type: ignore[union-attr]
    legacy = ToolPlan.of(None, None, None, [WEATHER["function"]], {"name": "get_weather"})
    assert legacy is not None and legacy.choice == "get_weather"
    none = ToolPlan.of([WEATHER], "none", None)
    assert none is not None and not none.active and none.template_tools() == []
    fmt = FORMATS["hermes"]()
    assert none.grammar(fmt) is None
    # auto: free unless a tool is strict.
    assert ToolPlan.of([WEATHER], "auto", None).grammar(fmt) is None  # type: ignore[union-attr]
    assert ToolPlan.of([WEATHER, ADD], "auto", None).grammar(fmt) is not None  # type: ignore[union-attr]


def test_template_messages_native_and_fallback() -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_9", "content": "Sunny"},
    ]
    plan = ToolPlan.of([WEATHER], None, None)
    native = template_messages(history, plan, FORMATS["hermes"](), native=True)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native[2] == {
        "role": "tool",
        "content": "Sunny",
        "tool_call_id": "call_9",
        "name": "get_weather",
    }
    for name in FORMATS:
        fmt = FORMATS[name]()
        text = template_messages(history, plan, fmt, native=False)
        assert text[0]["role"] == "system" and "get_weather" in text[0]["content"]
        assert fmt.example in text[0]["content"]
        # The past call is written the way the format parses it back.
        _, calls = parse_calls(fmt, text[2]["content"], NAMES)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Paris"})
        ]
        assert text[3]["role"] == "user" and "Sunny" in text[3]["content"]
    with pytest.raises(ToolError, match="tool_call_id"):
        template_messages([{"role": "tool", "content": "x"}], None, FORMATS["hermes"](), True)


def test_native_template_receives_tools(tiny_model_paths: dict[str, str]) -> None:
    """A template with tool support gets the tools and the history's calls as objects."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_paths["llama"])
    tok.chat_template = (
        "{% for t in tools %}TOOL {{ t.function.name }};{% endfor %}"
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
        "{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}"
    )
    from srt.function_call.tools import template_supports_tools

    assert template_supports_tools(tok)
    plan = ToolPlan.of([WEATHER], None, None)
    msgs = template_messages(
        [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c", "function": {"name": "get_weather", "arguments": '{"a": 1}'}}
                ],
            },
        ],
        plan,
        FORMATS["hermes"](),
        native=True,
    )
    out = tok.apply_chat_template(msgs, tools=plan.template_tools(), tokenize=False)  # type: ignore[union-attr]
    assert out == 'TOOL get_weather;[user]hi[assistant]CALL get_weather {"a": 1}'


# ---- constrained decoding ------------------------------------------------------------------


def _random_walk(backend, key: tuple[str, str], tok, seed: int, limit: int = 600) -> str:  # noqa: ANN001
    """What a model that picks uniformly among the tokens the grammar allows writes (EOS half
    of the time it is allowed), up to `limit` tokens."""
    import numpy as np

    rng = random.Random(seed)
    matcher = backend.new_matcher(key)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out: list[int] = []
    for _ in range(limit):
        if matcher.is_terminated():
            break
        mask = backend.fill_bitmask([matcher])[0].numpy().view(np.uint32)
        allowed = [t for t in range(backend.vocab_size) if (int(mask[t // 32]) >> (t % 32)) & 1]
        assert allowed, tok.decode(out)
        t = eos if eos in allowed and rng.random() < 0.5 else rng.choice(allowed)
        assert matcher.accept_token(t)
        if t == eos:
            break
        out.append(t)
    return tok.decode(out)


@pytest.mark.parametrize("fmt_name", ["hermes", "llama3_json", "mistral", "pythonic"])
def test_forced_calls_always_parse_and_match_the_schema(
    fmt_name: str, tiny_model_paths: dict[str, str]
) -> None:
    from transformers import AutoTokenizer

    from srt.constrained.grammar import GrammarBackend

    tok = AutoTokenizer.from_pretrained(tiny_model_paths["llama"])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    backend = GrammarBackend(tok, len(tok), [eos])
    fmt = FORMATS[fmt_name]()
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, parallel in (("required", True), ("required", False), (named, False)):
        plan = ToolPlan.of([WEATHER, ADD], choice, parallel)
        assert plan is not None
        tag = plan.grammar(fmt)
        assert tag is not None
        for seed in range(3):
            text = _random_walk(backend, ("structural_tag", tag), tok, seed)
            content, calls = parse_calls(fmt, text, plan.names, forced=True)
            assert calls and content is None, text
            if not parallel:
                assert len(calls) == 1, text
            for c in calls:
                args = json.loads(c["function"]["arguments"])
                if c["function"]["name"] == "get_weather":
                    assert args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 7
                    assert set(args) == {"city", "days"}
                else:
                    assert choice == "required" and set(args) == {"x"}
                    assert isinstance(args["x"], bool)
            if choice == named:
                assert [c["function"]["name"] for c in calls] == ["get_weather"]


def test_pythonic_enforces_forced_calls_only() -> None:
    """Its calls open with a bare '[', so strict tools under auto are refused; forced calls
    write keyword arguments (required ones first, optional ones may follow)."""
    plan = ToolPlan.of([ADD], "auto", None)
    with pytest.raises(ValueError, match="pythonic"):
        plan.grammar(FORMATS["pythonic"]())  # type: ignore[union-attr]
    import xgrammar as xgr

    opt = {
        "type": "function",
        "function": {
            "name": "opt",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
            },
        },
    }
    plan = ToolPlan.of([WEATHER, opt], "required", None)
    grammar = xgr.Grammar.from_structural_tag(plan.grammar(FORMATS["pythonic"]()))  # type: ignore[union-attr]
    accepts = xgr.testing._is_grammar_accept_string
    assert accepts(grammar, '[get_weather(city="Rome", days=2), opt(), opt(a=1, b=true)]')
    assert not accepts(grammar, '[get_weather(days=2, city="Rome")]')  # declared order
    assert not accepts(grammar, '[get_weather(city="Oslo", days=2)]')  # enum
    bad = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a-b": {}}}},
    }
    with pytest.raises(ToolError, match="identifier") as e:
        ToolPlan.of([bad], "required", None).grammar(FORMATS["pythonic"]())  # type: ignore[union-attr]
    assert e.value.param == "tools[0].function.parameters"


# ---- reasoning -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parser", "text", "reasoning", "answer"),
    [
        (
            "qwen3",
            "<think>\nStep 1.\nStep 2.\n</think>\n\nThe answer.",
            "Step 1.\nStep 2.",
            "The answer.",
        ),
        ("qwen3", "No thinking at all.", "", "No thinking at all."),
        ("qwen3", "<think>cut short", "cut short", ""),
        ("deepseek-r1", "Hmm, 2+2.\n</think>\n4", "Hmm, 2+2.", "4"),
        ("deepseek-r1", "<think>Hmm.</think>4", "Hmm.", "4"),
        ("deepseek-r1", "never closed", "never closed", ""),
        ("qwen3-thinking", "a</think>b", "a", "b"),
    ],
)
def test_reasoning_split_whole_and_streamed(
    parser: str, text: str, reasoning: str, answer: str
) -> None:
    p = reasoning_parser(parser)
    assert p.split(text, final=True) == (reasoning, answer)
    for cut in range(len(text) + 1):
        pieces = [text[:cut], text[cut:]] if 0 < cut < len(text) else list(text)
        s = ReasoningStream(p)
        got_r, got_a, sofar = "", "", ""
        for k, piece in enumerate(pieces):
            sofar += piece
            r, a = s.update(sofar, final=k == len(pieces) - 1)
            got_r, got_a = got_r + r, got_a + a
            assert "<think" not in got_r + got_a and "</think" not in got_r + got_a
        assert (got_r, got_a) == (reasoning, answer)
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        reasoning_parser("nope")
